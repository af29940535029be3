"""GPT-2 checkpoints in the Hugging Face layout <-> jaxlm params.

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

import contextlib
import json
import os
import secrets
import shutil
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxlm import config as config_lib
from jaxlm import files, lora, sharding
from jaxlm import params as params_lib
from jaxlm import run as run_lib
from jaxlm import steps as steps_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.config import ModelConfig
from jaxlm.errors import UserError
from jaxlm.model import count_params, sinusoidal_positions, unstack_layers


class ConvertError(UserError):
  """A checkpoint cannot be converted; the message names the file or setting and the fix."""


# GELU variants that are the tanh approximation jaxlm's MLP computes.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json")
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


# -- Configs ------------------------------------------------------------------------------------

def read_hf_config(hf_dir: str) -> dict[str, Any]:
  """`config.json` of a Hugging Face GPT-2 directory, checked to be a GPT-2 jaxlm can run."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise ConvertError(f"{path} does not exist; --hf_dir must be a Hugging Face GPT-2 directory "
                       f"(config.json, model.safetensors, vocab.json, merges.txt).")
  try:
    hf = files.read_json(path)
  except json.JSONDecodeError as e:
    raise ConvertError(f"{path} is not JSON ({e.msg}); it must be a GPT-2 config.json.") from None
  if {"model", "train", "optim"} <= set(hf):
    raise ConvertError(f"{path} belongs to a jaxlm run directory, not a Hugging Face GPT-2 one; "
                       f"to write a run as GPT-2 use python -m experiments.export_gpt2.")
  if hf.get("model_type", "gpt2") != "gpt2":
    raise ConvertError(f"{path} has model_type={hf.get('model_type')!r}; only GPT-2 checkpoints "
                       f"(model_type 'gpt2') can be imported.")
  activation = hf.get("activation_function", "gelu_new")
  if activation not in _TANH_GELUS:
    raise ConvertError(f"{path} has activation_function={activation!r}; jaxlm's GPT-2 MLP is the "
                       f"tanh GELU ({', '.join(_TANH_GELUS)}).")
  if hf.get("scale_attn_by_inverse_layer_idx", False) or not hf.get("scale_attn_weights", True):
    raise ConvertError(f"{path} changes the attention scaling (scale_attn_by_inverse_layer_idx / "
                       f"scale_attn_weights); jaxlm scales scores by 1/sqrt(head_dim) only.")
  for key in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size"):
    if not isinstance(hf.get(key), int) or hf[key] < 1:
      raise ConvertError(f"{path} is not a usable GPT-2 config: {key}={hf.get(key)!r} must be a "
                         f"positive integer.")
  return hf


def run_config(hf: dict[str, Any]) -> ml_collections.ConfigDict:
  """A full jaxlm config for imported GPT-2 weights: the model equal to `config.json`, windows
  as long as the context (at most 1024), the rest jaxlm's defaults."""
  config = config_lib.default_config_dict()
  config.model.update(
      num_layers=hf["n_layer"], num_heads=hf["n_head"], embed_dim=hf["n_embd"],
      mlp_dim=hf.get("n_inner") or 4 * hf["n_embd"], vocab_size=hf["vocab_size"],
      max_seq_len=hf["n_positions"], positional="learned", norm="layernorm", mlp="gelu",
      use_bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      init_std=float(hf.get("initializer_range", 0.02)))
  seq_len = min(hf["n_positions"], 1024)
  config.data.update(seq_len=seq_len)
  return config


def hf_config_dict(model: ModelConfig, eos_id: int) -> dict[str, Any]:
  """The GPT-2 `config.json` of a jaxlm model (see `check_exportable`)."""
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


def check_exportable(model: ModelConfig) -> None:
  """ConvertError unless GPT-2's architecture can express `model` exactly."""
  problems = []
  if model.num_classes:
    problems.append(f"model.num_classes={model.num_classes} (a classifier head; GPT-2 is a "
                    f"language model)")
  if model.positional not in ("learned", "sinusoidal", "none"):
    problems.append(f"model.positional={model.positional!r} (GPT-2 has learned absolute "
                    f"positions; sinusoidal and none export as a fixed table)")
  if model.norm != "layernorm":
    problems.append(f"model.norm={model.norm!r} (GPT-2 uses layernorm)")
  if model.mlp != "gelu":
    problems.append(f"model.mlp={model.mlp!r} (GPT-2 uses gelu)")
  if problems:
    raise ConvertError(f"this model cannot be written as GPT-2: {'; '.join(problems)}.")


# -- Tensor mapping -----------------------------------------------------------------------------

def _get(tree: dict[str, Any], path: str) -> Any:
  for name in path.split("/"):
    tree = tree[name]
  return tree


def tensor_map(model: ModelConfig) -> list[tuple[str, list[str], Callable, Callable]]:
  """[(GPT-2 tensor name, [jaxlm param paths], to_jaxlm(tensor) -> [arrays],
  to_gpt2([arrays]) -> tensor)] for every GPT-2 tensor of `model` (unscanned param paths)."""
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


# -- Import -------------------------------------------------------------------------------------

def _open_safetensors(path: str):
  """safe_open(path), a damaged or missing file as one ConvertError line."""
  try:
    return safe_open(path, framework="numpy")
  except (SafetensorError, OSError) as e:
    reason = " ".join(str(e).split())[:200]
    raise ConvertError(f"{path} cannot be read as safetensors ({reason}); download it again (an "
                       f"interrupted copy leaves a truncated file).") from None


def safetensors_files(hf_dir: str) -> dict[str, str]:
  """{tensor name: safetensors file} of a directory; ConvertError if there is none."""
  single = os.path.join(hf_dir, "model.safetensors")
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(single):
    with _open_safetensors(single) as f:
      return {name: single for name in f.keys()}
  if os.path.isfile(index):
    weight_map = files.read_json(index).get("weight_map", {})
    return {name: os.path.join(hf_dir, shard) for name, shard in weight_map.items()}
  pickles = [n for n in _PICKLE_NAMES if os.path.isfile(os.path.join(hf_dir, n))]
  if pickles:
    raise ConvertError(
        f"{hf_dir} has only {pickles[0]}, a pickle, which jaxlm never loads; convert it to "
        f"safetensors where torch is installed: python -c \"from transformers import "
        f"GPT2LMHeadModel as M; M.from_pretrained('{hf_dir}').save_pretrained('OUT')\", then "
        f"pass --hf_dir=OUT.")
  raise ConvertError(f"{hf_dir} has no model.safetensors (or model.safetensors.index.json); "
                     f"download the GPT-2 files listed in docs/gpt2.md into it.")


def load_gpt2_params(hf_dir: str, model: ModelConfig, put: Callable[[str, np.ndarray], Any]
                     ) -> dict[str, Any]:
  """jaxlm params (unscanned tree) from the safetensors of `hf_dir`, read one tensor at a time.

  put(param_path, float32 array) -> the array to store, e.g. placed on devices with its
  sharding, so that the host holds one tensor at a time besides the result.
  """
  locations = {n.removeprefix("transformer."): (n, path)
               for n, path in safetensors_files(hf_dir).items() if not n.endswith(_BUFFER_SUFFIXES)}
  entries = tensor_map(model)
  expected = {hf for hf, *_ in entries}
  missing = sorted(expected - set(locations))
  if missing:
    raise ConvertError(f"{hf_dir} lacks tensor {missing[0]} ({len(missing)} missing) that its "
                       f"config.json implies; the checkpoint and config.json do not match.")
  extra = sorted(set(locations) - expected - {"lm_head.weight"})
  if extra:
    raise ConvertError(f"{hf_dir} has tensor {extra[0]} that GPT-2 does not; it is not a plain "
                       f"GPT2LMHeadModel checkpoint.")
  flat: dict[params_lib.Path, Any] = {}
  handles: dict[str, Any] = {}
  with contextlib.ExitStack() as stack:  # each file stays open until every tensor is read
    for hf_name, paths, to_jaxlm, _ in entries:
      name, path = locations[hf_name]
      if path not in handles:
        handles[path] = stack.enter_context(_open_safetensors(path))
      tensor = handles[path].get_tensor(name).astype(np.float32)
      for jax_path, array in zip(paths, to_jaxlm(tensor)):
        flat[tuple(jax_path.split("/"))] = put(jax_path, np.ascontiguousarray(array))
      del tensor
  return params_lib.unflatten(flat)


def check_new_directory(path: str, what: str) -> None:
  """ConvertError unless `path` is absent or an empty directory in a writable place."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ConvertError(f"{what} {path} already exists and is not empty; pick a new directory "
                       f"(nothing was written).")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  if not os.access(parent, os.W_OK):
    raise ConvertError(f"cannot write {what} {path}: {parent} is not writable.")


@contextlib.contextmanager
def _staged(target: str, prefix: str) -> Iterator[str]:
  """A new directory beside `target` (absent or empty) to write into: renamed to `target` when
  the block succeeds, deleted when it fails, so a failure leaves nothing half-written."""
  staging = os.path.join(os.path.dirname(target), prefix + secrets.token_hex(6))
  os.mkdir(staging)  # (the umask's permissions: mkdtemp would make the run private)
  try:
    yield staging
    if os.path.isdir(target):
      os.rmdir(target)  # empty (checked before anything was written)
    os.replace(staging, target)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def import_gpt2(hf_dir: str, workdir: str, mesh=None) -> dict[str, Any]:
  """Makes a run directory from a Hugging Face GPT-2 directory; returns a summary.

  The run holds config.json, the tokenizer (`tokenizer.json`) and `checkpoints/0` with the
  params only (no optimizer state yet). Everything is written to a temporary directory beside
  `workdir` and renamed at the end: a failure leaves no half-made run.
  """
  hf_dir = os.path.abspath(os.path.expanduser(hf_dir))
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(hf_dir):
    raise ConvertError(f"--hf_dir={hf_dir} is not a directory; pass a Hugging Face GPT-2 "
                       f"directory (config.json, model.safetensors, vocab.json, merges.txt).")
  config = config_lib.validate(run_config(read_hf_config(hf_dir)))
  tokenizer = tokenizer_lib.load_tokenizer(hf_dir)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConvertError(f"the tokenizer in {hf_dir} has {tokenizer.vocab_size} tokens but "
                       f"config.json has vocab_size={config.model.vocab_size}; they must match.")
  safetensors_files(hf_dir)  # refuse pickles before anything is written
  check_new_directory(workdir, "workdir")

  mesh = sharding.make_mesh(config_lib.MeshConfig(data=-1)) if mesh is None else mesh
  abstract = steps_lib.abstract_params(config.model, mesh)

  def put(path: str, array: np.ndarray) -> jax.Array:
    target = _get(abstract, path)
    if array.shape != target.shape:
      raise ConvertError(f"{hf_dir}: tensor for {path} has shape {array.shape}, config.json "
                         f"implies {target.shape}; the checkpoint and config.json do not match.")
    return jax.make_array_from_callback(array.shape, target.sharding, lambda index: array[index])

  params = load_gpt2_params(hf_dir, config.model, put)
  with _staged(workdir, ".import-") as staging:
    run_lib.write_files(staging, config, tokenizer,
                        run_source={"imported_from": hf_dir, "format": "huggingface-gpt2"})
    checkpointer = run_lib.checkpointer(staging, async_save=False)
    checkpointer.save(0, {"params": params}, {}, config_lib.to_dict(config), tokenizer)
    checkpointer.wait()
  return {"workdir": workdir, "num_params": count_params(params),
          "num_layers": config.model.num_layers, "embed_dim": config.model.embed_dim,
          "vocab_size": config.model.vocab_size, "tokenizer": tokenizer.file_name}


# -- Export -------------------------------------------------------------------------------------

def gpt2_tensors(model: ModelConfig, params: dict[str, Any]) -> dict[str, np.ndarray]:
  """{GPT-2 tensor name (with `transformer.` prefix): float32 array} of jaxlm params (of a
  model that passes `check_exportable`)."""
  if model.lora_rank:  # GPT-2 has no adapters: fold them into the kernels
    model, params = lora.merge(model, params)
  if model.scan_layers:
    params = unstack_layers(params)
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  if model.positional == "sinusoidal":  # a fixed table: exactly what the model adds
    positions = np.arange(model.max_seq_len)[None]
    params["position_embed"] = np.asarray(sinusoidal_positions(positions, model)[0])
  elif model.positional == "none":
    params["position_embed"] = np.zeros((model.max_seq_len, model.embed_dim), np.float32)

  def lookup(path: str) -> np.ndarray:
    try:
      return _get(params, path)
    except KeyError:  # use_bias=False, or a norm without bias: GPT-2's zeros are the same
      if path.endswith("bias"):
        return np.zeros(_bias_shape(model, path), np.float32)
      raise ConvertError(f"params have no {path}; they do not belong to this config.") from None

  tensors = {}
  for hf_name, paths, _, to_gpt2 in tensor_map(model):
    name = hf_name if hf_name.startswith("lm_head") else f"transformer.{hf_name}"
    tensors[name] = np.ascontiguousarray(to_gpt2([lookup(p) for p in paths]), np.float32)
  return tensors


def _bias_shape(model: ModelConfig, path: str) -> tuple[int, ...]:
  """Shape of a bias (or norm bias) parameter at `path`, for models without biases."""
  module = path.rsplit("/", 2)[-2]
  if module in ("query", "key", "value"):
    return (model.num_heads, model.head_dim)
  return (model.mlp_dim,) if path.endswith("mlp/fc/bias") else (model.embed_dim,)


def export_gpt2(model: ModelConfig, params: dict[str, Any], tokenizer, hf_dir: str) -> list[str]:
  """Writes `config.json`, `model.safetensors` and the tokenizer (GPT-2's vocab.json +
  merges.txt; a SentencePiece tokenizer is copied as `tokenizer.model`) into the new directory
  `hf_dir`, atomically. Returns the file names written."""
  hf_dir = os.path.abspath(os.path.expanduser(hf_dir))
  check_exportable(model)
  check_new_directory(hf_dir, "--hf_dir")
  tensors = gpt2_tensors(model, params)
  with _staged(hf_dir, ".export-") as staging:
    files.write_json(os.path.join(staging, "config.json"), hf_config_dict(model, tokenizer.eos_id))
    save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
    if isinstance(tokenizer, tokenizer_lib.ByteLevelBPETokenizer):
      tokenizer.save_gpt2_files(staging)
    else:
      files.write_bytes(os.path.join(staging, tokenizer.file_name), tokenizer.serialize())
  return sorted(os.listdir(hf_dir))
