"""Muon (Jordan et al. 2024, modded-nanogpt; "Muon is Scalable for LLM Training", Liu et al.
2025): momentum orthogonalized by Newton-Schulz iterations, for the hidden layers' matrices;
embeddings, the LM head, norm scales and biases train with AdamW, as Muon's authors prescribe.

jaxlm's attention kernels are 3-D; Muon sees each as the matrix it multiplies by:
  query/key/value [embed, heads, head_dim]  -> [embed, heads x head_dim]
  out             [heads, head_dim, embed]  -> [heads x head_dim, embed]
  MLP kernels     [embed, mlp] / [mlp, embed] as they are
With scan_layers a leading [layers] axis is a batch axis: each layer's matrix separately (the
axes are counted from the end, so one rule serves both layouts).

Built from optax.contrib.scale_by_muon rather than optax.contrib.muon: the latter's Adam branch
decays every parameter it holds (norm scales and biases too) and turns Nesterov on for Adam as
well; here the AdamW branch is optax.adamw with jaxlm's decay mask.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from jaxlm.config import OptimConfig, parse_groups

# parent module name -> the matrix view of its kernel: (reduction axes, output axes).
MATRIX_VIEWS = {
    "query": MuonDimensionNumbers((-3,), (-2, -1)),
    "key": MuonDimensionNumbers((-3,), (-2, -1)),
    "value": MuonDimensionNumbers((-3,), (-2, -1)),
    "out": MuonDimensionNumbers((-3, -2), (-1,)),
    **{name: MuonDimensionNumbers((-2,), (-1,)) for name in ("fc", "proj", "gate", "up", "down")},
}


# The embedding table [vocab, embed] maps a one-hot token to a vector; the LM head [embed,
# vocab] and a classifier kernel [embed, classes] map the residual stream out.
TABLE_VIEW = MuonDimensionNumbers((-2,), (-1,))


def _names(path) -> list[str]:
  return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def _view(path, groups: frozenset[str] = frozenset({"matrices"})
          ) -> MuonDimensionNumbers | None:
  """The matrix view of the parameter at `path` if Muon trains it (its group in `groups`)."""
  names = _names(path)
  if len(names) >= 2 and names[-1] == "kernel" and names[-2] in MATRIX_VIEWS:
    return MATRIX_VIEWS[names[-2]]
  if groups & {"embed", "head"}:
    from jaxlm.optim import group_of  # pylint: disable=import-outside-toplevel  (it imports us)
    if group_of(names) in groups & {"embed", "head"}:
      return TABLE_VIEW
  return None


def labels(params: Any, groups: frozenset[str] = frozenset({"matrices"})) -> Any:
  """'muon' for each parameter Muon trains (the hidden layers' kernels and the optional embed and
  head groups), 'adam' for everything else."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "muon" if _view(path, groups) else "adam", params)


def dimension_numbers(params: Any, groups: frozenset[str] = frozenset({"matrices"})) -> Any:
  """The matrix view of each parameter in Muon's part of the tree (the others are masked)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _view(path, groups), params)


def scale_by_width(groups: frozenset[str] = frozenset({"matrices"})
                   ) -> optax.GradientTransformation:
  """Muon's shape factor sqrt(max(1, fan_out / fan_in)) per matrix (Keller Jordan's Muon): the
  orthogonalized update has unit singular values; this keeps its RMS per output as the width
  grows."""
  def update(updates, state, params=None):
    del params
    def scale(path, u):
      view = _view(path, groups)
      fan_in = math.prod(u.shape[a] for a in view.reduction_axis)
      fan_out = math.prod(u.shape[a] for a in view.output_axis)
      return u * math.sqrt(max(1.0, fan_out / fan_in))
    return jax.tree_util.tree_map_with_path(scale, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def build(optim: OptimConfig, schedule: optax.Schedule, groups) -> optax.GradientTransformation:
  """Muon at the schedule's rate on the matrices (momentum muon_beta, Nesterov if
  muon_nesterov, muon_ns_steps Newton-Schulz steps), AdamW (b1, b2, eps) at muon_adam_lr_scale
  x the schedule on the rest; decoupled weight decay (x the learning rate) on the decaying
  groups in both."""
  adam_schedule = lambda step: schedule(step) * optim.muon_adam_lr_scale
  taken = frozenset(parse_groups(optim.muon_groups, "optim.muon_groups"))
  matrices = optax.chain(
      scale_by_muon(ns_steps=optim.muon_ns_steps, beta=optim.muon_beta, eps=optim.eps,
                    nesterov=optim.muon_nesterov,
                    weight_dimension_numbers=lambda p: dimension_numbers(p, taken)),
      scale_by_width(taken),
      optax.add_decayed_weights(optim.weight_decay, groups.decays),
      optax.scale_by_learning_rate(schedule))
  rest = optax.adamw(adam_schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                     weight_decay=optim.weight_decay, mask=groups.decays)
  return optax.partition({"muon": matrices, "adam": rest}, lambda p: labels(p, taken))
