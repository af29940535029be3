"""The optimizers `optim.name` chooses, one file each: `build(optim, schedule, groups)` -> an
optax GradientTransformation, from optax's implementations.

`groups` is a jaxlm.optim.ParamGroups (which group each parameter is in: embed, head, matrices,
vectors; `decays(params)`, the weight-decay mask). jaxlm/optim.py chains gradient clipping
before the optimizer and the groups' learning-rate multipliers after it."""

from jaxlm.optimizers import adafactor, adamw, lion, muon

# optim.name -> builder. A new optimizer is a file with a `build` and an entry here (and its name
# in jaxlm/config.py OPTIMIZERS, which validates configs without importing optax).
OPTIMIZERS = {"adamw": adamw.build, "muon": muon.build, "adafactor": adafactor.build,
              "lion": lion.build}
# The optimizers whose matrix updates already grow with width as muP prescribes (Muon: unit
# singular values x sqrt(fan_out / fan_in)); model.parametrization=mup leaves their learning rate
# alone. The element-wise ones (AdamW, Adafactor, Lion) get learning_rate / width multiplier.
WIDTH_SCALED = frozenset({"muon"})
