"""What every model family's converter shares: the Family interface and registry, reading
safetensors (never pickles), streaming tensors into their sharding, and writing a run or a
Hugging Face directory atomically.

A Family knows one Hugging Face architecture (config.json <-> jaxlm config, tensor names and
layouts <-> jaxlm params); `import_hf` / `export_hf` do the rest the same way for all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from jaxlm import chat, files, lora, sharding
from jaxlm import config as config_lib
from jaxlm import params as params_lib
from jaxlm import run as run_lib
from jaxlm import steps as steps_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.config import ModelConfig
from jaxlm.errors import UserError
from jaxlm.model import count_params, unstack_layers


class ConvertError(UserError):
  """A checkpoint cannot be converted; the message names the file or setting and the fix."""


# (Hugging Face tensor name, [jaxlm param paths], to_jaxlm(tensor) -> [arrays],
#  to_hf([arrays]) -> tensor)
Entry = tuple[str, list[str], Callable[[np.ndarray], list[np.ndarray]],
              Callable[[list[np.ndarray]], np.ndarray]]

PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json")


@dataclasses.dataclass(frozen=True)
class Family:
  """One Hugging Face architecture.

  read_config(hf config.json, its path) -> a full jaxlm config (ConvertError for what jaxlm
  cannot compute exactly); tensor_map(model) -> the Entries of every tensor; hf_config(model,
  eos_id) -> config.json; problems(model) -> why a jaxlm model cannot be written as this family
  (empty: it can); local_name(tensor name) -> the name tensor_map uses (None: not a parameter,
  e.g. a mask buffer); complete(model, params) -> params with what the family's tensors need
  and the model lacks (GPT-2: a position table, zero biases); export_name(name) -> the name
  written (GPT-2: with its `transformer.` prefix)."""
  name: str
  architecture: str
  read_config: Callable[[dict[str, Any], str], ml_collections.ConfigDict]
  tensor_map: Callable[[ModelConfig], list[Entry]]
  hf_config: Callable[[ModelConfig, int], dict[str, Any]]
  problems: Callable[[ModelConfig], list[str]]
  local_name: Callable[[str], str | None] = lambda name: name
  complete: Callable[[ModelConfig, dict[str, Any]], dict[str, Any]] = lambda model, params: params
  export_name: Callable[[str], str] = lambda name: name  # tensor_map's name -> the file's


FAMILIES: dict[str, Family] = {}   # model_type -> Family (gpt2.py, llama.py register theirs)


def register(model_type: str, family: Family) -> None:
  FAMILIES[model_type] = family


# -- Reading a Hugging Face directory -------------------------------------------------------------

def read_hf_config(hf_dir: str) -> dict[str, Any]:
  """config.json of a Hugging Face model directory, as a dict (ConvertError if unusable)."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise ConvertError(f"{path} does not exist; --hf_dir must be a Hugging Face model directory "
                       f"(config.json, model.safetensors or its shards, the tokenizer files).")
  try:
    hf = files.read_json(path)
  except json.JSONDecodeError as e:
    raise ConvertError(f"{path} is not JSON ({e.msg}); it must be a model's config.json.") from None
  if {"model", "train", "optim"} <= set(hf):
    raise ConvertError(f"{path} belongs to a jaxlm run directory, not a Hugging Face one; to "
                       f"write a run in the Hugging Face layout use python -m "
                       f"experiments.export_hf.")
  return hf


def family_of(hf: dict[str, Any], path: str) -> Family:
  """The Family of a config.json; ConvertError naming the architecture otherwise."""
  if hf.get("auto_map"):
    raise ConvertError(f"{path} needs trust_remote_code (auto_map: custom modelling code), which "
                       f"jaxlm never runs; import one of {', '.join(supported())} instead.")
  model_type = hf.get("model_type", "gpt2")
  if model_type not in FAMILIES:
    names = hf.get("architectures") or [model_type]
    raise ConvertError(f"{path}: architecture {names[0]} (model_type {model_type!r}) is not "
                       f"supported; jaxlm imports {', '.join(supported())}.")
  return FAMILIES[model_type]


def supported() -> list[str]:
  return sorted({f.architecture for f in FAMILIES.values()})


def positive_ints(hf: dict[str, Any], path: str, keys: tuple[str, ...]) -> None:
  for key in keys:
    if not isinstance(hf.get(key), int) or isinstance(hf.get(key), bool) or hf[key] < 1:
      raise ConvertError(f"{path} is not a usable config: {key}={hf.get(key)!r} must be a "
                         f"positive integer.")


def open_safetensors(path: str):
  """safe_open(path), a damaged or missing file as one ConvertError line."""
  try:
    return safe_open(path, framework="numpy")
  except (SafetensorError, OSError) as e:
    reason = " ".join(str(e).split())[:200]
    raise ConvertError(f"{path} cannot be read as safetensors ({reason}); download it again (an "
                       f"interrupted copy leaves a truncated file).") from None


def safetensors_files(hf_dir: str) -> dict[str, str]:
  """{tensor name: safetensors file} of a directory (one file, or shards with their index);
  ConvertError if there is none, or only a pickle."""
  single = os.path.join(hf_dir, "model.safetensors")
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(single):
    with open_safetensors(single) as f:
      return {name: single for name in f.keys()}
  if os.path.isfile(index):
    weight_map = files.read_json(index).get("weight_map", {})
    return {name: os.path.join(hf_dir, shard) for name, shard in weight_map.items()}
  pickles = [n for n in PICKLE_NAMES if os.path.isfile(os.path.join(hf_dir, n))]
  if pickles:
    raise ConvertError(
        f"{hf_dir} has only {pickles[0]}, a pickle, which jaxlm never loads; convert it to "
        f"safetensors where torch is installed: python -c \"from transformers import "
        f"AutoModelForCausalLM as M; M.from_pretrained('{hf_dir}').save_pretrained('OUT')\", "
        f"then pass --hf_dir=OUT.")
  raise ConvertError(f"{hf_dir} has no model.safetensors (or model.safetensors.index.json); "
                     f"download the model's safetensors files into it.")


def load_params(hf_dir: str, family: Family, model: ModelConfig,
                put: Callable[[str, np.ndarray], Any]) -> dict[str, Any]:
  """jaxlm params (unscanned tree) from the safetensors of `hf_dir`, read one tensor at a time.

  put(param_path, float32 array) -> the array to store, e.g. placed on devices with its
  sharding, so that the host holds one tensor at a time besides the result."""
  locations = {}
  for name, path in safetensors_files(hf_dir).items():
    local = family.local_name(name)
    if local is not None:
      locations[local] = (name, path)
  entries = family.tensor_map(model)
  expected = {hf for hf, *_ in entries}
  missing = sorted(expected - set(locations))
  if missing:
    raise ConvertError(f"{hf_dir} lacks tensor {missing[0]} ({len(missing)} missing) that its "
                       f"config.json implies; the checkpoint and config.json do not match.")
  # (a tied model's checkpoint may carry the tied copy of the embedding as lm_head.weight)
  extra = sorted(set(locations) - expected - {"lm_head.weight"})
  if extra:
    raise ConvertError(f"{hf_dir} has tensor {extra[0]} ({len(extra)} unexpected) that a "
                       f"{family.architecture} of its config.json does not; the checkpoint and "
                       f"config.json do not match.")
  flat: dict[params_lib.Path, Any] = {}
  by_file: dict[str, list[Entry]] = {}
  for entry in entries:
    by_file.setdefault(locations[entry[0]][1], []).append(entry)
  for path, file_entries in by_file.items():
    for hf_name, paths, to_jaxlm, _ in file_entries:
      # The file is opened per tensor: the memory-mapped pages a read touches stay in the
      # process until the file closes (a 1 GB shard would otherwise stay resident).
      with open_safetensors(path) as handle:
        tensor = handle.get_tensor(locations[hf_name][0])
      tensor = tensor.astype(np.float32, copy=False)
      for jax_path, array in zip(paths, to_jaxlm(tensor)):
        flat[tuple(jax_path.split("/"))] = put(jax_path, np.ascontiguousarray(array))
      del tensor
  return params_lib.unflatten(flat)


# -- Writing ------------------------------------------------------------------------------------

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
def staged(target: str, prefix: str) -> Iterator[str]:
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


def _get(tree: dict[str, Any], path: str) -> Any:
  for name in path.split("/"):
    tree = tree[name]
  return tree


def load_hf_tokenizer(hf_dir: str):
  """The tokenizer of a Hugging Face checkpoint directory (tokenizer.json, or GPT-2's vocab.json
  + merges.txt) with its chat template; ConvertError naming what is wrong."""
  present = lambda name: os.path.isfile(os.path.join(hf_dir, name))
  if present("tokenizer.model") and not (present("tokenizer.json") or present("vocab.json")):
    # Hugging Face's Llama 2/Mistral SentencePiece models differ from jaxlm's (special ids,
    # whitespace handling); transformers writes the equivalent tokenizer.json from them.
    raise ConvertError(
        f"{hf_dir} has its tokenizer only as tokenizer.model (SentencePiece); jaxlm imports "
        f"tokenizer.json: write it next to it with python -c \"from transformers import "
        f"AutoTokenizer as T; T.from_pretrained('{hf_dir}').save_pretrained('{hf_dir}')\" "
        f"(needs sentencepiece and protobuf), then import again.")
  try:
    tokenizer = tokenizer_lib.load_tokenizer(hf_dir)
  except tokenizer_lib.TokenizerError as e:
    raise ConvertError(f"{hf_dir}: {e}") from None
  try:
    tokenizer.chat_template = chat.read_hf(hf_dir)
  except chat.ChatTemplateError as e:
    raise ConvertError(str(e)) from None
  return tokenizer


def import_hf(hf_dir: str, workdir: str, mesh=None, expect: str = "") -> dict[str, Any]:
  """Makes a run directory from a Hugging Face checkpoint directory; returns a summary.

  The run holds config.json, the tokenizer and `checkpoints/0` with the params only (no
  optimizer state yet). Tensors are read one file at a time and placed straight into their
  sharding on `mesh`. Everything is written to a temporary directory beside `workdir` and renamed at
  the end: a failure leaves no half-made run. `expect`: a model_type the checkpoint must be
  (the GPT-2-only entry points)."""
  hf_dir = os.path.abspath(os.path.expanduser(hf_dir))
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(hf_dir):
    raise ConvertError(f"--hf_dir={hf_dir} is not a directory; pass a Hugging Face model "
                       f"directory (config.json, model.safetensors, the tokenizer files).")
  path = os.path.join(hf_dir, "config.json")
  hf = read_hf_config(hf_dir)
  family = family_of(hf, path)
  if expect and hf.get("model_type", "gpt2") != expect:
    raise ConvertError(f"{path} has model_type={hf.get('model_type')!r}; this command imports "
                       f"{expect} only (python -m experiments.import_hf takes "
                       f"{', '.join(supported())}).")
  config = config_lib.validate(family.read_config(hf, path))
  tokenizer = load_hf_tokenizer(hf_dir)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConvertError(f"the tokenizer in {hf_dir} has {tokenizer.vocab_size} tokens but "
                       f"config.json has vocab_size={config.model.vocab_size} embedding rows; "
                       f"they do not belong together.")
  safetensors_files(hf_dir)  # refuse pickles before anything is written
  check_new_directory(workdir, "workdir")

  mesh = sharding.make_mesh(config_lib.MeshConfig(data=-1)) if mesh is None else mesh
  abstract = steps_lib.abstract_params(config.model, mesh)

  def put(name: str, array: np.ndarray) -> jax.Array:
    target = _get(abstract, name)
    if array.shape != target.shape:
      raise ConvertError(f"{hf_dir}: the tensor for {name} has shape {array.shape}, config.json "
                         f"implies {target.shape}; the checkpoint and config.json do not match.")
    # (On devices, not host arrays: Orbax writing numpy arrays held more host memory.)
    return jax.make_array_from_callback(array.shape, target.sharding, lambda index: array[index])

  params = load_params(hf_dir, family, config.model, put)
  with staged(workdir, ".import-") as staging:
    source = {"imported_from": hf_dir, "format": f"huggingface-{family.name}"}
    run_lib.write_files(staging, config, tokenizer, run_source=source)
    # One large array written at a time: Orbax's default writes all at once, holding a host
    # copy of the whole checkpoint besides the params (import peak RSS 2.0x the checkpoint
    # instead of 1.6x for a Qwen2.5-0.5B shape; docs/models.md).
    largest = max(leaf.nbytes for leaf in jax.tree.leaves(params))
    checkpointer = run_lib.checkpointer(staging, async_save=False,
                                        save_concurrent_bytes=max(largest, 2**28) + 2**20)
    checkpointer.save(0, {"params": params}, {}, config_lib.to_dict(config), tokenizer)
    checkpointer.wait()
  return {"workdir": workdir, "architecture": family.architecture,
          "num_params": count_params(params), "num_layers": config.model.num_layers,
          "embed_dim": config.model.embed_dim, "vocab_size": config.model.vocab_size,
          "tokenizer": tokenizer.file_name}


def common_problems(model: ModelConfig) -> list[str]:
  """What no Hugging Face family jaxlm writes expresses: soft-capped logits, the skips, prefix
  tuning's slots, muP's multipliers."""
  found = []
  if model.logit_softcap:
    found.append(f"model.logit_softcap={model.logit_softcap} (no family caps its logits)")
  for knob in ("x0_skip", "value_embed"):
    if getattr(model, knob):
      found.append(f"model.{knob}=true (modded-nanogpt's skip: no family has it)")
  if model.prefix_length:
    found.append(f"model.prefix_length={model.prefix_length} (prefix tuning's key/value slots: no "
                 f"family has them, and they cannot be merged into the weights)")
  if model.width_multiplier != 1.0 or model.attention_multiplier != 1.0:
    found.append(f"model.parametrization=mup at embed_dim {model.embed_dim} != mup_base_width "
                 f"{model.mup_base_width} (the families have no logit or attention multipliers)")
  return found


def family_for(model: ModelConfig, name: str = "") -> Family:
  """The family `model` is written as: `name` (a model_type) if given, else the first family
  that expresses it exactly (GPT-2, then Llama, Mistral, Qwen2, Qwen3); ConvertError listing
  why none does."""
  candidates = [name] if name else list(FAMILIES)
  if name and name not in FAMILIES:
    raise ConvertError(f"--family={name!r}: not one of {', '.join(FAMILIES)}.")
  reasons = {}
  for model_type in candidates:
    problems = common_problems(model) + FAMILIES[model_type].problems(model)
    if not problems:
      return FAMILIES[model_type]
    reasons[model_type] = problems
  if name:
    raise ConvertError(f"this model cannot be written as {FAMILIES[name].architecture}: "
                       f"{'; '.join(reasons[name])}.")
  raise ConvertError("this model matches no Hugging Face family jaxlm writes: " + "; ".join(
      f"{FAMILIES[t].architecture}: {problems[0]}" for t, problems in reasons.items()) + ".")


def hf_tensors(family: Family, model: ModelConfig, params: dict[str, Any]
               ) -> dict[str, np.ndarray]:
  """{Hugging Face tensor name: float32 array} of jaxlm params (LoRA adapters merged into the
  kernels, scanned layers unstacked)."""
  if model.lora_rank:
    model, params = lora.merge(model, params)
  if model.scan_layers:
    params = unstack_layers(params)
  params = family.complete(model, jax.tree.map(
      lambda x: np.asarray(jax.device_get(x), np.float32), params))
  tensors = {}
  for name, paths, _, to_hf in family.tensor_map(model):
    try:
      arrays = [_get(params, p) for p in paths]
    except KeyError:
      raise ConvertError(f"the params have no {paths[0]}; they do not belong to this "
                         f"config.") from None
    tensors[family.export_name(name)] = np.ascontiguousarray(to_hf(arrays), np.float32)
  return tensors


def export_hf(model: ModelConfig, params: dict[str, Any], tokenizer, hf_dir: str,
              family_name: str = "") -> list[str]:
  """Writes config.json, model.safetensors and the tokenizer into the new directory `hf_dir`,
  atomically, in the layout `transformers` loads. Returns the file names written."""
  hf_dir = os.path.abspath(os.path.expanduser(hf_dir))
  family = family_for(model, family_name)
  check_new_directory(hf_dir, "--hf_dir")
  tensors = hf_tensors(family, model, params)
  with staged(hf_dir, ".export-") as staging:
    files.write_json(os.path.join(staging, "config.json"),
                     family.hf_config(model, tokenizer.eos_id))
    save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(tokenizer, staging, family.name)
  return sorted(os.listdir(hf_dir))


def write_tokenizer(tokenizer, directory: str, family_name: str) -> None:
  """The tokenizer as `transformers` reads it: GPT-2's vocab.json + merges.txt for GPT-2, a
  tokenizer.json (+ tokenizer_config.json naming its end-of-text token) for the others; a
  SentencePiece tokenizer is copied as tokenizer.model."""
  if not isinstance(tokenizer, tokenizer_lib.ByteLevelBPETokenizer):
    files.write_bytes(os.path.join(directory, tokenizer.file_name), tokenizer.serialize())
    return
  if family_name == "gpt2":
    tokenizer.save_gpt2_files(directory)
    return
  files.write_bytes(os.path.join(directory, "tokenizer.json"), tokenizer.serialize())
  eos = tokenizer.id_to_token(tokenizer.eos_id)
  tokenizer_config = {
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": None,
      "pad_token": eos, "model_max_length": 1 << 30, "add_bos_token": False}
  chat_template = getattr(tokenizer, "chat_template", None)
  if chat_template is not None:  # (with the token strings it was rendered with)
    tokenizer_config.update(chat_template=chat_template.template,
                            bos_token=chat_template.bos_token or None)
    tokenizer_config["eos_token"] = chat_template.eos_token or eos
  files.write_json(os.path.join(directory, "tokenizer_config.json"), tokenizer_config)
