"""The optax chain: a learning-rate schedule, global-norm clipping, the optimizer, each chosen by
name from a plain dict (SCHEDULES, OPTIMIZERS: a new one is a function and an entry)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxlm.config import OptimConfig


def _constant(optim: OptimConfig, num_steps: int, warmup: int) -> optax.Schedule:
  """Flat at `learning_rate`."""
  del num_steps, warmup
  return optax.constant_schedule(optim.learning_rate)


def _cosine(optim: OptimConfig, num_steps: int, warmup: int) -> optax.Schedule:
  """Cosine decay from `learning_rate` to `min_learning_rate` at num_steps."""
  peak = optim.learning_rate
  return optax.cosine_decay_schedule(peak, max(num_steps - warmup, 1),
                                     alpha=optim.min_learning_rate / peak)


def _wsd(optim: OptimConfig, num_steps: int, warmup: int) -> optax.Schedule:
  """Warmup-stable-decay: flat, then a linear decay to `min_learning_rate` over the last
  `decay_fraction` of the steps."""
  peak, floor = optim.learning_rate, optim.min_learning_rate
  decay = max(int(round(optim.decay_fraction * num_steps)), 1)
  stable = max(num_steps - warmup - decay, 0)
  return optax.join_schedules(
      [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [stable])


# optim.schedule -> what follows the warmup: (optim, num_steps, warmup steps) -> schedule.
SCHEDULES = {"constant": _constant, "cosine": _cosine, "wsd": _wsd}


def make_schedule(optim: OptimConfig, num_steps: int) -> optax.Schedule:
  """Learning rate per step: a linear warmup to `learning_rate` over `warmup_steps`, then
  SCHEDULES[optim.schedule]."""
  warmup = min(optim.warmup_steps, num_steps)
  peak = optim.learning_rate
  warmup_fn = optax.linear_schedule(0.0 if warmup else peak, peak, max(warmup, 1))
  return optax.join_schedules([warmup_fn, SCHEDULES[optim.schedule](optim, num_steps, warmup)],
                              [warmup])


NO_DECAY_NAMES = ("bias", "scale")


def decay_mask(params: Any) -> Any:
  """Weight decay only on matrices (embeddings, kernels), not on biases and norm scales.

  Decided by parameter name, not rank: with `scan_layers` a norm scale is [layers, embed].
  """
  def decays(path, _) -> bool:
    # The last dict key is the parameter's name (a logical-axis box adds an attribute key).
    name = next(str(k.key) for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
    return not any(word in name for word in NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decays, params)


def _adamw(optim: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW (b1, b2, eps) with decoupled weight decay on matrices only (`decay_mask`)."""
  return optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                     weight_decay=optim.weight_decay, mask=decay_mask)


# optim.name -> (optim, learning-rate schedule) -> the update rule (after gradient clipping).
OPTIMIZERS = {"adamw": _adamw}


def make_optimizer(optim: OptimConfig, num_steps: int) -> optax.GradientTransformation:
  """Clip by global norm (if grad_clip > 0), then OPTIMIZERS[optim.name] on the schedule."""
  update = OPTIMIZERS[optim.name](optim, make_schedule(optim, num_steps))
  if optim.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), update)
  return update
