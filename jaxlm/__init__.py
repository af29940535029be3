"""jaxlm: GPT-style language models in JAX/Flax (see README.md and docs/architecture.md)."""

from jaxlm import xla as _xla

_xla.apply_default_flags()  # before any backend exists: XLA reads XLA_FLAGS once
