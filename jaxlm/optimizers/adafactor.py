"""Adafactor (Shazeer & Stern 2018): second moments factored into row and column statistics for
matrices (memory ~ rows + columns instead of rows x columns), relative update clipping; T5 and
PaLM trained with it. jaxlm's kernels factor over their last two axes (optax's rule)."""

from __future__ import annotations

import optax

from jaxlm.config import OptimConfig


def build(optim: OptimConfig, schedule: optax.Schedule, groups) -> optax.GradientTransformation:
  """optax.adafactor on the schedule (no parameter-scale multiplication: the schedule is the
  step size, as for the other optimizers), momentum adafactor_momentum when > 0, decoupled
  weight decay on the decaying groups. optax adds Adafactor's decay after the learning rate,
  so its rate is weight_decay x the schedule: the same decay per step as AdamW's."""
  return optax.adafactor(
      schedule, decay_rate=optim.adafactor_decay_rate,
      clipping_threshold=optim.adafactor_clip_threshold or None,
      multiply_by_parameter_scale=False, momentum=optim.adafactor_momentum or None,
      weight_decay_rate=lambda step: schedule(step) * optim.weight_decay,
      weight_decay_mask=groups.decays)
