"""The optax chain: learning-rate schedule, global-norm clipping, AdamW with a decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxlm.config import OptimConfig


def make_schedule(optim: OptimConfig, num_steps: int) -> optax.Schedule:
  """Learning rate per step.

  cosine:   linear warmup to `learning_rate`, cosine decay to `min_learning_rate` at num_steps.
  constant: linear warmup, then flat.
  wsd:      warmup, stable, then a linear decay to `min_learning_rate` over the last
            `decay_fraction` of the steps (warmup-stable-decay).
  """
  warmup = min(optim.warmup_steps, num_steps)
  peak, floor = optim.learning_rate, optim.min_learning_rate
  warmup_fn = optax.linear_schedule(0.0 if warmup else peak, peak, max(warmup, 1))
  if optim.schedule == "constant":
    rest = optax.constant_schedule(peak)
  elif optim.schedule == "cosine":
    rest = optax.cosine_decay_schedule(peak, max(num_steps - warmup, 1), alpha=floor / peak)
  else:  # wsd
    decay = max(int(round(optim.decay_fraction * num_steps)), 1)
    stable = max(num_steps - warmup - decay, 0)
    rest = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [stable])
  return optax.join_schedules([warmup_fn, rest], [warmup])


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


def make_optimizer(optim: OptimConfig, num_steps: int) -> optax.GradientTransformation:
  """Clip by global norm (if grad_clip > 0), then AdamW with the decay mask."""
  adamw = optax.adamw(make_schedule(optim, num_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay, mask=decay_mask)
  if optim.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
  return adamw
