"""GPT-2 (`GPT2LMHeadModel`) checkpoints in the Hugging Face layout <-> jaxlm params.

A Hugging Face GPT-2 directory holds `config.json`, `model.safetensors` (or shards listed in
`model.safetensors.index.json`), `vocab.json` and `merges.txt`. Only safetensors is read: a
`pytorch_model.bin` is a pickle, and jaxlm never unpickles anything.

Tensor names (an optional `transformer.` prefix), GPT-2 shape -> jaxlm parameter:

  wte.weight                [vocab, embed]         token_embed
  wpe.weight                [positions, embed]     position_embed
  h.{i}.ln_1.{weight,bias}  [embed]                layers_{i}/attention_norm/{scale,bias}
  h.{i}.attn.c_attn.weight  [embed, 3 * embed]     layers_{i}/attention/{query,key,value}/kernel
                                                     each [embed, heads, head_dim]
  h.{i}.attn.c_attn.bias    [3 * embed]            .../{query,key,value}/bias [heads, head_dim]
  h.{i}.attn.c_proj.weight  [embed, embed]         layers_{i}/attention/out/kernel
                                                     [heads, head_dim, embed]
  h.{i}.ln_2.*                                     layers_{i}/mlp_norm/*
  h.{i}.mlp.c_fc.weight     [embed, mlp]           layers_{i}/mlp/fc/kernel
  h.{i}.mlp.c_proj.weight   [mlp, embed]           layers_{i}/mlp/proj/kernel
  ln_f.*                                           final_norm/*
  lm_head.weight            [vocab, embed]         lm_head [embed, vocab] (untied models only)

GPT-2's `Conv1D` stores weights as [in, out], the layout of a Flax kernel, so they need no
transpose; only `lm_head` (a `torch.nn.Linear`, [out, in]) does. The fused `c_attn` splits into
q, k, v along its output axis. `attn.bias` / `attn.masked_bias` are causal-mask buffers, not
parameters, and are skipped.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from jaxlm import config as config_lib
from jaxlm.config import ModelConfig
from jaxlm.convert.core import ConvertError, Entry, Family, common_problems, positive_ints, register
from jaxlm.model import sinusoidal_positions

# GELU variants that are the tanh approximation jaxlm's MLP computes.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def read_config(hf: dict[str, Any], path: str) -> ml_collections.ConfigDict:
  """A full jaxlm config for GPT-2 weights: the model equal to `config.json`, windows as long
  as the context (at most 1024), the rest jaxlm's defaults."""
  activation = hf.get("activation_function", "gelu_new")
  if activation not in _TANH_GELUS:
    raise ConvertError(f"{path} has activation_function={activation!r}; jaxlm's GPT-2 MLP is the "
                       f"tanh GELU ({', '.join(_TANH_GELUS)}).")
  if hf.get("scale_attn_by_inverse_layer_idx", False) or not hf.get("scale_attn_weights", True):
    raise ConvertError(f"{path} changes the attention scaling (scale_attn_by_inverse_layer_idx / "
                       f"scale_attn_weights); jaxlm scales scores by 1/sqrt(head_dim) only.")
  positive_ints(hf, path, ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size"))
  config = config_lib.default_config_dict()
  config.model.update(
      num_layers=hf["n_layer"], num_heads=hf["n_head"], embed_dim=hf["n_embd"],
      mlp_dim=hf.get("n_inner") or 4 * hf["n_embd"], vocab_size=hf["vocab_size"],
      max_seq_len=hf["n_positions"], positional="learned", norm="layernorm", mlp="gelu",
      use_bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      init_std=float(hf.get("initializer_range", 0.02)))
  config.data.update(seq_len=min(hf["n_positions"], 1024))
  return config


def hf_config(model: ModelConfig, eos_id: int) -> dict[str, Any]:
  """The GPT-2 `config.json` of a jaxlm model (see `problems`)."""
  return {
      "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
      "vocab_size": model.vocab_size, "n_positions": model.max_seq_len,
      "n_embd": model.embed_dim, "n_layer": model.num_layers, "n_head": model.num_heads,
      "n_inner": model.mlp_dim, "activation_function": "gelu_new",
      "layer_norm_epsilon": model.norm_eps, "initializer_range": model.init_std,
      "resid_pdrop": model.dropout, "embd_pdrop": model.dropout, "attn_pdrop": model.dropout,
      "tie_word_embeddings": model.tie_embeddings, "scale_attn_weights": True,
      "bos_token_id": eos_id, "eos_token_id": eos_id, "use_cache": True,
  }


def problems(model: ModelConfig) -> list[str]:
  """Why GPT-2's architecture cannot express `model` exactly (empty: it can)."""
  found = []
  if model.num_classes:
    found.append(f"model.num_classes={model.num_classes} (a classifier head; GPT-2 is a "
                 f"language model)")
  if model.positional not in ("learned", "sinusoidal", "none"):
    found.append(f"model.positional={model.positional!r} (GPT-2 has learned absolute "
                 f"positions; sinusoidal and none export as a fixed table)")
  if model.norm != "layernorm":
    found.append(f"model.norm={model.norm!r} (GPT-2 uses layernorm)")
  if model.mlp != "gelu":
    found.append(f"model.mlp={model.mlp!r} (GPT-2 uses gelu)")
  if model.kv_heads != model.num_heads or model.qk_norm or model.sliding_window:
    found.append("grouped-query, qk-norm or sliding-window attention (GPT-2 has none)")
  if model.head_dim * model.num_heads != model.embed_dim:
    found.append(f"model.head_size={model.head_size} (GPT-2's heads split embed_dim)")
  return found


def check_exportable(model: ModelConfig) -> None:
  """ConvertError unless GPT-2's architecture can express `model` exactly."""
  found = common_problems(model) + problems(model)
  if found:
    raise ConvertError(f"this model cannot be written as GPT-2: {'; '.join(found)}.")


def tensor_map(model: ModelConfig) -> list[Entry]:
  """The GPT-2 tensors of `model` (unscanned param paths)."""
  heads, head_dim, embed = model.num_heads, model.head_dim, model.embed_dim
  same = (lambda t: [t], lambda arrays: arrays[0])

  def split_qkv(t):  # [embed, 3 * embed] or [3 * embed] -> 3 x [..., heads, head_dim]
    return [part.reshape(part.shape[:-1] + (heads, head_dim)) for part in np.split(t, 3, -1)]

  def fuse_qkv(arrays):
    return np.concatenate([a.reshape(a.shape[:-2] + (embed,)) for a in arrays], -1)

  qkv = (split_qkv, fuse_qkv)
  out_kernel = (lambda t: [t.reshape(heads, head_dim, embed)],
                lambda arrays: arrays[0].reshape(embed, embed))
  transpose = (lambda t: [t.T], lambda arrays: arrays[0].T)
  attention = [f"attention/{n}" for n in ("query", "key", "value")]

  entries = [("wte.weight", ["token_embed"], *same), ("wpe.weight", ["position_embed"], *same)]
  per_layer = [
      ("ln_1.weight", ["attention_norm/scale"], same), ("ln_1.bias", ["attention_norm/bias"], same),
      ("attn.c_attn.weight", [f"{a}/kernel" for a in attention], qkv),
      ("attn.c_attn.bias", [f"{a}/bias" for a in attention], qkv),
      ("attn.c_proj.weight", ["attention/out/kernel"], out_kernel),
      ("attn.c_proj.bias", ["attention/out/bias"], same),
      ("ln_2.weight", ["mlp_norm/scale"], same), ("ln_2.bias", ["mlp_norm/bias"], same),
      ("mlp.c_fc.weight", ["mlp/fc/kernel"], same), ("mlp.c_fc.bias", ["mlp/fc/bias"], same),
      ("mlp.c_proj.weight", ["mlp/proj/kernel"], same),
      ("mlp.c_proj.bias", ["mlp/proj/bias"], same)]
  for i in range(model.num_layers):
    entries += [(f"h.{i}.{hf}", [f"layers_{i}/{p}" for p in paths], *fns)
                for hf, paths, fns in per_layer]
  entries += [("ln_f.weight", ["final_norm/scale"], *same),
              ("ln_f.bias", ["final_norm/bias"], *same)]
  if not model.tie_embeddings:
    entries.append(("lm_head.weight", ["lm_head"], *transpose))
  return entries


def local_name(name: str) -> str | None:
  """A checkpoint's tensor name as tensor_map writes it (no `transformer.` prefix); None for
  the causal-mask buffers (not parameters)."""
  return None if name.endswith(_BUFFER_SUFFIXES) else name.removeprefix("transformer.")


def complete(model: ModelConfig, params: dict[str, Any]) -> dict[str, Any]:
  """GPT-2's tensors that a jaxlm model may lack: the position table of sinusoidal (exactly
  what the model adds) or no positions (zeros), and zero biases (use_bias=False)."""
  if model.positional == "sinusoidal":
    positions = np.arange(model.max_seq_len)[None]
    params["position_embed"] = np.asarray(sinusoidal_positions(positions, model)[0])
  elif model.positional == "none":
    params["position_embed"] = np.zeros((model.max_seq_len, model.embed_dim), np.float32)
  for _, paths, _, _ in tensor_map(model):
    for path in paths:
      *parents, leaf = path.split("/")
      node = params
      for name in parents:
        node = node.setdefault(name, {})
      if leaf == "bias" and leaf not in node:
        node[leaf] = np.zeros(_bias_shape(model, path), np.float32)
  return params


def _bias_shape(model: ModelConfig, path: str) -> tuple[int, ...]:
  """Shape of a bias (or norm bias) parameter at `path`, for models without biases."""
  module = path.rsplit("/", 2)[-2]
  if module in ("query", "key", "value"):
    return (model.num_heads, model.head_dim)
  return (model.mlp_dim,) if path.endswith("mlp/fc/bias") else (model.embed_dim,)


def export_name(name: str) -> str:
  return name if name.startswith("lm_head") else f"transformer.{name}"


FAMILY = Family("gpt2", "GPT2LMHeadModel", read_config, tensor_map, hf_config, problems,
                local_name=local_name, complete=complete, export_name=export_name)
register("gpt2", FAMILY)
