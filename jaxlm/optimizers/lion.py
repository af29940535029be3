"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of an
interpolated momentum. Its updates are +-1 per element, so its learning rate is typically 3-10x
below AdamW's (and weight decay that much higher, for the same decay per step)."""

from __future__ import annotations

import optax

from jaxlm.config import OptimConfig


def build(optim: OptimConfig, schedule: optax.Schedule, groups) -> optax.GradientTransformation:
  """optax.lion(lion_b1, lion_b2) with decoupled weight decay on the decaying groups."""
  return optax.lion(schedule, b1=optim.lion_b1, b2=optim.lion_b2,
                    weight_decay=optim.weight_decay, mask=groups.decays)
