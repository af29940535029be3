"""The optax chain: a learning-rate schedule, global-norm clipping, the optimizer (by name:
jaxlm/optimizers/, one file each) and the parameter groups' learning-rate multipliers. Schedules
and optimizers are plain dicts (SCHEDULES, OPTIMIZERS: a new one is a function and an entry)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxlm import config as config_lib
from jaxlm.config import OptimConfig
from jaxlm.optimizers import OPTIMIZERS, WIDTH_SCALED  # noqa: F401  (optim.name -> builder)


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


def _names(path) -> list[str]:
  # The dict keys of a parameter's path (a logical-axis box adds an attribute key).
  return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def group_of(names: list[str]) -> str:
  """The parameter group (config.PARAM_GROUPS) of the parameter at `names`: 'vectors' (norm
  scales, biases), 'embed' (token, position and value tables, prefix tuning's slots), 'head' (LM
  head, classifier), else 'matrices' (the layers' kernels, LoRA adapters). By name, not rank:
  with `scan_layers` a norm scale is [layers, embed]."""
  name = names[-1]
  if "bias" in name or "scale" in name:
    return "vectors"
  if name in ("token_embed", "position_embed", "value_embed", "prefix_key", "prefix_value"):
    return "embed"
  if name == "lm_head" or names[0] == "classifier":
    return "head"
  return "matrices"


class ParamGroups:
  """The groups of optim.lr_multipliers and optim.weight_decay_groups, for any parameter tree
  (boxed or not, or a masked part of one: optax.partition's)."""

  def __init__(self, optim: OptimConfig, width_multiplier: float = 1.0):
    """width_multiplier: muP's m (ModelConfig.width_multiplier): the matrices' learning rate
    is divided by it, unless the optimizer's updates already scale with width (Muon)."""
    self.multipliers = config_lib.parse_groups(optim.lr_multipliers, "optim.lr_multipliers")
    if width_multiplier != 1.0 and optim.name not in WIDTH_SCALED:
      self.multipliers["matrices"] = self.multipliers.get("matrices", 1.0) / width_multiplier
    self.decaying = frozenset(
        config_lib.parse_groups(optim.weight_decay_groups, "optim.weight_decay_groups"))

  def labels(self, params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda path, _: group_of(_names(path)), params)

  def decays(self, params: Any) -> Any:
    """The weight-decay mask: True for the parameters of optim.weight_decay_groups."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: group_of(_names(path)) in self.decaying, params)

  def scale_updates(self) -> optax.GradientTransformation:
    """Each update x its group's learning-rate multiplier (1 unless optim.lr_multipliers says):
    the same as that group having its own learning rate, weight decay included."""
    multipliers = self.multipliers

    def update(updates, state, params=None):
      del params
      scale = lambda path, u: u * multipliers.get(group_of(_names(path)), 1.0)
      return jax.tree_util.tree_map_with_path(scale, updates), state
    if all(m == 1.0 for m in multipliers.values()):
      return optax.identity()
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_mask(params: Any) -> Any:
  """Weight decay on embeddings, kernels and heads, not on biases and norm scales (the default
  optim.weight_decay_groups)."""
  return ParamGroups(OptimConfig()).decays(params)


def make_optimizer(optim: OptimConfig, num_steps: int, width_multiplier: float = 1.0
                   ) -> optax.GradientTransformation:
  """Clip by global norm (if grad_clip > 0), OPTIMIZERS[optim.name] on the schedule, then the
  parameter groups' learning-rate multipliers (with muP's 1/width_multiplier on the matrices)."""
  groups = ParamGroups(optim, width_multiplier)
  update = optax.chain(OPTIMIZERS[optim.name](optim, make_schedule(optim, num_steps), groups),
                       groups.scale_updates())
  if optim.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), update)
  return update
