"""Run directories: create, check, open and restore, for every kind of run, in one place.

A run directory (pretrained, imported, fine-tuned, LoRA) holds

  config.json        the resolved config (`jaxlm.config.to_dict`)
  config_diff.json   (pretraining) what the CLI changed against the config file
  tokenizer.model    the tokenizer (`tokenizer.json` for GPT-2's byte-level BPE)
  source.json        (imported / fine-tuned) where the weights came from
  labels.json        (classifier) the class names, in head order
  checkpoints/N/     Orbax: state (a TrainState, or {"params": ...} for imported weights),
                     data iterator state, meta (config, tokenizer, array fingerprints)
  metrics.jsonl, summary.json, loss.png, samples.jsonl, tensorboard/   (written by the loop)

Nothing outside this module reads or writes config.json, source.json, labels.json or the
tokenizer file of a run; the loop writes the metrics files through `jaxlm.metrics`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import functools
import os
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxlm import chat, files, remote, sharding, storage
from jaxlm import checkpoint as ckpt
from jaxlm import config as config_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.config import Config
from jaxlm.errors import UserError
from jaxlm.steps import abstract_params


class RunError(UserError):
  """A run directory cannot be used as asked; the message says why and what to do."""


# Keys that may change when a run is resumed: how long and how it trains, not what it trains.
RESUMABLE_SECTIONS = ("train", "optim", "mesh")


def incompatible_keys(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Dotted keys whose change makes the saved checkpoints unusable for `new`. A key the saved
  config lacks (written before the key existed) has its default there."""
  saved = _with_defaults(config_lib.upgrade(saved), config_lib.to_dict(config_lib.Config()))
  # data.stride 0 means seq_len: a run saved with that stride written out resumes.
  changed = config_lib.diff(*[{**c, "data": {**c["data"], "stride": c["data"]["stride"]
                                              or c["data"]["seq_len"]}} for c in (saved, new)])
  # The shards a run reads may move (a disk to a bucket) or change: check_tokenizer holds them
  # to the run's tokenizer, and the data continue by batch number.
  bad = [k for k in changed if k.split(".")[0] not in RESUMABLE_SECTIONS
         and k not in ("data.data_dir", "data.tokens", "data.mixture")]
  # Another optimizer, clipping on/off, Adafactor's momentum on/off: another optimizer state.
  if saved["optim"]["name"] != new["optim"]["name"]:
    bad.append("optim.name")
  # The batch-size warmup maps steps to rows: another ramp would replay or skip data.
  for key in ("batch_warmup_tokens", "batch_warmup_start"):
    if saved["train"][key] != new["train"][key]:
      bad.append(f"train.{key}")
  if (saved["optim"]["grad_clip"] > 0) != (new["optim"]["grad_clip"] > 0):
    bad.append("optim.grad_clip")
  if new["optim"]["name"] == "adafactor" and (
      (saved["optim"]["adafactor_momentum"] > 0) != (new["optim"]["adafactor_momentum"] > 0)):
    bad.append("optim.adafactor_momentum")
  return bad


def _with_defaults(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
  """`values` with the keys it lacks taken from `defaults` (nested sections alike)."""
  out = dict(defaults)
  for key, value in values.items():
    nested = isinstance(value, Mapping) and isinstance(defaults.get(key), Mapping)
    out[key] = _with_defaults(value, defaults[key]) if nested else value
  return out


def local_workdir(workdir: str) -> str:
  """The local path commands work in: `workdir` itself, or the local mirror of a run directory
  on an object store (gs://...; jaxlm/remote.py), downloaded fresh."""
  return remote.local_workdir(workdir, jax.process_index())


def check_writable(workdir: str) -> None:
  """Refuses a workdir that is a URL (not mirrored), a file or under a directory we cannot
  write."""
  if "://" in workdir:  # (os.makedirs would make a local folder "gs:" of it)
    raise RunError(f"workdir {workdir} is a URL, which this command does not take; use a local "
                   f"--workdir (pretraining, fine-tuning, generation and evaluation take gs:// "
                   f"run directories).")
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise RunError(f"workdir {workdir} is a file, not a directory; choose another --workdir.")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise RunError(f"workdir {workdir} cannot be created: {existing} is a file; choose another "
                   f"--workdir.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise RunError(f"workdir {workdir} cannot be written ({existing} is not writable); "
                   f"choose a --workdir you can write to.")


def read_json(workdir: str, name: str) -> Any:
  """The JSON file `name` of a run directory, or None if it has none."""
  path = os.path.join(workdir, name)
  try:
    return files.read_json(path)
  except (ValueError, UnicodeDecodeError) as e:  # (json.JSONDecodeError is a ValueError)
    raise RunError(f"{path} is damaged ({e}); restore it from a copy (a checkpoint's meta holds "
                   f"the config too) or choose another --workdir.") from None


def saved_config(workdir: str) -> dict[str, Any] | None:
  """The run's config.json, or None; RunError if it is not one jaxlm wrote (another tool's)."""
  values = read_json(workdir, "config.json")
  if values is not None and not (isinstance(values, dict) and {"model", "data"} <= set(values)):
    keys = ", ".join(map(str, values)) if isinstance(values, dict) else type(values).__name__
    raise RunError(f"{os.path.join(workdir, 'config.json')} is not a jaxlm run's config (it "
                   f"holds {keys or 'nothing'}); choose another --workdir.")
  return values


def labels(workdir: str) -> list[str]:
  value = read_json(workdir, "labels.json")
  if not isinstance(value, list):
    raise RunError(f"workdir {workdir} has no labels.json, so it is not a classifier run; pass a "
                   f"run written by experiments.finetune_classifier.")
  return value


def check_resumable(workdir: str, config: Config, run_source: Mapping[str, Any] | None) -> None:
  """RunError unless `workdir` is new or holds a run of the same kind and model that `config`
  can resume: pretraining (`run_source` None) or fine-tuning from the same run and objective."""
  check_writable(workdir)
  # source.json: {"imported_from": ...} or {"fine_tuned_from": ..., "objective": ..., "data_sha256":
  # {flag: sha256 of the file}} (runs written before data_sha256 existed resume without it)
  saved_source = read_json(workdir, "source.json")
  if saved_source is not None and "task" in saved_source:  # (written before "objective")
    saved_source = {"objective" if k == "task" else k: v for k, v in saved_source.items()}
  if run_source is not None and saved_source is not None and "data_sha256" not in saved_source:
    run_source = {k: v for k, v in run_source.items() if k != "data_sha256"}
  if saved_source != (dict(run_source) if run_source is not None else None):
    other_data = {k: v for k, v in (saved_source or {}).items() if k != "data_sha256"} == {
        k: v for k, v in (run_source or {}).items() if k != "data_sha256"}
    if saved_source is not None and other_data:
      raise RunError(f"workdir {workdir} holds a fine-tuning run of other data: the files given "
                     f"now ({', '.join(sorted(run_source['data_sha256']))}) differ from those it "
                     f"trained on (their sha256 in its source.json); pass the same files to "
                     f"resume it, or choose a new --workdir. Nothing was changed.")
    if saved_source is not None and "imported_from" in saved_source:
      what = "imported weights (see its source.json)"
    elif saved_source is not None:
      what = (f"a {saved_source.get('objective')} fine-tuning run of "
              f"{saved_source.get('fine_tuned_from')}")
    elif os.path.isfile(os.path.join(workdir, "config.json")):
      what = "a pretraining run"
    elif run_source is not None and os.path.isdir(workdir) and set(os.listdir(workdir)) - {
        LOCK_FILE}:
      what = "other files"
    else:
      return
    raise RunError(f"workdir {workdir} holds {what}, which this command cannot resume; choose "
                   f"a new --workdir (or generate from, evaluate or export that run). Nothing "
                   f"was changed.")
  previous = saved_config(workdir)
  if previous is not None:
    bad = incompatible_keys(previous, config_lib.to_dict(config))
    if bad:
      stride = previous["data"]["stride"]  # (its default was 256 before it meant seq_len)
      raise RunError(
          f"workdir {workdir} holds a run with a different {', '.join(bad[:4])} "
          f"(saved config.json); resume it with the options it was started with (pretraining: "
          "--workdir alone suffices"
          + (f"; it was started with data.stride={stride}" if "data.stride" in bad else "")
          + ") or pick a new --workdir. Nothing was changed.")


def check_tokenizer(workdir: str, tokenizer) -> None:
  """RunError if `workdir` holds a run whose tokenizer is not `tokenizer` (what its data.* gives
  now: a text_files corpus that changed trains another one), so that a resume never swaps the
  token ids under trained weights."""
  if saved_config(workdir) is None:
    return
  path = os.path.join(workdir, tokenizer.file_name)
  saved = None
  if os.path.isfile(path):
    with open(path, "rb") as f:
      saved = f.read()
  if saved != tokenizer.serialize():
    config = saved_config(workdir)
    why = ("the shards of data.tokens / data.mixture were encoded with another one"
           if config.get("data", {}).get("corpus") == "tokens" else
           "a text_files corpus that changed trains a new one")
    raise RunError(f"workdir {workdir} holds a run trained with another tokenizer than data.* "
                   f"gives now ({path} differs: {why}); resume with data of the run's "
                   f"tokenizer, or choose a new --workdir. Nothing was changed.")


LOCK_FILE = ".lock"


@contextlib.contextmanager
def training_lock(workdir: str) -> Iterator[None]:
  """Holds an exclusive lock on `workdir`/.lock (process 0 of a job) while a run trains there:
  a second trainer of the same workdir (a command started twice, a sweep worker left running)
  is refused in one line instead of interleaving checkpoints and metrics. Released when the
  process ends, however it ends. A filesystem without locks is used unlocked."""
  path, held, fd = os.path.join(workdir, LOCK_FILE), True, None
  try:
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        held = False
      except OSError:  # (no locking on this filesystem, or another user's lock file)
        pass
    if jax.process_count() > 1:  # every process learns process 0's answer: none waits alone
      held = bool(multihost_utils.broadcast_one_to_all(np.int32(held)))
    if not held:
      raise RunError(f"workdir {workdir} is being trained by another process (it holds "
                     f"{path}); wait for it to finish or stop it, then rerun.")
    yield
  finally:
    if fd is not None:
      os.close(fd)


def check_restore_step(workdir: str, step: int) -> None:
  """RunError unless `workdir` has a checkpoint directory of `step` (--restore_step), checked
  before a run writes anything (whether it restores is found out when it restores)."""
  directory = remote.checkpoints_dir(workdir)
  steps = sorted(int(n) for n in storage.listdir(directory) if n.isdigit())
  if step not in steps:
    raise RunError(f"--restore_step={step}: {directory} has no such checkpoint (available "
                   f"steps: {', '.join(map(str, steps)) or 'none'}). Nothing was written.")


def write_files(workdir: str, config: Config, tokenizer, *,
                base_config: Mapping[str, Any] | None = None,
                run_source: Mapping[str, Any] | None = None,
                class_names: Sequence[str] | None = None) -> None:
  """config.json (+ config_diff.json against `base_config`), the tokenizer, source.json and
  labels.json. Process 0 writes; the others return (a shared filesystem has one copy)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  config_dict = config_lib.to_dict(config)
  files.write_json(os.path.join(workdir, "config.json"), config_dict)
  if base_config is not None:
    # A resumed run's base may be its own saved config (--workdir alone): the differences its
    # start recorded stay, with the value they now have.
    diff = read_json(workdir, "config_diff.json") or {}
    for key, change in config_lib.diff(dict(base_config), config_dict).items():
      diff[key] = {"from": diff.get(key, change)["from"]}
    for key, change in diff.items():  # every entry holds the value the run has now
      change["to"] = functools.reduce(lambda d, part: d[part], key.split("."), config_dict)
    files.write_json(os.path.join(workdir, "config_diff.json"),
                     {k: v for k, v in diff.items() if v["from"] != v["to"]})
  files.write_bytes(os.path.join(workdir, tokenizer.file_name), tokenizer.serialize())
  if getattr(tokenizer, "chat_template", None) is not None:
    chat.write_run(workdir, tokenizer.chat_template)
  if run_source is not None:
    files.write_json(os.path.join(workdir, "source.json"), dict(run_source))
  if class_names is not None:
    files.write_json(os.path.join(workdir, "labels.json"), list(class_names))


def write_eval_results(workdir: str, results: Mapping[str, Any]) -> None:
  """Merges `results` ({"TASK_Kshot": metrics}) into the run's eval_results.json, replacing
  the entries of the same keys (process 0 writes, atomically)."""
  if jax.process_index() != 0:
    return
  merged = {**(read_json(workdir, "eval_results.json") or {}), **results}
  files.write_json(os.path.join(workdir, "eval_results.json"), merged)


def checkpointer(workdir: str, keep: int = 2, async_save: bool = True,
                 save_concurrent_bytes: int | None = None) -> ckpt.Checkpointer:
  """The writing Checkpointer of a run's `checkpoints/` (ckpt.Checkpointer's arguments)."""
  return ckpt.Checkpointer(remote.checkpoints_dir(workdir), keep=keep, async_save=async_save,
                           save_concurrent_bytes=save_concurrent_bytes)


@dataclasses.dataclass
class RunDirectory:
  """A run directory opened for reading: everything but the parameters (cheap to get)."""
  workdir: str
  config: Config
  tokenizer: Any
  step: int                  # the checkpoint step to restore
  steps: list[int]           # all available steps
  checkpointer: ckpt.Checkpointer


def open_run(workdir: str, step: int | None = None, *, what: str = "workdir",
             language_model: bool = False) -> RunDirectory:
  """Reads config.json and the tokenizer, and picks the checkpoint (latest, or `step`),
  without restoring anything. RunError names the path as `what` (the option that gave it) and
  the available steps; with `language_model`, also for a classifier run (no LM head)."""
  path = local_workdir(os.path.abspath(os.path.expanduser(workdir)) if "://" not in workdir
                      else workdir)
  if not os.path.isdir(path):
    raise RunError(f"{what} {workdir} does not exist; pass a run directory (written by "
                   f"python -m experiments.pretrain, import_hf or a fine-tuning script).")
  values = saved_config(path)
  if values is None:
    raise RunError(f"{what} {workdir} has no config.json, so it is not a run directory; pass a "
                   f"directory written by python -m experiments.pretrain (or import_hf).")
  if language_model and values.get("model", {}).get("num_classes"):
    raise RunError(f"{what} {workdir} is a classifier run: its head predicts "
                   f"{values['model']['num_classes']} classes, not tokens, so it cannot generate, "
                   f"score text or be fine-tuned further; label texts with python -m "
                   f"experiments.finetune_classifier --workdir={workdir} --predict=FILE, or use "
                   f"the run it was fine-tuned from (its source.json).")
  config = config_lib.validate(values)
  checkpoints_dir = remote.checkpoints_dir(path)
  reader = None
  if storage.isdir(checkpoints_dir):
    level = logging.get_verbosity()
    logging.set_verbosity(min(level, logging.ERROR))  # Orbax warns that read-only is read-only
    try:
      reader = ckpt.Checkpointer(checkpoints_dir, read_only=True)
    finally:
      logging.set_verbosity(level)
  steps = sorted(reader.all_steps()) if reader else []
  if not steps:
    raise RunError(f"no checkpoint in {checkpoints_dir} (available steps: none); train "
                   f"first: python -m experiments.pretrain --workdir={workdir}.")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise RunError(f"step {step} is not in {checkpoints_dir}; available steps: "
                   f"{', '.join(map(str, steps))}.")
  tokenizer_paths = [os.path.join(path, name) for name in ("tokenizer.model", "tokenizer.json")]
  tokenizer_paths = [p for p in tokenizer_paths if os.path.isfile(p)]
  if tokenizer_paths:
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_paths[0])
  else:  # the checkpoint carries its tokenizer too
    meta = reader.read_meta(step)
    tokenizer = tokenizer_lib.from_bytes(
        base64.b64decode(meta["tokenizer_model_b64"]), meta.get("tokenizer_name", ""),
        f"{checkpoints_dir}/{step}/meta")
  tokenizer.chat_template = chat.read_run(path)
  return RunDirectory(path if remote.url_of(path) else workdir, config, tokenizer, step, steps,
                      reader)


def default_mesh(config: Config) -> Mesh:
  """The run's mesh if it fits the devices here, else data parallel over all of them."""
  try:
    return sharding.make_mesh(config.mesh)
  except config_lib.ConfigError:
    return sharding.make_mesh(config_lib.MeshConfig(data=-1, fsdp=1, tensor=1))


def restore_params(run: RunDirectory, mesh: Mesh | None = None) -> Any:
  """The params of `run.step` (never the optimizer state), restored against an abstract target
  with the shardings of `mesh` (default: `default_mesh`), so a checkpoint moves to another
  device count. Checksums are verified."""
  mesh = default_mesh(run.config) if mesh is None else mesh
  return run.checkpointer.restore_params(run.step, abstract_params(run.config.model, mesh))


def load_run(workdir: str, step: int | None = None, mesh: Mesh | None = None, *,
             language_model: bool = True) -> tuple[Any, Any, Any]:
  """(config, params, tokenizer) of a run directory: the latest checkpoint, or `step`.
  Reads only (safe while the run is still training). A classifier run is refused (its head
  predicts classes, not tokens) unless `language_model` is False."""
  run = open_run(workdir, step, language_model=language_model)
  return run.config, restore_params(run, mesh), run.tokenizer
