"""LoRA adapter utilities: merge into the kernels, save.

The model itself holds the adapters (`Dense._lora` in model.py): with `model.lora_rank > 0`
every Dense named in `model.lora_targets` has, beside its kernel [*in, *out],

  lora_a [*in, rank]   random (std 1/sqrt(fan_in))
  lora_b [rank, *out]  zeros, so a fresh adapter changes nothing

and adds `dropout(x) @ lora_a @ lora_b * lora_alpha / lora_rank`. Scanned layers put a leading
[num_layers] axis on all three. This module only moves those leaves around: params are nested
dicts of arrays (unboxed), and a param's path is its tuple of keys, e.g.
('layers_0', 'attention', 'query', 'lora_a'), written 'layers_0/attention/query/lora_a' in
adapter files.

Fine-tuning creates the adapters (the model's own init) and trains only them (see
`finetune.trainable_filter`). Adapter files (`adapters.safetensors` of a LoRA run) are plain
safetensors (never pickles) holding only lora_a/lora_b under their '/'-joined paths, with the
format ('jaxlm-lora'), rank, alpha, dropout, targets and scan_layers in the metadata (JSON
strings): `safetensors.safe_open(path, 'numpy')` reads them anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save

from jaxlm import files, sharding
from jaxlm import params as params_lib
from jaxlm.config import ModelConfig
from jaxlm.errors import UserError
from jaxlm.model import lora_params_per_layer

ADAPTER_NAMES = ("lora_a", "lora_b")
# Written into every adapter file's metadata: what the file is.
FORMAT = "jaxlm-lora"


class LoraError(UserError):
  """Bad adapter input; the message names the param or field and the fix."""


# -- Paths and partitions -----------------------------------------------------------------------

def is_adapter_path(path: tuple[str, ...] | str) -> bool:
  """Whether a param path ('a/b/lora_a' or ('a', 'b', 'lora_a')) names a LoRA adapter."""
  if isinstance(path, str):
    return path.rpartition("/")[2] in ADAPTER_NAMES
  # Also accept jax key paths (DictKey entries), as from jax.tree_util.tree_flatten_with_path.
  return bool(path) and getattr(path[-1], "key", path[-1]) in ADAPTER_NAMES


def _name(path: params_lib.Path) -> str:
  return "/".join(path)


# -- Merging adapters into the kernels ----------------------------------------------------------

def _merged_kernel(name: str, kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                   scale: float) -> jax.Array:
  """kernel [*lead, *in, *out] + lora_a [*lead, *in, rank] @ lora_b [*lead, rank, *out] * scale.

  `lead` is () unscanned and (num_layers,) scanned. Returned in the kernel's dtype, on the
  kernel's sharding.
  """
  rank = lora_a.shape[-1]
  lead = lora_a.ndim + lora_b.ndim - 2 - kernel.ndim  # 1 when scanned
  lead_shape = tuple(lora_a.shape[:max(lead, 0)])
  if (lead < 0 or tuple(lora_b.shape[:lead + 1]) != lead_shape + (rank,)
      or tuple(lora_a.shape[:-1]) + tuple(lora_b.shape[lead + 1:]) != tuple(kernel.shape)):
    raise LoraError(f"{name}: lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} do "
                    f"not fit kernel {tuple(kernel.shape)}; pass params of one model.")
  fan_in = math.prod(lora_a.shape[lead:-1])
  fan_out = math.prod(lora_b.shape[lead + 1:])
  a = jnp.reshape(lora_a, lead_shape + (fan_in, rank)).astype(jnp.float32)
  b = jnp.reshape(lora_b, lead_shape + (rank, fan_out)).astype(jnp.float32)
  # HIGHEST: TPUs otherwise multiply float32 in bfloat16 passes, and the merged model is
  # supposed to reproduce the adapted one, not approximate it.
  delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)  # [*lead, fan_in, fan_out]
  merged = kernel.astype(jnp.float32) + jnp.reshape(delta, kernel.shape) * scale
  merged = merged.astype(kernel.dtype)
  if isinstance(kernel, jax.Array):
    merged = jax.device_put(merged, kernel.sharding)
  return merged


def merge(config: ModelConfig, params: Mapping[str, Any]
          ) -> tuple[ModelConfig, params_lib.Params]:
  """Folds every adapter into its kernel and drops the adapters.

  kernel <- kernel + lora_a @ lora_b * lora_alpha / lora_rank (contracting the rank axis, per
  layer when scanned). Returns the config with lora_rank=0 and the unboxed params of that
  plain model, which computes the same logits as the adapted one (without LoRA dropout). A
  config that adds no adapters (lora_rank=0, or targets this model lacks) with params without
  adapters is a no-op.
  """
  flat = params_lib.flatten(nn.unbox(params))
  modules = sorted({p[:-1] for p in flat if is_adapter_path(p)})
  if not modules:
    # lora_targets may name only Dense layers this mlp lacks (fc with swiglu): no adapters.
    if lora_params_per_layer(config):
      raise LoraError(f"model.lora_rank={config.lora_rank} but the params hold no lora_a/lora_b; "
                      f"pass the adapted model's params (or its config with lora_rank=0).")
    return dataclasses.replace(config, lora_rank=0), params_lib.unflatten(flat)
  if not config.lora_rank:
    raise LoraError(f"params hold adapters (e.g. {_name(modules[0])}/lora_a) but "
                    f"model.lora_rank=0; pass the config they were trained with.")
  scale = config.lora_alpha / config.lora_rank
  for module in modules:
    parts = [flat.get(module + (leaf,)) for leaf in ("kernel",) + ADAPTER_NAMES]
    missing = [leaf for leaf, x in zip(("kernel",) + ADAPTER_NAMES, parts) if x is None]
    if missing:
      raise LoraError(f"{_name(module)} has no {missing[0]}; adapters need kernel, lora_a and "
                      f"lora_b side by side.")
    kernel, lora_a, lora_b = parts
    if lora_a.shape[-1] != config.lora_rank:
      raise LoraError(f"{_name(module)}/lora_a has rank {lora_a.shape[-1]} but model.lora_rank="
                      f"{config.lora_rank}; pass the config the adapters were trained with.")
    flat[module + ("kernel",)] = _merged_kernel(_name(module), kernel, lora_a, lora_b, scale)
    del flat[module + ("lora_a",)], flat[module + ("lora_b",)]
  return dataclasses.replace(config, lora_rank=0), params_lib.unflatten(flat)


# -- Adapter files ------------------------------------------------------------------------------

def save_adapters(path: str, config: ModelConfig, params: Mapping[str, Any]) -> None:
  """Writes the adapters of `params` (only those) to a safetensors file, atomically. In a
  multi-process job every process calls it (the adapters are gathered) and process 0 writes.

  Tensors are named by their '/'-joined paths; the metadata holds format, rank, alpha, dropout,
  targets and scan_layers as JSON strings.
  """
  adapters = {_name(p): v for p, v in params_lib.flatten(nn.unbox(params)).items()
              if is_adapter_path(p)}
  if not adapters:
    raise LoraError("params hold no lora_a/lora_b to save; pass the params of a model with "
                    "model.lora_rank > 0.")
  # The metadata must describe the tensors: a loader builds its model from it. lora_a ends in
  # the rank axis (lora_b's rank axis position depends on scanning).
  for name, value in sorted(adapters.items()):
    if name.endswith("lora_a") and value.shape[-1] != config.lora_rank:
      raise LoraError(f"adapter {name} has rank {value.shape[-1]} but model.lora_rank="
                      f"{config.lora_rank}; pass the config of these params.")
  metadata = {"format": FORMAT, "rank": json.dumps(config.lora_rank),
              "alpha": json.dumps(config.lora_alpha), "dropout": json.dumps(config.lora_dropout),
              "targets": json.dumps(list(config.lora_targets)),
              "scan_layers": json.dumps(config.scan_layers)}
  # Gathered on every process; safetensors needs C-contiguous buffers.
  tensors = {name: np.ascontiguousarray(sharding.to_host(value))
             for name, value in adapters.items()}
  if jax.process_index() == 0:
    files.write_bytes(path, save(tensors, metadata=metadata))
