"""The one training loop, shared by pretraining, classifier and instruction fine-tuning, LoRA
and sweeps.

A `Task` says what differs between them: the train step (built by `train.make_steps` with the
task's loss and trainable params), where the first state comes from, the data iterator, how the
model is judged at eval points, and which checkpoint to keep (periodic, or the best by an eval
metric). `fit` does the rest, the same way for every task:

  restore the latest checkpoint (state + data position + loop bookkeeping) or start fresh
  -> steps, each overlapping the host's next batch; non-finite steps skipped and counted;
     loss spikes logged, skipped, halted on or rolled back (train.spike_action)
  -> every `train.log_every`: train loss, learning rate, gradient norm, tokens/s, MFU
  -> every `eval_every` (and at the end): the task's evaluation; keep the best checkpoint
  -> every `train.sample_every`: samples; every `train.checkpoint_every`: a checkpoint
  -> SIGTERM / Ctrl-C / `stop_at_step`: save and exit cleanly; a rerun resumes exactly
Only process 0 writes files (metrics.jsonl, TensorBoard, samples, summary, plots); every
process joins the checkpoint saves (each writes its shards).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxlm import config as config_lib
from jaxlm import files, pipeline, remote, sharding
from jaxlm import generate as generate_lib
from jaxlm import metrics as metrics_lib
from jaxlm import run as run_lib
from jaxlm import train as train_lib
from jaxlm.config import Config
from jaxlm.errors import UserError
from jaxlm.model import count_params


class TrainingDiverged(UserError):
  """Too many non-finite or spiking steps in a row, or a spike under spike_action=halt."""


@dataclasses.dataclass
class Task:
  """One training run's task: everything the loop needs that differs between tasks."""
  config: Config
  workdir: str
  mesh: Any
  tokenizer: Any
  steps: train_lib.Steps
  train_step: Callable            # (state, batch) -> (state, metrics), each step
  compiled_step: Any              # the step compiled ahead of time (its memory is logged)
  compile_seconds: float          # of `compiled_step`, compiled from shapes before the run
  data: Callable[[], Any]         # a fresh train iterator (next, get_state, set_state)
  init_state: Callable[[], train_lib.TrainState]
  evaluate: Callable[[train_lib.TrainState], dict[str, float]]
  eval_every: int                 # steps between evaluations (0: only at the end)
  flops_per_token: float
  # Checkpoint policy: None keeps the last `train.keep_checkpoints` periodic saves; a function
  # of an evaluation's results keeps the best evaluation's checkpoint (largest rank) instead.
  rank: Callable[[Mapping[str, float]], tuple] | None = None
  can_sample: bool = True         # a language model (samples at train.sample_every)
  train_loss_key: str = "train_loss"
  base_config: Mapping[str, Any] | None = None
  run_source: Mapping[str, Any] | None = None
  class_names: Sequence[str] | None = None
  description: str = ""
  # Called once a run has finished: (summary so far, best evaluation or None) -> summary.
  finish: Callable[[dict, dict | None], dict] | None = None
  # Logged with the train loss: (data iterator, its state after the steps so far) -> metrics
  # (e.g. a mixture's tokens per source).
  data_metrics: Callable[[Any, Any], dict[str, float]] | None = None


class StopFlag:
  """Set by SIGTERM (a preempted VM) or the first Ctrl-C; the loop saves and exits cleanly.

  In a multi-process job no Python handler is installed: JAX's preemption service catches
  SIGTERM on any process and `reached(step)` turns true on every process at the same step, so
  all of them save that step (a Python handler would replace the service's).
  """

  def __init__(self):
    self.reason: str | None = None
    self.multiprocess = jax.process_count() > 1

  def reached(self, step: int) -> bool:
    """Whether to stop before running step `step + 1` (call at every step on every process)."""
    if self.multiprocess and multihost_utils.reached_preemption_sync_point(step):
      self.reason = "SIGTERM"
    return self.reason is not None

  @contextlib.contextmanager
  def installed(self):
    if self.multiprocess or threading.current_thread() is not threading.main_thread():
      yield self
      return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, _frame):
      if self.reason is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C aborts without waiting
      self.reason = signal.Signals(signum).name

    for s in previous:
      signal.signal(s, handler)
    try:
      yield self
    finally:
      for s, h in previous.items():
        signal.signal(s, h)


def log(message: str) -> None:
  """A progress line on stderr, from process 0 only."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class _Bookkeeping:
  """What the loop must carry across a restart besides state and data: saved with every
  checkpoint (in its JSON `data` item) so that a resumed run continues exactly."""
  best: dict[str, Any] | None = None   # {"step", "rank", "results"}
  tokens_seen: int = 0
  rollbacks: int = 0                   # spike rollbacks so far
  batches: int = 0                     # batches drawn from the train data: steps + skipped ones


class _Rollback(Exception):
  """Raised out of a step's check under spike_action=rollback; `fit` rolls back and goes on."""

  def __init__(self, step: int, record: dict[str, Any], data_after: Any, batches_after: int):
    super().__init__(step)
    self.step, self.record = step, record
    self.data_after, self.batches_after = data_after, batches_after  # after the spike's batch


def fit(task: Task, *, stop_at_step: int | None = None, restore_step: int | None = None,
        show_progress: bool = True) -> dict[str, Any]:
  """Trains (or resumes) `task` in its workdir to `train.num_steps`; returns the summary (also
  written to summary.json). Resumes from the newest checkpoint that restores (a damaged one is
  skipped with a warning), or from `restore_step`. stop_at_step: behave as if preempted once
  this many steps are done (tests compare resumed and uninterrupted runs with it). One trainer
  per workdir (`run.training_lock`)."""
  if restore_step is not None:
    run_lib.check_restore_step(task.workdir, restore_step)
  with run_lib.training_lock(task.workdir):
    try:
      return _fit(task, stop_at_step, restore_step, show_progress)
    finally:  # (a run directory on an object store gets its logs, however the run ends)
      if jax.process_index() == 0:
        remote.upload(task.workdir)


def _fit(task: Task, stop_at_step: int | None, restore_step: int | None,
         show_progress: bool) -> dict[str, Any]:
  cfg, workdir, mesh = task.config, task.workdir, task.mesh
  lead = jax.process_index() == 0
  done = run_lib.read_json(workdir, "summary.json")
  if (restore_step is None and done is not None and done.get("finished")
      and done.get("step", 0) >= cfg.train.num_steps):
    log(f"already trained to step {done['step']}; nothing to do.")
    return done
  if jax.process_count() > 1:  # every process has read the workdir (its checks) before 0 writes
    multihost_utils.sync_global_devices(f"jaxlm checks of {workdir} done")
  run_lib.write_files(workdir, cfg, task.tokenizer, base_config=task.base_config,
                      run_source=task.run_source, class_names=task.class_names)
  keep = None if task.rank is not None else cfg.train.keep_checkpoints
  checkpointer = run_lib.checkpointer(workdir, keep=keep)
  iterator = task.data()
  resumed = checkpointer.restore_for_resume(task.steps.abstract_state, restore_step, log)
  if resumed is None:
    state, start, book = task.init_state(), 0, _Bookkeeping()
  else:
    start, state, data_state = resumed
    data_state, book = _restored(data_state, start)
    iterator.set_state(data_state)
    log(f"resumed from {checkpointer.directory}/{start}")
  writer = metrics_lib.MetricWriter(workdir, enabled=lead)
  samples_path = os.path.join(workdir, "samples.jsonl")
  if lead:  # a resumed run logs the steps after its checkpoint again
    metrics_lib.truncate_after(writer.path, start)
    metrics_lib.truncate_after(samples_path, start)
  num_params = count_params(state.params)
  peak = metrics_lib.peak_flops(cfg.model.dtype, cfg.data.data_dir)
  stages = mesh.shape["stage"]
  pipelined = (f"; pipeline: {stages} stages x {cfg.train.pipeline_microbatches} microbatches, "
               f"bubble {pipeline.bubble_fraction(stages, cfg.train.pipeline_microbatches):.0%} "
               f"of each step" if stages > 1 else "")
  log(f"{num_params:,} parameters; {task.flops_per_token / 1e6:.1f} MFLOPs per token; mesh "
      f"{dict(mesh.shape)}{pipelined}; {task.description}workdir {remote.display(workdir)}")

  num_steps = cfg.train.num_steps

  log(f"compiled the train step in {task.compile_seconds:.1f}s "
      f"({train_lib.step_bytes(task.compiled_step) / 2**30:.2f} GiB per device)")
  if lead and start == 0:
    writer.write(0, {"compile_seconds": task.compile_seconds, "num_params": num_params})

  def save(step: int, data_state) -> None:
    checkpointer.save(step, state, {"iterator": data_state, "loop": dataclasses.asdict(book)},
                      config_lib.to_dict(cfg), task.tokenizer)
    if lead:
      remote.upload(workdir)  # (an object store's copy of the logs: as far as this checkpoint)
    if task.rank is not None:  # keep only the best and this one
      checkpointer.wait()
      keep_steps = {step, book.best["step"] if book.best else step}
      for old in checkpointer.all_steps():
        if old not in keep_steps:
          checkpointer.delete(old)

  stop = StopFlag()
  progress = tqdm(total=num_steps, initial=start, unit="step", file=sys.stderr,
                  dynamic_ncols=True, smoothing=0.1, disable=not (show_progress and lead))
  step, saved_step = start, start

  def check_pending() -> None:
    """Counts and reports the non-finite loss or spike of the finished step in `pending` (if
    any), which it clears; raises TrainingDiverged past the limits (or at a spike under
    spike_action=halt), _Rollback under rollback."""
    nonlocal pending
    if pending is None:
      return
    (done_step, step_metrics), pending = pending, None
    values = jax.device_get({k: step_metrics[k] for k in ("nonfinite", "spike")})
    in_a_row["nonfinite"] = in_a_row["nonfinite"] + 1 if values["nonfinite"] else 0
    if values["nonfinite"]:
      log(f"step {done_step}: non-finite loss or gradient; update skipped "
          f"({in_a_row['nonfinite']} in a row)")
      limit = cfg.train.max_nonfinite_steps
      if in_a_row["nonfinite"] > limit:
        raise TrainingDiverged(
            f"training diverged: {in_a_row['nonfinite']} non-finite steps in a row at step "
            f"{done_step} (train.max_nonfinite_steps={limit}); lower optim.learning_rate or "
            f"raise optim.warmup_steps, and {_restart(saved_step)}.")
    in_a_row["spike"] = in_a_row["spike"] + 1 if values["spike"] else 0
    if values["spike"]:  # its values fetched only then: two scalars per step otherwise
      record = _report_spike(cfg, writer, done_step, jax.device_get(step_metrics),
                             positions.get(done_step), in_a_row["spike"], saved_step)
      if cfg.train.spike_action == "rollback":
        after = positions.get(done_step + 1, data_state)  # (data_state: done_step is the last)
        raise _Rollback(done_step, record, after, book.batches - (step - done_step))

  def roll_back(spike: _Rollback):
    """The state, data and bookkeeping of the newest checkpoint (or of the start), the data
    moved past the spike's batch and train.rollback_skip_batches more, the
    learning rate lowered for train.rollback_lr_steps steps; metrics after it dropped."""
    t = cfg.train
    if book.rollbacks >= t.max_rollbacks:
      raise TrainingDiverged(
          f"loss spike at step {spike.step} after {book.rollbacks} rollbacks "
          f"(train.max_rollbacks={t.max_rollbacks}): rolling back does not cure it; lower "
          f"optim.learning_rate or raise train.rollback_skip_batches, and "
          f"{_restart(saved_step)}.")
    checkpointer.wait()
    # Every checkpoint precedes the spike. A periodic one is preferred over a preemption's save,
    # so that a run preempted in between rolls back to the step an uninterrupted run does.
    saved = checkpointer.all_steps()
    periodic = [s for s in saved if t.checkpoint_every and s % t.checkpoint_every == 0]
    to_step = max(periodic or saved or [0])
    if any(s > to_step for s in saved):  # a preemption's save on the abandoned path: set aside
      checkpointer.discard([s for s in saved if s > to_step])
    if to_step:
      restored, restored_data, _ = checkpointer.restore(to_step, task.steps.abstract_state)
      restored_book = _restored(restored_data, to_step)[1]
    else:
      restored, restored_book = task.init_state(), _Bookkeeping()
    restored_book.rollbacks = book.rollbacks + 1
    iterator.set_state(spike.data_after)
    for _ in range(t.rollback_skip_batches):
      next(iterator)
    resume_at = spike.batches_after + t.rollback_skip_batches
    skipped, restored_book.batches = resume_at - restored_book.batches, resume_at
    if t.rollback_lr_steps:
      until = jax.make_array_from_callback(  # (a global array: every process calls this)
          (), task.steps.state_shardings.rollback_lr_until,
          lambda _: np.int32(to_step + t.rollback_lr_steps))
      restored = restored.replace(rollback_lr_until=until)
    if lead:
      metrics_lib.truncate_after(writer.path, to_step)
      metrics_lib.truncate_after(samples_path, to_step)
    writer.write(to_step, {**spike.record, "spike_step": spike.step, "rollback": 1,
                           "rollback_to_step": to_step, "rollback_skipped_batches": skipped,
                           "rollbacks": restored_book.rollbacks})
    log(f"rolled back to step {to_step} ({'checkpoint' if to_step else 'the start'}; rollback "
        f"{restored_book.rollbacks} of at most {t.max_rollbacks}); skipped {skipped} batches: "
        f"the data goes on after the spike's batch"
        + (f" and {t.rollback_skip_batches} more" if t.rollback_skip_batches else "")
        + (f"; learning rate x{t.rollback_lr_factor} until step {to_step + t.rollback_lr_steps}"
           if t.rollback_lr_steps and t.rollback_lr_factor != 1.0 else ""))
    progress.reset(total=num_steps)
    progress.update(to_step)
    return restored, to_step, restored_book

  def due(every: int) -> bool:
    """Whether periodic work of period `every` (0: never) falls on the current step."""
    return every > 0 and step % every == 0

  def window_mark() -> tuple[float, int, int]:
    """The start of a throughput window: (busy clock, step, tokens seen)."""
    return metrics_lib.busy_clock(), step, book.tokens_seen

  with stop.installed():
    while True:  # once, and again after each rollback
      pending, in_a_row = None, {"nonfinite": 0, "spike": 0}
      data_state = iterator.get_state()
      positions = {step + 1: data_state}  # step -> data position of its batch (recent steps)
      batch = sharding.global_batch(next(iterator), mesh) if step < num_steps else None
      window = window_mark()
      try:
        while step < num_steps:
          if stop.reached(step) or (stop_at_step is not None and step >= stop_at_step):
            break
          failed = checkpointer.save_failed() if jax.process_count() == 1 else None
          if failed is not None:  # (several processes: it surfaces at the next save)
            jax.block_until_ready(pending)  # the step in flight (if any) finishes, then the stop
            raise failed
          book.tokens_seen += int(np.prod(batch["inputs"].shape))  # token slots of the batch
          state, step_metrics = task.train_step(state, batch)
          step += 1
          book.batches += 1
          check_pending()  # read step t-1 while step t runs
          pending = (step, step_metrics)
          data_state = iterator.get_state()  # exactly `step` batches consumed
          if step < num_steps:
            positions = {s: p for s, p in positions.items() if s >= step - 1}
            positions[step + 1] = data_state
            batch = sharding.global_batch(next(iterator), mesh)  # overlaps the step

          last = step == num_steps
          if due(cfg.train.layer_stats_every):
            writer.write(step, jax.device_get(pending[1]["layer_stats"]))
          if due(cfg.train.log_every) or last:  # (layer statistics: fetched only when due)
            values = jax.device_get({k: v for k, v in pending[1].items() if k != "layer_stats"})
            check_pending()
            elapsed = metrics_lib.busy_clock() - window[0]  # (without compiles)
            seconds = elapsed / max(step - window[1], 1)
            tokens_per_second = (book.tokens_seen - window[2]) / max(elapsed, 1e-9)
            logged = {task.train_loss_key: float(values["train_loss"]),
                      "learning_rate": float(values["learning_rate"]),
                      "grad_norm": float(values["grad_norm"]),
                      "tokens_per_second": tokens_per_second, "step_seconds": seconds,
                      "mfu": task.flops_per_token * tokens_per_second / peak,
                      "tokens_seen": book.tokens_seen}
            if task.data_metrics is not None:
              logged.update(task.data_metrics(iterator, data_state))
            writer.write(step, logged)
            progress.update(step - progress.n)
            progress.set_postfix(loss=f"{logged[task.train_loss_key]:.3f}",
                                 tok_s=f"{tokens_per_second:,.0f}", mfu=f"{logged['mfu']:.0%}",
                                 refresh=False)
            window = window_mark()
          evaluating = due(task.eval_every) or last
          sampling = (task.can_sample and cfg.train.sample_max_new_tokens > 0
                      and (due(cfg.train.sample_every) or last))
          save_now = due(cfg.train.checkpoint_every) or (last and task.rank is None)
          if evaluating:
            check_pending()  # a spike is rolled back before it is evaluated or saved
            results = task.evaluate(state)
            writer.write(step, results)
            message = ", ".join(f"{k} {v:.4f}" for k, v in results.items()
                                if isinstance(v, float))
            (log if progress.disable else progress.write)(f"step {step}: {message}")
            if task.rank is not None:
              rank = list(task.rank(results))
              if book.best is None or rank > book.best["rank"]:
                book.best = {"step": step, "rank": rank, "results": results}
                save_now = True
          if sampling:
            _sample(cfg, state, task.tokenizer, step, samples_path)
          if save_now:
            check_pending()  # its report belongs before the checkpoint (exact resume)
            save(step, data_state)
            saved_step = step
          if evaluating or sampling or save_now:  # (their time is not training time)
            window = window_mark()
        check_pending()
        break
      except _Rollback as spike:
        state, step, book = roll_back(spike)
        saved_step = step
  progress.close()

  interrupted = step < num_steps
  if interrupted and step != saved_step:
    save(step, data_state)
  checkpointer.wait()
  if not interrupted and task.rank is not None and book.best is not None:
    for old in checkpointer.all_steps():  # the best is then the run's latest checkpoint
      if old != book.best["step"]:
        checkpointer.delete(old)
  writer.close()
  records = metrics_lib.read_jsonl(writer.path) if lead else []
  if lead:
    tokens_per_step = book.tokens_seen / max(step, 1)
    metrics_lib.plot_losses(records, tokens_per_step, os.path.join(workdir, "loss.png"),
                            train_key=task.train_loss_key)
  summary = _summary(records, step, interrupted, stop.reason, task.compile_seconds, num_params,
                     task.train_loss_key)
  if not interrupted and task.finish is not None:
    summary = task.finish(summary, book.best)
  if lead:
    files.write_json(os.path.join(workdir, "summary.json"), summary)
  if interrupted:
    log(f"stopped at step {step} ({stop.reason or 'stop_at_step'}); checkpoint saved; rerun "
        f"the same command (--workdir={remote.display(workdir)}) to resume.")
  return summary


def _restored(saved: Mapping[str, Any], step: int) -> tuple[Any, _Bookkeeping]:
  """(iterator state, bookkeeping) of the checkpoint of `step` from its `data` item. Older
  checkpoints hold the iterator state alone (written before the loop kept its bookkeeping
  there), or bookkeeping without `batches` (written before rollbacks existed)."""
  saved = saved if "iterator" in saved else {"iterator": saved}
  return saved["iterator"], _Bookkeeping(**{"batches": step, **(saved.get("loop") or {})})


def _report_spike(cfg: Config, writer, step: int, values: Mapping[str, Any], position: Any,
                  in_a_row: int, saved_step: int) -> dict[str, Any]:
  """Logs a spike (stderr, metrics.jsonl, TensorBoard) with the data position of its batch and
  the step's per-layer statistics (if train.layer_stats_every) and returns its record; raises
  TrainingDiverged under spike_action=halt or after max_spike_steps skips in a row. `values`:
  the step's metrics, fetched to the host."""
  t = cfg.train
  loss_ratio = float(values["train_loss"]) / max(float(values["loss_mean"]), 1e-30)
  grad_ratio = float(values["grad_norm"]) / max(float(values["grad_norm_mean"]), 1e-30)
  record = {"spike": 1, "spike_loss": values["train_loss"], "spike_loss_ratio": loss_ratio,
            "spike_grad_norm": values["grad_norm"], "spike_grad_norm_ratio": grad_ratio,
            "spike_action": t.spike_action, "spike_batch_position": position,
            **values.get("layer_stats", {})}
  writer.write(step, record)
  applied = {"log": "update applied", "rollback": "update not applied; rolling back"}.get(
      t.spike_action, "update not applied")
  log(f"step {step}: loss spike ({t.spike_action}): loss {float(values['train_loss']):.4g} = "
      f"{loss_ratio:.2f}x its running mean, gradient norm {float(values['grad_norm']):.4g} = "
      f"{grad_ratio:.2f}x; {applied}; the batch's data position: {json.dumps(position)}")
  if t.spike_action == "halt":
    raise TrainingDiverged(
        f"loss spike at step {step} (train.spike_action=halt): loss {loss_ratio:.2f}x, gradient "
        f"norm {grad_ratio:.2f}x their running means; {_restart(saved_step)}, with "
        f"train.spike_action=skip or a lower optim.learning_rate.")
  if t.spike_action == "skip" and in_a_row > t.max_spike_steps:
    raise TrainingDiverged(
        f"{in_a_row} spikes in a row at step {step} (train.max_spike_steps="
        f"{t.max_spike_steps}): the loss has moved for good, which skipping cannot fix; lower "
        f"optim.learning_rate, or raise train.spike_loss_ratio / train.spike_grad_ratio, and "
        f"{_restart(saved_step)}.")
  return record


def _restart(saved_step: int) -> str:
  """How a stopped run goes on: from its newest checkpoint, or from the start if it has none."""
  if saved_step:
    return f"rerun to resume from the last checkpoint (step {saved_step})"
  return "rerun to start over (no checkpoint was saved yet)"


def _sample(cfg: Config, state, tokenizer, step: int, path: str) -> None:
  t = cfg.train
  rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 1), step)
  texts = generate_lib.generate_texts(
      cfg.model, state.params, tokenizer, list(t.sample_prompts),
      max_new_tokens=t.sample_max_new_tokens, temperature=t.sample_temperature,
      top_k=t.sample_top_k, rng=rng, truncate=True)  # (a long prompt keeps its end)
  if jax.process_index() == 0:
    with open(path, "a") as f:
      for prompt, text in zip(t.sample_prompts, texts):
        f.write(json.dumps({"step": step, "prompt": prompt, "text": text}) + "\n")


def _summary(records, step, interrupted, reason, compile_seconds, num_params, train_key):
  def logged(key):
    return [r[key] for r in records if key in r]
  last = lambda key: logged(key)[-1] if logged(key) else None
  median = lambda key: float(np.median(logged(key))) if logged(key) else None
  return {"step": step, "finished": not interrupted, "stop_reason": reason,
          "num_params": num_params, "compile_seconds": compile_seconds,
          "train_loss": last(train_key), "eval_loss": last("eval_loss"),
          "eval_perplexity": last("eval_perplexity"),
          "eval_bits_per_byte": last("eval_bits_per_byte"),
          "median_tokens_per_second": median("tokens_per_second"), "median_mfu": median("mfu")}
