"""Orbax checkpoints: train state + data iterator state + config + tokenizer, verified on restore.

A checkpoint step directory holds three items:
  state/  the TrainState arrays (Orbax, each process writes its own shards)
  data/   the data loader's state and the loop's bookkeeping (JSON)
  meta/   resolved config, tokenizer model (base64), and a fingerprint of every array
Orbax restores flipped bytes inside array files without error, so `meta` carries fingerprints
computed on device, restore recomputes them and refuses a mismatch.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxlm import storage
from jaxlm.errors import UserError
from jaxlm.steps import TrainState


class CheckpointError(UserError):
  """A checkpoint cannot be used; the message names it and what to do."""


# Elements hashed at a time: a leaf's temporaries (its positions as uint32, the products) are
# those of one chunk, not of the whole leaf (a 1 GB embedding held 2 GB more host memory while
# an import was fingerprinted).
FINGERPRINT_CHUNK = 2**24


def _fingerprint_leaf(x: jax.Array, chunk: int = FINGERPRINT_CHUNK) -> jax.Array:
  """Two uint32 hashes of an array's bits: sums of bits times position-dependent odd numbers.

  Addition mod 2**32 is exact and order-free, so the result does not depend on the sharding,
  the reduction order or the `chunk` size the sums are taken in, and because the multipliers
  are odd (invertible mod 2**32), changing any single element always changes the first hash.
  """
  unsigned = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}.get(x.dtype.itemsize)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint8)
  elif unsigned is None:
    raise CheckpointError(f"cannot fingerprint dtype {x.dtype}")
  else:
    bits = jax.lax.bitcast_convert_type(x, unsigned)
  bits = bits.reshape(-1)

  def hashes(part: jax.Array, offset: jax.Array) -> jax.Array:
    """[2] uint32: the sums over `part`, whose first element sits at position `offset`."""
    part = part.astype(jnp.uint32)
    index = offset + jnp.arange(part.size, dtype=jnp.uint32)
    h1 = jnp.sum(part * (index * jnp.uint32(2654435761) | jnp.uint32(1)), dtype=jnp.uint32)
    mixed = part ^ (part >> 15)
    h2 = jnp.sum(mixed * (index * jnp.uint32(40503) + jnp.uint32(0x9E3779B1) | jnp.uint32(1)),
                 dtype=jnp.uint32)
    return jnp.stack([h1, h2])

  whole_chunks = bits.size // chunk
  # The tail after the whole chunks (everything, for a leaf smaller than a chunk)...
  total = hashes(bits[whole_chunks * chunk:], jnp.uint32(whole_chunks * chunk))
  if whole_chunks:  # ... plus one chunk at a time
    def add_chunk(i, acc):
      start = i * chunk
      part = jax.lax.dynamic_slice_in_dim(bits, start, chunk)
      return acc + hashes(part, start.astype(jnp.uint32))
    total = jax.lax.fori_loop(0, whole_chunks, add_chunk, total)
  return total


# Arrays are fingerprinted in groups of up to this many bytes, one compiled program per group,
# each fetched before the next starts: the temporaries of one group at a time, not of the
# whole state (a 0.5B model's import held 3 GB more host memory with one program for all), and
# never two programs in flight (with several processes they hold collectives, which can pair
# up differently per process: a 4-process save hung that way). A small state is one group.
FINGERPRINT_GROUP_BYTES = 256 * 2**20
_fingerprint_group = jax.jit(lambda leaves: [_fingerprint_leaf(x) for x in leaves])


def fingerprints(tree: Any) -> dict[str, list[int]]:
  """{'params/.../kernel': [h1, h2], ...} for every array leaf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  groups: list[list[tuple[Any, Any]]] = [[]]
  size = 0
  for path, leaf in flat:
    if groups[-1] and size + leaf.nbytes > FINGERPRINT_GROUP_BYTES:
      groups.append([])
      size = 0
    groups[-1].append((path, leaf))
    size += leaf.nbytes
  out = {}
  for group in groups:
    hashes = jax.device_get(_fingerprint_group([leaf for _, leaf in group]))
    for (path, _), value in zip(group, hashes):
      out[jax.tree_util.keystr(path, simple=True, separator="/")] = [int(v) for v in value]
  return out


# An OS error inside an Orbax/TensorStore message: "... [os_error_code='27']" (TensorStore puts
# its spec between the error's text and the code, so the text comes from the code) or
# "[Errno 28] No space left on device".
_OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")
_OS_ERROR = re.compile(r"\[Errno \d+\] [^:'\"]{1,80}")


def _save_whole_shards_on_cpu() -> None:
  """On the CPU backend, Orbax saves each replicated array from one replica, whole.

  Its default (TPU and CPU; on GPU it is off) splits every replicated array into one slice per
  replica so that the replicas copy their parts to the host in parallel: one sliced XLA program
  per array and replica. On CPU devices, which share the host's memory, there is nothing to
  parallelize: a step's save of 222 small arrays replicated on 8 CPU devices took 0.83 s (2.0 s
  the first time, compiling the slices) with it and 0.33 s without. Process-wide (Orbax's type
  handler registry is global); a handler the user registered is left alone.
  """
  if jax.default_backend() != "cpu":
    return
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  if type(handler) is ocp.type_handlers.ArrayHandler and handler._use_replica_parallel:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False,
            array_metadata_store=getattr(handler, "_array_metadata_store", None)),
        override=True)


class Checkpointer:
  """Async Orbax CheckpointManager for one run directory's `checkpoints/`."""

  def __init__(self, directory: str, keep: int = 2, async_save: bool = True,
               read_only: bool = False, save_concurrent_bytes: int | None = None):
    """read_only: only list and restore (generation, evaluation): never creates the directory,
    deletes old steps, or cleans up the unfinished saves of a run that is still training.
    save_concurrent_bytes: at most this many bytes of arrays being written at once (at least
    the largest array); Orbax's default lets all of them, which for a checkpoint written once
    from host memory (an import) costs about its size again in transient host memory."""
    _save_whole_shards_on_cpu()
    self.directory = directory if storage.is_url(directory) else os.path.abspath(directory)
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                             save_interval_steps=0,
                                             cleanup_tmp_directories=False)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
          cleanup_tmp_directories=True)
    if save_concurrent_bytes is None:
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "data", "meta"))
    else:
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
          "state": ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_bytes / 1e9),
          "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
    self._saving: int | None = None  # the step of an async save not yet known to have worked

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_state: dict[str, Any],
           config_dict: dict[str, Any], tokenizer) -> None:
    """Starts an async save of `state` at `step` (returns before the write completes).

    `state` is a TrainState, or `{"params": params}` for a run made of imported weights (no
    optimizer yet); `restore_params` reads either.
    """
    self.wait()  # a failure of the previous save surfaces here, naming its step
    tokenizer_b64 = base64.b64encode(tokenizer.serialize()).decode("ascii")
    meta = {"step": int(step), "config": config_dict, "fingerprints": fingerprints(state),
            "tokenizer_model_b64": tokenizer_b64, "tokenizer_name": tokenizer.file_name}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # e.g. no space left, permission denied
      raise self._save_error(step, e) from e
    self._saving = step

  def save_failed(self) -> CheckpointError | None:
    """The error of an async save that has finished and failed (once), else None. Cheap: a
    training loop may call it every step to stop soon after a save fails."""
    if self._saving is None or self.manager.is_saving_in_progress():
      return None
    try:
      self.wait()  # finished: returns at once, or raises its error
    except CheckpointError as error:
      return error
    return None

  def _save_error(self, step: int | None, error: Exception) -> CheckpointError:
    committed = sorted(s for s in self.all_steps() if s != step)
    resume = f"checkpoint {committed[-1]}" if committed else "the start (no checkpoint was saved)"
    what = "a checkpoint" if step is None else f"checkpoint {step}"
    cause = " ".join(str(error).split())
    if len(cause) > 300:  # keep the OS error (no space, ...) wherever Orbax/TensorStore put it
      code, os_error = _OS_ERROR_CODE.search(cause, 100), _OS_ERROR.search(cause, 100)
      kept = (f"{os.strerror(int(code.group(1)))} [os_error_code={code.group(1)}]" if code
              else os_error.group(0).strip() if os_error else cause[-200:])
      cause = cause[:100] + " ... " + kept
    return CheckpointError(
        f"saving {what} in {self.directory} failed ({type(error).__name__}: {cause}); free disk "
        f"space or make the directory writable, then rerun with the same --workdir: it resumes "
        f"from {resume}.")

  def delete(self, step: int) -> None:
    """Removes a committed step (call on every process)."""
    self.manager.delete(step)

  def wait(self) -> None:
    """Blocks until pending saves are committed (before exit, or before trusting all_steps);
    CheckpointError if one failed."""
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:
      raise self._save_error(self._saving, e) from e
    finally:
      self._saving = None

  def read_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: TrainState
              ) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
    """(state with the shardings of `abstract_state`, data iterator state, meta).

    Restoring against an abstract target carrying the current shardings lets a checkpoint move
    to another mesh or device count.
    """
    where = storage.join(self.directory, str(step))
    try:
      # A checkpoint written before TrainState gained a field (spike_stats, rollback_lr_until)
      # lacks it: the fields it has are restored and the others start afresh (zeros).
      saved = {name.split("/")[0] for name in self.read_meta(step).get("fingerprints", {})}
      fields = [f.name for f in dataclasses.fields(TrainState)]
      missing = [f for f in fields if saved and f not in saved]
      target = ({f: getattr(abstract_state, f) for f in fields if f not in missing}
                if missing else abstract_state)
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types; one clear line for the user
      raise CheckpointError(
          f"checkpoint {where} cannot be restored into this config ({type(e).__name__}: "
          f"{str(e).splitlines()[0][:300]}); use a workdir whose config matches, or delete "
          f"that step to fall back to an earlier one.") from e
    state, meta = restored["state"], restored["meta"]
    _verify(where, meta, state)
    if missing:
      fresh = {f: jax.device_put(jnp.zeros(getattr(abstract_state, f).shape,
                                           getattr(abstract_state, f).dtype),
                                 getattr(abstract_state, f).sharding) for f in missing}
      state = TrainState(**state, **fresh)
    return state, restored["data"], meta

  def restore_for_resume(self, abstract_state: TrainState, restore_step: int | None = None,
                         warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
                         ) -> tuple[int, TrainState, dict[str, Any]] | None:
    """(step, state, data iterator state) to resume from, or None when there is no checkpoint.

    The newest checkpoint that restores and verifies wins: a damaged one (flipped bytes,
    truncated or missing files: a kill during a write, a bad disk) is skipped with a warning
    naming it, and the run falls back to the one before. `restore_step` picks a step instead
    (no fallback). Newer steps than the one restored are moved to `checkpoints_discarded/`
    next to `checkpoints/` (kept, not deleted), so the resumed run can save those steps again.
    Raises CheckpointError when no checkpoint can be restored.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if restore_step is not None and restore_step not in steps:
      raise CheckpointError(
          f"--restore_step={restore_step}: {self.directory} has no such checkpoint (available "
          f"steps: {', '.join(map(str, sorted(steps))) or 'none'}).")
    failures = []
    for step in steps if restore_step is None else [restore_step]:
      try:
        state, data_state, _ = self.restore(step, abstract_state)
      except CheckpointError as error:
        if restore_step is not None:
          raise
        warn(f"warning: skipping checkpoint {step}: {error}")
        failures.append(str(error))
        continue
      newer = [s for s in steps if s > step]
      if newer:
        self.discard(newer)
        warn(f"moved the checkpoints after step {step} ({', '.join(map(str, newer))}) to "
             f"{self.discarded_directory}")
      return step, state, data_state
    if failures:
      raise CheckpointError(
          f"none of the {len(failures)} checkpoints in {self.directory} can be restored "
          f"(newest: {failures[0]}); move them away to train from scratch.")
    return None

  @property
  def discarded_directory(self) -> str:
    return storage.join(storage.dirname(self.directory), "checkpoints_discarded")

  def discard(self, steps: list[int]) -> None:
    """Moves committed steps out of the manager's directory (process 0; all processes wait)."""
    if jax.process_index() == 0:
      storage.makedirs(self.discarded_directory)
      for step in steps:
        target = storage.join(self.discarded_directory, str(step))
        suffix = 1
        while storage.exists(target):  # discarded before: keep both
          target, suffix = storage.join(self.discarded_directory, f"{step}.{suffix}"), suffix + 1
        storage.move(storage.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxlm discarded checkpoints {steps}")
    self.manager.reload()

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the params of a checkpoint (a TrainState's or an imported `{"params": ...}`), with
    the shardings of `abstract_params`; the optimizer state is never read."""
    where = storage.join(self.directory, str(step))
    target = {"params": abstract_params}
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
              partial_restore=True),
          meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(
          f"the params of checkpoint {where} do not fit this model config "
          f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); check the run's config.json.") \
          from e
    _verify(where, restored["meta"], restored["state"])
    return restored["state"]["params"]


def _verify(where: str, meta: dict[str, Any], tree: Any) -> None:
  """CheckpointError unless every restored array matches the fingerprint saved with it."""
  expected, actual = meta.get("fingerprints", {}), fingerprints(tree)
  bad = sorted(name for name in actual if expected.get(name) != actual[name])
  if bad:
    raise CheckpointError(
        f"checkpoint {where} is corrupted: {len(bad)} arrays differ from the fingerprints "
        f"written with them (first: {bad[0]}); delete that step directory to resume from an "
        f"earlier checkpoint.")

