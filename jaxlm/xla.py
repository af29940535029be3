"""XLA flags jaxlm sets by default, measured to pay (docs/performance.md).

XLA reads XLA_FLAGS once, when JAX creates its backend, so `apply_default_flags` runs when
`jaxlm` is imported (jaxlm/__init__.py) and only adds a flag the user has not set: any flag
named in XLA_FLAGS, with any value, wins. JAXLM_XLA_DEFAULTS=0 turns the defaults off.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

# NVIDIA GPUs: cuBLAS for every matmul instead of XLA's Triton GEMMs. Measured on an H200 for
# the GPT-2 124M train step (batch 16 x 1,024, bf16): the same speed (428,553 vs 423,979
# tokens/s, within block-to-block noise); XLA no longer autotunes Triton tilings for every
# matmul shape, and the step compiled in 13.1 s from cold with cuBLAS and autotuning off
# against 21.6 s from cold with the defaults (docs/performance.md).
GPU_FLAGS = {"--xla_gpu_enable_triton_gemm": "false"}


def cuda_plugin_installed() -> bool:
  """Whether a JAX CUDA plugin is installed (without creating a backend)."""
  return any((dist.metadata["Name"] or "").lower().replace("_", "-").startswith("jax-cuda")
             for dist in importlib.metadata.distributions())


def with_defaults(xla_flags: str, defaults: dict[str, str]) -> str:
  """`xla_flags` plus each default whose flag name it does not already contain."""
  present = {flag.split("=", 1)[0] for flag in xla_flags.split()}
  added = [f"{name}={value}" for name, value in defaults.items() if name not in present]
  return " ".join([*xla_flags.split(), *added])


def apply_default_flags() -> None:
  """Adds the GPU defaults to XLA_FLAGS when a CUDA plugin is installed and no JAX backend
  exists yet (afterwards XLA would ignore them)."""
  if os.environ.get("JAXLM_XLA_DEFAULTS", "1") == "0" or not cuda_plugin_installed():
    return
  if "jax" in sys.modules:
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
      return
  os.environ["XLA_FLAGS"] = with_defaults(os.environ.get("XLA_FLAGS", ""), GPU_FLAGS)
