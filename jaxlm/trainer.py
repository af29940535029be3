"""The pretraining loop: data, steps, eval, samples, metrics, checkpoints, preemption, resume.

`train(config, workdir)` is what `experiments/pretrain.py` calls. Everything that can be wrong
with the inputs (config, corpus, tokenizer, mesh, workdir) is checked in `prepare` before any
compilation and before the run directory is touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np

from jaxlm import checkpoint as ckpt
from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import evaluate as evaluate_lib
from jaxlm import files
from jaxlm import generate as generate_lib
from jaxlm import metrics as metrics_lib
from jaxlm import sharding
from jaxlm import tokenizer as tokenizer_lib
from jaxlm import train as train_lib
from jaxlm.config import Config
from jaxlm.model import count_params, flops_per_token, resolve_attention_impl


class RunError(ValueError):
  """The run directory cannot be used as asked; the message says why and what to do."""


class TrainingDiverged(RuntimeError):
  """Too many non-finite steps in a row."""


# Keys that may change when a run is resumed: how long and how it trains, not what it trains.
RESUMABLE_SECTIONS = ("train", "optim", "mesh")


def incompatible_keys(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Dotted keys whose change makes the saved checkpoints unusable for `new`."""
  changed = config_lib.diff(saved, new)
  bad = [k for k in changed if k.split(".")[0] not in RESUMABLE_SECTIONS and k != "data.data_dir"]
  # Clipping on/off changes the optimizer state's structure.
  if (saved["optim"]["grad_clip"] > 0) != (new["optim"]["grad_clip"] > 0):
    bad.append("optim.grad_clip")
  return bad


def check_workdir(workdir: str) -> None:
  """Refuses a workdir that is a file or lies under a directory we cannot write."""
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
  if os.path.isfile(os.path.join(path, "source.json")):  # written by convert.import_gpt2
    raise RunError(f"workdir {workdir} holds imported or fine-tuned weights without optimizer "
                   f"state (see its source.json), so pretraining cannot resume it; generate "
                   f"from, evaluate or export it, or choose another --workdir. Nothing was "
                   f"changed.")


def saved_config(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


@dataclasses.dataclass
class Prepared:
  """Everything a run needs, resolved and checked before anything is written."""
  config: Config
  workdir: str
  tokenizer: Any
  tokenizer_path: str
  train_tokens: np.ndarray
  eval_tokens: np.ndarray
  mesh: Any
  steps: train_lib.Steps
  train_step: Any          # the train step compiled ahead of time for this run's shapes
  compile_seconds: float


def prepare(config: Config, workdir: str) -> Prepared:
  """All checks that can fail on bad input, in the order a user would fix them."""
  check_workdir(workdir)
  previous = saved_config(workdir)
  if previous is not None:
    bad = incompatible_keys(previous, config_lib.to_dict(config))
    if bad:
      raise RunError(
          f"workdir {workdir} holds a run with a different {', '.join(bad[:4])} "
          f"(saved config.json); resume it with its own config (--workdir alone) or pick a new "
          f"--workdir. Nothing was changed.")
  if config.model.num_classes or config.model.lora_rank:
    field = "num_classes" if config.model.num_classes else "lora_rank"
    raise config_lib.ConfigError(
        f"model.{field} is for fine-tuning (experiments.finetune_classifier / "
        f"finetune_instruct); pretraining trains a whole language model: set it to 0.")
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.train.global_batch_size, config.train.microbatches, mesh)
  tokenizer, tokenizer_path = tokenizer_lib.get_tokenizer(config.data, config.model.vocab_size)
  if tokenizer.vocab_size != config.model.vocab_size:
    raise config_lib.ConfigError(
        f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens but model.vocab_size="
        f"{config.model.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size}.")
  train_tokens = data_lib.load_tokens(config.data, "train", tokenizer)
  eval_tokens = data_lib.load_tokens(config.data, "validation", tokenizer)
  data_lib.check_enough_tokens(train_tokens, config.data, "train", 1)
  data_lib.check_enough_tokens(
      eval_tokens, dataclasses.replace(config.data, stride=config.data.seq_len), "validation", 1)
  if config.train.compilation_cache:
    train_lib.use_compilation_cache(os.path.join(config.data.data_dir, "jax_cache"))
  steps = train_lib.make_steps(config, mesh)
  # Compiled here, from shapes alone, so that a step that cannot fit in memory is refused
  # before the run directory is touched.
  compile_start = time.perf_counter()
  train_step = steps.compile_train(steps.abstract_state, train_lib.abstract_batch(config, mesh))
  compile_seconds = time.perf_counter() - compile_start
  train_lib.check_fits(train_lib.step_bytes(train_step), train_lib.device_memory_bytes(mesh),
                       config)
  return Prepared(config, workdir, tokenizer, tokenizer_path, train_tokens, eval_tokens, mesh,
                  steps, train_step, compile_seconds)


class StopFlag:
  """Set by SIGTERM (a preempted VM) or the first Ctrl-C; the loop saves and exits cleanly.

  In a multi-process job no Python handler is installed: JAX's preemption service catches
  SIGTERM on any process and `reached(step)` turns true on every process at the same step, so
  all of them save that step (a Python handler would replace the service's).
  """

  def __init__(self):
    self.reason: str | None = None
    self.multiprocess = jax.process_count() > 1

  def __bool__(self) -> bool:
    return self.reason is not None

  def reached(self, step: int) -> bool:
    """Whether to stop before running step `step + 1` (call at every step on every process)."""
    if self.multiprocess:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.reason = "SIGTERM"
    return bool(self)

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


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def train(config: Config, workdir: str, *, base_config: Mapping[str, Any] | None = None,
          stop_at_step: int | None = None, show_progress: bool = True) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir` to `config.train.num_steps`.

  base_config: the config the run was derived from (e.g. the config file before CLI overrides),
    written as `config_diff.json`. stop_at_step: behave as if preempted once this many steps are
    done (tests use it to compare resumed and uninterrupted runs).
  Returns the final summary (also written to `summary.json`).
  """
  run = prepare(config, workdir)
  return _Loop(run, base_config, stop_at_step, show_progress).run()


class _Loop:
  """One training run's mutable bookkeeping; `run()` is the whole loop."""

  def __init__(self, run: Prepared, base_config, stop_at_step, show_progress):
    self.run_info = run
    self.config = run.config
    self.lead = jax.process_index() == 0
    self.base_config = base_config
    self.stop_at_step = stop_at_step
    self.show_progress = show_progress and self.lead
    self.tokens_per_step = self.config.train.global_batch_size * self.config.data.seq_len
    self.byte_lengths = run.tokenizer.byte_lengths()

  # -- setup ---------------------------------------------------------------------------------
  def write_run_files(self) -> None:
    workdir, config_dict = self.run_info.workdir, config_lib.to_dict(self.config)
    if not self.lead:
      return
    os.makedirs(workdir, exist_ok=True)
    files.write_json(os.path.join(workdir, "config.json"), config_dict)
    if self.base_config is not None:
      files.write_json(os.path.join(workdir, "config_diff.json"),
                  config_lib.diff(dict(self.base_config), config_dict))
    tokenizer = self.run_info.tokenizer
    files.write_bytes(os.path.join(workdir, tokenizer.file_name), tokenizer.serialize())

  def restore_or_init(self, checkpointer: ckpt.Checkpointer):
    steps, cfg = self.run_info.steps, self.config
    dataset = data_lib.train_dataset(self.run_info.train_tokens, cfg, self.run_info.tokenizer.eos_id,
                                     jax.process_index(), jax.process_count())
    iterator = data_lib.train_iterator(dataset)
    latest = checkpointer.latest_step()
    if latest is None:
      state = steps.init(jax.random.PRNGKey(cfg.seed))
      return state, iterator, 0
    state, data_state, _ = checkpointer.restore(latest, steps.abstract_state)
    iterator.set_state(data_state)
    _log(f"resumed from {checkpointer.directory}/{latest}")
    return state, iterator, latest

  # -- the loop ------------------------------------------------------------------------------
  def run(self) -> dict[str, Any]:
    cfg, run = self.config, self.run_info
    self.write_run_files()
    checkpointer = ckpt.Checkpointer(os.path.join(run.workdir, "checkpoints"),
                                     keep=cfg.train.keep_checkpoints)
    state, iterator, start = self.restore_or_init(checkpointer)
    writer = metrics_lib.MetricWriter(run.workdir, enabled=self.lead)
    samples_path = os.path.join(run.workdir, "samples.jsonl")
    if self.lead:  # a resumed run logs the steps after its checkpoint again
      metrics_lib.truncate_after(writer.path, start)
      metrics_lib.truncate_after(samples_path, start)
    eval_batches = data_lib.eval_batches(run.eval_tokens, cfg, run.tokenizer.eos_id,
                                         cfg.train.eval_batches, jax.process_index(),
                                         jax.process_count())
    num_params = count_params(state.params)
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = metrics_lib.peak_flops(cfg.model.dtype, cfg.data.data_dir)
    _log(f"{num_params:,} parameters; {flops / 1e6:.1f} MFLOPs per token; "
         f"mesh {dict(run.mesh.shape)}; attention "
         f"{resolve_attention_impl(cfg.model, run.mesh.devices.flat[0].platform)}; "
         f"workdir {run.workdir}")

    if start >= cfg.train.num_steps:
      _log(f"already trained to step {start}; nothing to do.")
      summary_path = os.path.join(run.workdir, "summary.json")
      if os.path.exists(summary_path):
        with open(summary_path) as f:
          return json.load(f)

    data_state = iterator.get_state()
    first = sharding.global_batch(next(iterator), run.mesh)
    train_step, compile_seconds = run.train_step, run.compile_seconds
    _log(f"compiled the train step in {compile_seconds:.1f}s "
         f"({train_lib.step_bytes(train_step) / 2**30:.2f} GiB per device)")
    if self.lead and start == 0:
      writer.write(0, {"compile_seconds": compile_seconds, "num_params": num_params})

    stop = StopFlag()
    progress = None
    if self.show_progress:
      from tqdm import tqdm
      progress = tqdm(total=cfg.train.num_steps, initial=start, unit="step", file=sys.stderr,
                      dynamic_ncols=True, smoothing=0.1)
    step, pending, batch = start, None, first
    window_start, window_step = time.perf_counter(), start
    nonfinite_run, saved_step = 0, start
    with stop.installed():
      while step < cfg.train.num_steps:
        if stop.reached(step) or (self.stop_at_step is not None and step >= self.stop_at_step):
          break
        state, step_metrics = train_step(state, batch)
        step += 1
        if pending is not None:  # read step t-1 while step t runs
          nonfinite_run = self._check_finite(pending, nonfinite_run)
        pending = (step, step_metrics)
        data_state = iterator.get_state()  # exactly `step` batches consumed
        if step < cfg.train.num_steps:
          batch = sharding.global_batch(next(iterator), run.mesh)  # overlaps the step

        due = lambda every: every > 0 and step % every == 0
        last = step == cfg.train.num_steps
        if due(cfg.train.log_every) or last:
          values = jax.device_get(pending[1])
          nonfinite_run = self._check_finite(pending, nonfinite_run)
          pending = None
          now = time.perf_counter()
          seconds = (now - window_start) / max(step - window_step, 1)
          tokens_per_second = self.tokens_per_step / seconds
          logged = {"train_loss": float(values["train_loss"]),
                    "learning_rate": float(values["learning_rate"]),
                    "grad_norm": float(values["grad_norm"]),
                    "tokens_per_second": tokens_per_second,
                    "step_seconds": seconds,
                    "mfu": flops * tokens_per_second / peak,
                    "tokens_seen": step * self.tokens_per_step}
          writer.write(step, logged)
          if progress is not None:
            progress.update(step - progress.n)
            progress.set_postfix(loss=f"{logged['train_loss']:.3f}",
                                 tok_s=f"{tokens_per_second:,.0f}",
                                 mfu=f"{logged['mfu']:.0%}", refresh=False)
          window_start, window_step = time.perf_counter(), step
        paused = False
        if due(cfg.train.eval_every) or last:
          result = self._evaluate(state, eval_batches)
          writer.write(step, result)
          if progress is not None:
            progress.write(f"step {step}: eval loss {result['eval_loss']:.4f}, "
                           f"bits/byte {result['eval_bits_per_byte']:.4f}")
          paused = True
        if due(cfg.train.sample_every) or (last and cfg.train.sample_max_new_tokens > 0):
          self._sample(state, step, samples_path)
          paused = True
        if due(cfg.train.checkpoint_every) or last:
          checkpointer.save(step, state, data_state, config_lib.to_dict(cfg), run.tokenizer)
          saved_step = step
          paused = True
        if paused:
          window_start, window_step = time.perf_counter(), step
    if pending is not None:
      self._check_finite(pending, nonfinite_run)
    if progress is not None:
      progress.close()

    interrupted = step < cfg.train.num_steps
    if interrupted and step != saved_step:
      checkpointer.save(step, state, data_state, config_lib.to_dict(cfg), run.tokenizer)
    checkpointer.wait()
    writer.close()
    records = metrics_lib.read_jsonl(writer.path) if self.lead else []
    if self.lead:
      metrics_lib.plot_losses(records, self.tokens_per_step, os.path.join(run.workdir, "loss.png"))
    summary = self._summary(records, step, interrupted, stop.reason, compile_seconds, num_params)
    if self.lead:
      files.write_json(os.path.join(run.workdir, "summary.json"), summary)
    if interrupted:
      _log(f"stopped at step {step} ({stop.reason or 'stop_at_step'}); checkpoint saved; rerun "
           f"with --workdir={run.workdir} to resume.")
    return summary

  # -- pieces --------------------------------------------------------------------------------
  def _check_finite(self, pending, nonfinite_run: int) -> int:
    step, values = pending
    if int(jax.device_get(values["nonfinite"])):
      nonfinite_run += 1
      _log(f"step {step}: non-finite loss or gradient; update skipped "
           f"({nonfinite_run} in a row)")
      limit = self.config.train.max_nonfinite_steps
      if nonfinite_run > limit:
        raise TrainingDiverged(
            f"training diverged: {nonfinite_run} non-finite steps in a row at step {step} "
            f"(train.max_nonfinite_steps={limit}); lower optim.learning_rate or raise "
            f"optim.warmup_steps, and resume from the last checkpoint.")
      return nonfinite_run
    return 0

  def _evaluate(self, state, batches) -> dict[str, float]:
    result = evaluate_lib.evaluate(self.run_info.steps.eval, state.params, batches,
                                   self.byte_lengths, self.run_info.mesh)
    return {"eval_loss": result["loss"], "eval_perplexity": result["perplexity"],
            "eval_bits_per_byte": result["bits_per_byte"], "eval_tokens": result["tokens"]}

  def _sample(self, state, step: int, path: str) -> None:
    cfg = self.config.train
    rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 1), step)
    texts = generate_lib.generate_texts(
        self.config.model, state.params, self.run_info.tokenizer, list(cfg.sample_prompts),
        max_new_tokens=cfg.sample_max_new_tokens, temperature=cfg.sample_temperature,
        top_k=cfg.sample_top_k, rng=rng)
    if self.lead:
      with open(path, "a") as f:
        for prompt, text in zip(cfg.sample_prompts, texts):
          f.write(json.dumps({"step": step, "prompt": prompt, "text": text}) + "\n")

  def _summary(self, records, step, interrupted, reason, compile_seconds, num_params):
    def last(key):
      values = [r[key] for r in records if key in r]
      return values[-1] if values else None
    speeds = [r["tokens_per_second"] for r in records if "tokens_per_second" in r]
    return {"step": step, "finished": not interrupted, "stop_reason": reason,
            "num_params": num_params, "compile_seconds": compile_seconds,
            "train_loss": last("train_loss"), "eval_loss": last("eval_loss"),
            "eval_perplexity": last("eval_perplexity"),
            "eval_bits_per_byte": last("eval_bits_per_byte"),
            "median_tokens_per_second": float(np.median(speeds)) if speeds else None,
            "median_mfu": float(np.median([r["mfu"] for r in records if "mfu" in r]))
            if speeds else None}
