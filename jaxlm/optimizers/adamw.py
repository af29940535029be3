"""AdamW (Loshchilov & Hutter): Adam with decoupled weight decay, on the groups that decay."""

from __future__ import annotations

import optax

from jaxlm.config import OptimConfig


def build(optim: OptimConfig, schedule: optax.Schedule, groups) -> optax.GradientTransformation:
  """optax.adamw(b1, b2, eps), weight_decay on the decaying groups (optim.weight_decay_groups)."""
  return optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                     weight_decay=optim.weight_decay, mask=groups.decays)
