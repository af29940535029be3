"""Llama-family checkpoints (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
`Qwen3ForCausalLM`) in the Hugging Face layout <-> jaxlm params.

The four share one layout; they differ in what config.json switches on: grouped-query
attention (num_key_value_heads), biases on q/k/v (Qwen2), RMSNorm of queries and keys per head
(Qwen3), a sliding window (Mistral), an explicit head_dim (Qwen3). `torch.nn.Linear` weights
are stored [out, in]; jaxlm kernels are [in, out] with heads as their own axis:

  model.embed_tokens.weight                [vocab, embed]       token_embed
  model.layers.{i}.input_layernorm.weight  [embed]              layers_{i}/attention_norm/scale
  ...self_attn.q_proj.weight     [heads * head_dim, embed]      .../attention/query/kernel
                                                                  [embed, heads, head_dim]
  ...self_attn.{k,v}_proj.weight [kv_heads * head_dim, embed]   .../attention/{key,value}/kernel
                                                                  [embed, kv_heads, head_dim]
  ...self_attn.{q,k,v}_proj.bias                                .../{query,key,value}/bias (Qwen2)
  ...self_attn.{q,k}_norm.weight [head_dim]                     .../{query,key}_norm/scale (Qwen3)
  ...self_attn.o_proj.weight     [embed, heads * head_dim]      .../attention/out/kernel
                                                                  [heads, head_dim, embed]
  model.layers.{i}.post_attention_layernorm.weight              layers_{i}/mlp_norm/scale
  ...mlp.{gate,up}_proj.weight   [mlp, embed]                   .../mlp/{gate,up}/kernel
                                                                  [embed, mlp]
  ...mlp.down_proj.weight        [embed, mlp]                   .../mlp/down/kernel [mlp, embed]
  model.norm.weight                                             final_norm/scale
  lm_head.weight                 [vocab, embed]                 lm_head [embed, vocab] (untied)

Rotary embeddings: Hugging Face's `rotate_half` layout is jaxlm's, so q/k need no permutation.
Llama 3.1+'s RoPE scaling (`rope_type: llama3`) is computed (`model.rope_scaling`). Not
imported (refused in one line): other RoPE scalings (YaRN, linear, dynamic...), alternating
local/global layers, biases on o_proj or the MLP.
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections

from jaxlm import config as config_lib
from jaxlm.config import ModelConfig
from jaxlm.convert.core import ConvertError, Entry, Family, positive_ints, register

# model_type -> (architecture, what config.json holds beyond Llama's)
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_SILU = ("silu", "swish")


def _rope(hf: dict[str, Any], path: str) -> dict[str, Any]:
  """model.rope_* from config.json (transformers < 5: rope_theta and rope_scaling; 5+:
  rope_parameters); ConvertError for a scaling jaxlm does not compute."""
  rope = dict(hf.get("rope_scaling") or {}, **(hf.get("rope_parameters") or {}))
  kind = rope.get("rope_type", rope.get("type", "default"))
  values = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
  if kind == "llama3":
    values.update(rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]),
                  rope_low_freq_factor=float(rope["low_freq_factor"]),
                  rope_high_freq_factor=float(rope["high_freq_factor"]),
                  rope_original_max_len=int(rope["original_max_position_embeddings"]))
  elif kind != "default":
    raise ConvertError(f"{path} scales its rotary embedding with rope_type {kind!r}; jaxlm "
                       f"computes plain RoPE and Llama 3's scaling only, so the imported model "
                       f"would differ.")
  return values


_LAYER_TYPES = ("sliding_attention", "full_attention")


def _window(model_type: str, hf: dict[str, Any], path: str) -> dict[str, Any]:
  """model.sliding_window and model.window_layers of a config.json, as transformers builds
  it: Mistral windows every layer; Qwen2/Qwen3 (with use_sliding_window) the layers
  `layer_types` marks, by default those from max_window_layers on."""
  window = hf.get("sliding_window") or 0
  if model_type == "llama" or (model_type != "mistral" and not hf.get("use_sliding_window")):
    return {"sliding_window": 0, "window_layers": ""}
  if not isinstance(window, int) or window < 0:
    raise ConvertError(f"{path} has sliding_window={window!r}; it must be an integer >= 0.")
  layers = hf["num_hidden_layers"]
  windowed = list(range(layers))
  if model_type != "mistral":  # (MistralForCausalLM ignores layer_types)
    types = hf.get("layer_types")
    if types is None:
      first = hf.get("max_window_layers", 28)  # (transformers' default)
      types = [_LAYER_TYPES[i < first] for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or not set(types) <= set(
        _LAYER_TYPES):
      raise ConvertError(f"{path} has layer_types={types!r}; it must list "
                         f"{' or '.join(_LAYER_TYPES)} for each of its {layers} layers.")
    windowed = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
  if not windowed or window >= hf["max_position_embeddings"]:
    return {"sliding_window": 0, "window_layers": ""}
  return {"sliding_window": window,
          "window_layers": "" if len(windowed) == layers else _ranges(windowed)}


def _ranges(indices: list[int]) -> str:
  """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
  parts, start = [], indices[0]
  for previous, index in zip(indices, indices[1:] + [None]):
    if index is None or index != previous + 1:
      parts.append(str(start) if start == previous else f"{start}-{previous}")
      start = index
  return ",".join(parts)


def read_config(model_type: str, hf: dict[str, Any], path: str) -> ml_collections.ConfigDict:
  """A full jaxlm config for the checkpoint: the model equal to config.json, windows of up to
  1,024 tokens, the rest jaxlm's defaults."""
  positive_ints(hf, path, ("hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "max_position_embeddings", "vocab_size"))
  act = hf.get("hidden_act", "silu")
  if act not in _SILU:
    raise ConvertError(f"{path} has hidden_act={act!r}; jaxlm's SwiGLU MLP uses silu.")
  for key in ("mlp_bias", "attention_bias") if model_type != "qwen3" else ("mlp_bias",):
    if hf.get(key):
      raise ConvertError(f"{path} has {key}=true (biases on o_proj / the MLP), which jaxlm's "
                         f"Llama-family models do not have.")
  if model_type == "qwen3" and hf.get("attention_bias"):
    raise ConvertError(f"{path} has attention_bias=true; Qwen3 checkpoints have none and jaxlm "
                       f"does not build it.")
  heads = hf["num_attention_heads"]
  kv_heads = hf.get("num_key_value_heads") or heads
  head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
  config = config_lib.default_config_dict()
  config.model.update(
      num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=kv_heads,
      head_size=head_dim if head_dim * heads != hf["hidden_size"] else 0,
      embed_dim=hf["hidden_size"], mlp_dim=hf["intermediate_size"],
      vocab_size=hf["vocab_size"], max_seq_len=hf["max_position_embeddings"],
      positional="rope", norm="rmsnorm", mlp="swiglu", **_rope(hf, path),
      use_bias=False, qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
      **_window(model_type, hf, path),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      init_std=float(hf.get("initializer_range", 0.02)))
  config.data.update(seq_len=min(hf["max_position_embeddings"], 1024))
  return config


def problems(model_type: str, model: ModelConfig) -> list[str]:
  """Why `model` cannot be written as this family (empty: it can)."""
  found = []
  if model.num_classes:
    found.append(f"model.num_classes={model.num_classes} (a classifier head)")
  if (model.positional, model.norm, model.mlp) != ("rope", "rmsnorm", "swiglu"):
    found.append(f"model.positional/norm/mlp={model.positional}/{model.norm}/{model.mlp} "
                 f"(the family is rope/rmsnorm/swiglu)")
  if model.use_bias:
    found.append("model.use_bias=true (the family has no biases on o_proj, the MLP or norms)")
  if model.qkv_bias != (model_type == "qwen2"):
    found.append(f"model.qkv_bias={model.qkv_bias} ({'only ' if model.qkv_bias else ''}"
                 f"Qwen2 has q/k/v biases)")
  if model.qk_norm != (model_type == "qwen3"):
    found.append(f"model.qk_norm={model.qk_norm} ({'only ' if model.qk_norm else ''}Qwen3 "
                 f"normalizes queries and keys)")
  if model.rope_scaling and model_type != "llama":
    found.append(f"model.rope_scaling={model.rope_scaling!r} (written as Llama)")
  if model.sliding_window and model_type == "llama":
    found.append(f"model.sliding_window={model.sliding_window} (written as Mistral or Qwen)")
  if model.window_layers and model_type == "mistral":
    found.append(f"model.window_layers={model.window_layers!r} (Mistral windows every layer; "
                 f"written as Qwen2/Qwen3)")
  return found


def hf_config(model_type: str, model: ModelConfig, eos_id: int) -> dict[str, Any]:
  """config.json of a jaxlm model (see `problems`)."""
  config = {
      "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type,
      "vocab_size": model.vocab_size, "hidden_size": model.embed_dim,
      "intermediate_size": model.mlp_dim, "num_hidden_layers": model.num_layers,
      "num_attention_heads": model.num_heads, "num_key_value_heads": model.kv_heads,
      "head_dim": model.head_dim, "hidden_act": "silu",
      "max_position_embeddings": model.max_seq_len, "rms_norm_eps": model.norm_eps,
      "initializer_range": model.init_std, "rope_theta": model.rope_theta,
      "rope_parameters": _rope_parameters(model),
      "tie_word_embeddings": model.tie_embeddings, "attention_dropout": 0.0,
      "bos_token_id": eos_id, "eos_token_id": eos_id, "use_cache": True,
  }
  if model_type == "llama":
    config.update(attention_bias=False, mlp_bias=False)
  elif model_type == "mistral":
    config["sliding_window"] = model.sliding_window or None
  else:
    windowed = model.windowed_layers()
    config.update(use_sliding_window=bool(windowed), sliding_window=model.sliding_window or None,
                  max_window_layers=min(windowed, default=model.num_layers),
                  layer_types=[_LAYER_TYPES[i not in windowed] for i in range(model.num_layers)])
    if model_type == "qwen3":
      config["attention_bias"] = False
  return config


def _rope_parameters(model: ModelConfig) -> dict[str, Any]:
  if model.rope_scaling == "llama3":
    return {"rope_type": "llama3", "rope_theta": model.rope_theta,
            "factor": model.rope_scaling_factor, "low_freq_factor": model.rope_low_freq_factor,
            "high_freq_factor": model.rope_high_freq_factor,
            "original_max_position_embeddings": model.rope_original_max_len}
  return {"rope_type": "default", "rope_theta": model.rope_theta}


def tensor_map(model: ModelConfig) -> list[Entry]:
  """The family's tensors of `model` (unscanned param paths)."""
  d, heads, kv, hd = model.embed_dim, model.num_heads, model.kv_heads, model.head_dim
  same = (lambda t: [t], lambda arrays: arrays[0])
  transpose = (lambda t: [t.T], lambda arrays: arrays[0].T)

  def projection(n):  # [n * hd, d] <-> [d, n, hd]
    return (lambda t: [t.T.reshape(d, n, hd)], lambda arrays: arrays[0].reshape(d, n * hd).T)

  def bias(n):  # [n * hd] <-> [n, hd]
    return (lambda t: [t.reshape(n, hd)], lambda arrays: arrays[0].reshape(n * hd))

  out = (lambda t: [t.T.reshape(heads, hd, d)], lambda arrays: arrays[0].reshape(heads * hd, d).T)
  per_layer = [
      ("input_layernorm.weight", "attention_norm/scale", same),
      ("self_attn.q_proj.weight", "attention/query/kernel", projection(heads)),
      ("self_attn.k_proj.weight", "attention/key/kernel", projection(kv)),
      ("self_attn.v_proj.weight", "attention/value/kernel", projection(kv)),
      ("self_attn.o_proj.weight", "attention/out/kernel", out),
      ("post_attention_layernorm.weight", "mlp_norm/scale", same),
      ("mlp.gate_proj.weight", "mlp/gate/kernel", transpose),
      ("mlp.up_proj.weight", "mlp/up/kernel", transpose),
      ("mlp.down_proj.weight", "mlp/down/kernel", transpose)]
  if model.qkv_bias:
    per_layer += [("self_attn.q_proj.bias", "attention/query/bias", bias(heads)),
                  ("self_attn.k_proj.bias", "attention/key/bias", bias(kv)),
                  ("self_attn.v_proj.bias", "attention/value/bias", bias(kv))]
  if model.qk_norm:
    per_layer += [("self_attn.q_norm.weight", "attention/query_norm/scale", same),
                  ("self_attn.k_norm.weight", "attention/key_norm/scale", same)]
  entries = [("model.embed_tokens.weight", ["token_embed"], *same)]
  for i in range(model.num_layers):
    entries += [(f"model.layers.{i}.{name}", [f"layers_{i}/{path}"], *fns)
                for name, path, fns in per_layer]
  entries.append(("model.norm.weight", ["final_norm/scale"], *same))
  if not model.tie_embeddings:
    entries.append(("lm_head.weight", ["lm_head"], *transpose))
  return entries


for _model_type, _architecture in _ARCHITECTURES.items():
  register(_model_type, Family(
      _model_type, _architecture, functools.partial(read_config, _model_type), tensor_map,
      functools.partial(hf_config, _model_type), functools.partial(problems, _model_type)))
