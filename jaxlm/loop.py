"""The one training loop, shared by pretraining, classifier and instruction fine-tuning, LoRA
and sweeps.

A `Job` says what differs between them: the train step (built by `steps.make_steps` with the
job's loss and trainable params), where the first state comes from, the data iterator, how the
model is judged at eval points, and which checkpoint to keep (periodic, or the best by an eval
metric). `fit` does the rest, the same way for every job:

  restore the latest checkpoint (state + data position + loop bookkeeping) or start fresh
  -> steps, each overlapping the host's next batch; non-finite steps and loss spikes handled
     by jaxlm/spikes.py (skipped, counted, halted on, or rolled back: `_Run.roll_back`)
  -> after each step, the hooks due (jaxlm/hooks.py), in order: layer statistics
     (train.layer_stats_every), the log line (train.log_every: loss, learning rate, gradient
     norm, tokens/s, MFU), the job's evaluation (eval_every; keeps the best checkpoint),
     samples (train.sample_every), checkpoints (train.checkpoint_every), the profiler window
     (train.profile_steps), then the job's and the caller's own hooks
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
from jaxlm import hooks as hooks_lib
from jaxlm import metrics as metrics_lib
from jaxlm import run as run_lib
from jaxlm import steps as steps_lib
from jaxlm.config import Config
from jaxlm.hooks import Hook, StepInfo
from jaxlm.model import count_params
from jaxlm.spikes import Rollback, SpikeWatch, TrainingDiverged, restart_advice

__all__ = ["Hook", "StepInfo", "StopFlag", "Job", "TrainingDiverged", "fit"]


@dataclasses.dataclass
class Job:
  """One training run's job: everything the loop needs that differs between jobs."""
  config: Config
  workdir: str
  mesh: Any
  tokenizer: Any
  steps: steps_lib.Steps
  train_step: Callable            # (state, batch) -> (state, metrics), each step
  compiled_step: Any              # the step compiled ahead of time (its memory is logged)
  compile_seconds: float          # of `compiled_step`, compiled from shapes before the run
  data: Callable[[], Any]         # a fresh train iterator (next, get_state, set_state)
  init_state: Callable[[], steps_lib.TrainState]
  evaluate: Callable[[steps_lib.TrainState], dict[str, float]]
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
  # More periodic work, after the loop's own (jaxlm/hooks.py): e.g. Hook(fn, every=100).
  hooks: Sequence[hooks_lib.Hook] = ()


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


def fit(job: Job, *, stop_at_step: int | None = None, restore_step: int | None = None,
        show_progress: bool = True, hooks: Sequence[Hook] = ()) -> dict[str, Any]:
  """Trains (or resumes) `job` in its workdir to `train.num_steps`; returns the summary (also
  written to summary.json). Resumes from the newest checkpoint that restores (a damaged one is
  skipped with a warning), or from `restore_step`. stop_at_step: behave as if preempted once
  this many steps are done (tests compare resumed and uninterrupted runs with it). hooks: more
  periodic work after the job's (jaxlm/hooks.py). One trainer per workdir
  (`run.training_lock`)."""
  if restore_step is not None:
    run_lib.check_restore_step(job.workdir, restore_step)
  with run_lib.training_lock(job.workdir):
    try:
      return _fit(job, stop_at_step, restore_step, show_progress, [*job.hooks, *hooks])
    finally:  # (a run directory on an object store gets its logs, however the run ends)
      if jax.process_index() == 0:
        remote.upload(job.workdir)


def _fit(job: Job, stop_at_step: int | None, restore_step: int | None, show_progress: bool,
         extra_hooks: Sequence[Hook]) -> dict[str, Any]:
  done = run_lib.read_json(job.workdir, "summary.json")
  if (restore_step is None and done is not None and done.get("finished")
      and done.get("step", 0) >= job.config.train.num_steps):
    log(f"already trained to step {done['step']}; nothing to do.")
    return done
  run = _Run(job, restore_step, show_progress)
  hooks = [*run.hooks(), *extra_hooks]
  stop = StopFlag()
  with stop.installed():
    while True:  # once, and again after each rollback
      try:
        run.train(hooks, lambda step: stop.reached(step) or (
            stop_at_step is not None and step >= stop_at_step))
        break
      except Rollback as spike:
        run.roll_back(spike)
  return run.finish(stop.reason)


class _Run:
  """One `fit`: the state, data, bookkeeping and writers of the run, the steps, and the loop's
  own hooks (its methods)."""

  def __init__(self, job: Job, restore_step: int | None, show_progress: bool):
    self.job, self.cfg, self.workdir, self.mesh = job, job.config, job.workdir, job.mesh
    self.lead = jax.process_index() == 0
    if jax.process_count() > 1:  # every process has read the workdir (its checks) first
      multihost_utils.sync_global_devices(f"jaxlm checks of {self.workdir} done")
    run_lib.write_files(self.workdir, self.cfg, job.tokenizer, base_config=job.base_config,
                        run_source=job.run_source, class_names=job.class_names)
    keep = None if job.rank is not None else self.cfg.train.keep_checkpoints
    self.checkpointer = run_lib.checkpointer(self.workdir, keep=keep)
    self.iterator = job.data()
    resumed = self.checkpointer.restore_for_resume(job.steps.abstract_state, restore_step, log)
    if resumed is None:
      self.state, self.step, self.book = job.init_state(), 0, _Bookkeeping()
    else:
      self.step, self.state, data_state = resumed
      data_state, self.book = _restored(data_state, self.step)
      self.iterator.set_state(data_state)
      log(f"resumed from {self.checkpointer.directory}/{self.step}")
    self.saved_step = self.step
    self.writer = metrics_lib.MetricWriter(self.workdir, enabled=self.lead,
                                           wandb_project=self.cfg.train.wandb_project,
                                           config=config_lib.to_dict(self.cfg))
    self.samples_path = os.path.join(self.workdir, "samples.jsonl")
    if self.lead:  # a resumed run logs the steps after its checkpoint again
      metrics_lib.truncate_after(self.writer.path, self.step)
      metrics_lib.truncate_after(self.samples_path, self.step)
    self.num_params = count_params(self.state.params)
    self.peak = metrics_lib.peak_flops(self.cfg.model.dtype, self.cfg.data.data_dir)
    self._log_start()
    self.spikes = SpikeWatch(self.cfg, self.writer, log)
    self.data_state = self.iterator.get_state()
    self.new_best = False
    self.progress = tqdm(total=self.cfg.train.num_steps, initial=self.step, unit="step",
                         file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
                         disable=not (show_progress and self.lead))

  def _log_start(self) -> None:
    cfg, job = self.cfg, self.job
    stages = self.mesh.shape["stage"]
    pipelined = (f"; pipeline: {stages} stages x {cfg.train.pipeline_microbatches} "
                 f"microbatches, bubble "
                 f"{pipeline.bubble_fraction(stages, cfg.train.pipeline_microbatches):.0%} of "
                 f"each step" if stages > 1 else "")
    log(f"{self.num_params:,} parameters; {job.flops_per_token / 1e6:.1f} MFLOPs per token; "
        f"mesh {dict(self.mesh.shape)}{pipelined}; {job.description}workdir "
        f"{remote.display(self.workdir)}")
    log(f"compiled the train step in {job.compile_seconds:.1f}s "
        f"({steps_lib.step_bytes(job.compiled_step) / 2**30:.2f} GiB per device)")
    if self.lead and self.step == 0:
      self.writer.write(0, {"compile_seconds": job.compile_seconds,
                            "num_params": self.num_params})

  # -- the steps -----------------------------------------------------------------------------

  def train(self, hooks: Sequence[Hook], stopping: Callable[[int], bool]) -> None:
    """Steps to train.num_steps (or until `stopping(step)`), each overlapping the host's next
    batch, running the hooks due after each; Rollback out of a spike under rollback."""
    num_steps = self.cfg.train.num_steps
    self.data_state = self.iterator.get_state()
    self.spikes.restart(self.step, self.data_state)
    batch = self._next_batch() if self.step < num_steps else None
    self.mark_clock()
    while self.step < num_steps and not stopping(self.step):
      failed = self.checkpointer.save_failed() if jax.process_count() == 1 else None
      if failed is not None:  # (several processes: it surfaces at the next save)
        jax.block_until_ready(self.state)  # the step in flight finishes, then the stop
        raise failed
      self.book.tokens_seen += int(np.prod(batch["inputs"].shape))  # token slots of the batch
      self.state, metrics = self.job.train_step(self.state, batch)
      self.step += 1
      self.book.batches += 1
      self.settle()  # read step t-1's flags while step t runs
      self.spikes.step_done(self.step, metrics)
      self.data_state = self.iterator.get_state()  # exactly `step` batches consumed
      if self.step < num_steps:
        self.spikes.next_batch(self.step + 1, self.data_state)
        batch = self._next_batch()  # overlaps the step
      info = StepInfo(self.step, self.step == num_steps, self.state, metrics, self.data_state)
      if hooks_lib.run_due(hooks, info):
        self.mark_clock()  # (their time is not training time)
    self.settle()

  def _next_batch(self) -> dict[str, jax.Array]:
    return sharding.global_batch(next(self.iterator), self.mesh)

  def settle(self) -> None:
    """The pending step's non-finite loss or spike handled (jaxlm/spikes.py)."""
    self.spikes.settle(self.step, self.data_state, self.book.batches, self.saved_step)

  def mark_clock(self) -> None:
    """The start of a throughput window: (busy clock, step, tokens seen)."""
    self.clock = (metrics_lib.busy_clock(), self.step, self.book.tokens_seen)

  # -- the loop's own hooks, in order --------------------------------------------------------

  def hooks(self) -> list[Hook]:
    t, job = self.cfg.train, self.job
    due = lambda every, step: every > 0 and step % every == 0
    sampling = job.can_sample and t.sample_max_new_tokens > 0
    return [
        Hook(self.layer_stats, every=t.layer_stats_every, pauses_clock=False),
        Hook(self.log_metrics, every=t.log_every, at_end=True, pauses_clock=False),
        Hook(self.evaluate, every=job.eval_every, at_end=True),
        *([Hook(self.sample, every=t.sample_every, at_end=True)] if sampling else []),
        Hook(self.checkpoint, when=lambda step, last: due(t.checkpoint_every, step) or (
            last and job.rank is None) or self.new_best),
        *hooks_lib.profiler_hooks(os.path.join(self.workdir, "profile"),
                                  config_lib.profile_window(t.profile_steps), self.step + 1),
    ]

  def layer_stats(self, info: StepInfo) -> None:
    self.writer.write(info.step, jax.device_get(info.metrics["layer_stats"]))

  def log_metrics(self, info: StepInfo) -> None:
    """The log line: train loss, learning rate, gradient norm, tokens/s, MFU (and the data's
    own metrics) to metrics.jsonl, TensorBoard and the progress bar."""
    values = jax.device_get({k: v for k, v in info.metrics.items() if k != "layer_stats"})
    self.settle()
    elapsed = metrics_lib.busy_clock() - self.clock[0]  # (without compiles)
    tokens_per_second = (self.book.tokens_seen - self.clock[2]) / max(elapsed, 1e-9)
    key = self.job.train_loss_key
    logged = {key: float(values["train_loss"]),
              "learning_rate": float(values["learning_rate"]),
              "grad_norm": float(values["grad_norm"]), "tokens_per_second": tokens_per_second,
              "step_seconds": elapsed / max(info.step - self.clock[1], 1),
              "mfu": self.job.flops_per_token * tokens_per_second / self.peak,
              "tokens_seen": self.book.tokens_seen}
    if self.job.data_metrics is not None:
      logged.update(self.job.data_metrics(self.iterator, info.data_state))
    self.writer.write(info.step, logged)
    self.progress.update(info.step - self.progress.n)
    self.progress.set_postfix(loss=f"{logged[key]:.3f}", tok_s=f"{tokens_per_second:,.0f}",
                              mfu=f"{logged['mfu']:.0%}", refresh=False)
    self.mark_clock()

  def evaluate(self, info: StepInfo) -> None:
    """The job's evaluation; under a best-checkpoint policy, a new best is saved."""
    self.settle()  # a spike is rolled back before it is evaluated or saved
    results = self.job.evaluate(info.state)
    self.writer.write(info.step, results)
    message = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float))
    (log if self.progress.disable else self.progress.write)(f"step {info.step}: {message}")
    if self.job.rank is not None:
      rank = list(self.job.rank(results))
      if self.book.best is None or rank > self.book.best["rank"]:
        self.book.best = {"step": info.step, "rank": rank, "results": results}
        self.new_best = True

  def sample(self, info: StepInfo) -> None:
    _sample(self.cfg, info.state, self.job.tokenizer, info.step, self.samples_path)

  def checkpoint(self, info: StepInfo) -> None:
    self.new_best = False
    self.settle()  # its report belongs before the checkpoint (exact resume)
    self.save(info.step, info.data_state)

  def save(self, step: int, data_state: Any) -> None:
    """A checkpoint of the state, the data position and the bookkeeping at `step`; under a
    best-checkpoint policy, only the best and this one are kept."""
    self.checkpointer.save(step, self.state, {"iterator": data_state,
                                              "loop": dataclasses.asdict(self.book)},
                           config_lib.to_dict(self.cfg), self.job.tokenizer)
    self.saved_step = step
    if self.lead:
      remote.upload(self.workdir)  # (an object store's copy of the logs: up to this checkpoint)
    if self.job.rank is not None:
      self.checkpointer.wait()
      keep = {step, self.book.best["step"] if self.book.best else step}
      for old in self.checkpointer.all_steps():
        if old not in keep:
          self.checkpointer.delete(old)

  # -- rollback and the end --------------------------------------------------------------------

  def roll_back(self, spike: Rollback) -> None:
    """The state, data and bookkeeping of the newest checkpoint (or of the start), the data
    moved past the spike's batch and train.rollback_skip_batches more, the learning rate
    lowered for train.rollback_lr_steps steps; metrics after it dropped."""
    t = self.cfg.train
    if self.book.rollbacks >= t.max_rollbacks:
      raise TrainingDiverged(
          f"loss spike at step {spike.step} after {self.book.rollbacks} rollbacks "
          f"(train.max_rollbacks={t.max_rollbacks}): rolling back does not cure it; lower "
          f"optim.learning_rate or raise train.rollback_skip_batches, and "
          f"{restart_advice(self.saved_step)}.")
    self.checkpointer.wait()
    # Every checkpoint precedes the spike. A periodic one is preferred over a preemption's save,
    # so that a run preempted in between rolls back to the step an uninterrupted run does.
    saved = self.checkpointer.all_steps()
    periodic = [s for s in saved if t.checkpoint_every and s % t.checkpoint_every == 0]
    to_step = max(periodic or saved or [0])
    if any(s > to_step for s in saved):  # a preemption's save on the abandoned path: set aside
      self.checkpointer.discard([s for s in saved if s > to_step])
    if to_step:
      state, data_state, _ = self.checkpointer.restore(to_step, self.job.steps.abstract_state)
      book = _restored(data_state, to_step)[1]
    else:
      state, book = self.job.init_state(), _Bookkeeping()
    book.rollbacks = self.book.rollbacks + 1
    self.iterator.set_state(spike.data_after)
    for _ in range(t.rollback_skip_batches):
      next(self.iterator)
    resume_at = spike.batches_after + t.rollback_skip_batches
    skipped, book.batches = resume_at - book.batches, resume_at
    if t.rollback_lr_steps:
      until = jax.make_array_from_callback(  # (a global array: every process calls this)
          (), self.job.steps.state_shardings.rollback_lr_until,
          lambda _: np.int32(to_step + t.rollback_lr_steps))
      state = state.replace(rollback_lr_until=until)
    if self.lead:
      metrics_lib.truncate_after(self.writer.path, to_step)
      metrics_lib.truncate_after(self.samples_path, to_step)
    self.writer.write(to_step, {**spike.record, "spike_step": spike.step, "rollback": 1,
                                "rollback_to_step": to_step, "rollback_skipped_batches": skipped,
                                "rollbacks": book.rollbacks})
    log(f"rolled back to step {to_step} ({'checkpoint' if to_step else 'the start'}; rollback "
        f"{book.rollbacks} of at most {t.max_rollbacks}); skipped {skipped} batches: the data "
        f"goes on after the spike's batch"
        + (f" and {t.rollback_skip_batches} more" if t.rollback_skip_batches else "")
        + (f"; learning rate x{t.rollback_lr_factor} until step {to_step + t.rollback_lr_steps}"
           if t.rollback_lr_steps and t.rollback_lr_factor != 1.0 else ""))
    self.progress.reset(total=t.num_steps)
    self.progress.update(to_step)
    self.state, self.step, self.book, self.saved_step = state, to_step, book, to_step

  def finish(self, stop_reason: str | None) -> dict[str, Any]:
    """A last checkpoint if interrupted; under a best-checkpoint policy only the best is kept;
    the loss plot, summary.json and the job's own finish."""
    self.progress.close()
    interrupted = self.step < self.cfg.train.num_steps
    if interrupted and self.step != self.saved_step:
      self.save(self.step, self.data_state)
    self.checkpointer.wait()
    best = self.book.best
    if not interrupted and self.job.rank is not None and best is not None:
      for old in self.checkpointer.all_steps():  # the best is then the run's latest checkpoint
        if old != best["step"]:
          self.checkpointer.delete(old)
    self.writer.close()
    records = metrics_lib.read_jsonl(self.writer.path) if self.lead else []
    if self.lead:
      tokens_per_step = self.book.tokens_seen / max(self.step, 1)
      metrics_lib.plot_losses(records, tokens_per_step, os.path.join(self.workdir, "loss.png"),
                              train_key=self.job.train_loss_key)
    summary = _summary(records, self.step, interrupted, stop_reason, self.job.compile_seconds,
                       self.num_params, self.job.train_loss_key)
    if not interrupted and self.job.finish is not None:
      summary = self.job.finish(summary, best)
    if self.lead:
      files.write_json(os.path.join(self.workdir, "summary.json"), summary)
    if interrupted:
      log(f"stopped at step {self.step} ({stop_reason or 'stop_at_step'}); checkpoint saved; "
          f"rerun the same command (--workdir={remote.display(self.workdir)}) to resume.")
    return summary


def _restored(saved: Mapping[str, Any], step: int) -> tuple[Any, _Bookkeeping]:
  """(iterator state, bookkeeping) of the checkpoint of `step` from its `data` item. Older
  checkpoints hold the iterator state alone (written before the loop kept its bookkeeping
  there), or bookkeeping without `batches` (written before rollbacks existed)."""
  saved = saved if "iterator" in saved else {"iterator": saved}
  return saved["iterator"], _Bookkeeping(**{"batches": step, **(saved.get("loop") or {})})


def _sample(cfg: Config, state, tokenizer, step: int, path: str) -> None:
  t = cfg.train
  rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 1), step)
  texts = generate_lib.generate_texts(
      cfg.model, state.params, tokenizer, list(t.sample_prompts),
      generate_lib.SamplingParams(max_new_tokens=t.sample_max_new_tokens,
                                  temperature=t.sample_temperature, top_k=t.sample_top_k, rng=rng),
      truncate=True)  # (a long prompt keeps its end)
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
