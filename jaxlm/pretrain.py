"""Pretraining: the language-modelling job on a corpus, run by the shared loop (`jaxlm.loop`).

`train(config, workdir)` is what `experiments/pretrain.py` and the sweeps call. Everything that
can be wrong with the inputs (config, corpus, tokenizer, mesh, workdir, memory) is checked in
`prepare` before the run directory is touched; the train step is compiled there from shapes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Any, Mapping, Sequence

import jax

from jaxlm import batch_warmup, loader, loop, metrics, sharding
from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import evaluate as evaluate_lib
from jaxlm import run as run_lib
from jaxlm import steps as steps_lib
from jaxlm import tasks as tasks_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.config import Config
from jaxlm.model import flops_per_token, resolve_attention_impl


@dataclasses.dataclass
class PretrainInputs:
  """Everything a run needs, resolved and checked before anything is written."""
  config: Config
  workdir: str
  tokenizer: Any
  train_sources: list[loader.Source]   # the corpus (or the mixture's corpora): windows
  eval_sources: list[loader.Source]    # their held-out splits, windows without overlap
  mesh: Any
  steps: steps_lib.Steps
  train_step: Any          # the train step compiled ahead of time for this run's shapes
  compile_seconds: float
  eval_tasks: list[tasks_lib.LoadedTask]   # train.eval_tasks, read and checked
  # train.batch_warmup_tokens: the steps of the warmup's smaller batches, by rows
  warmup_steps: Mapping[int, Any] = dataclasses.field(default_factory=dict)
  # A fresh run's initial-state function, compiled while the train step compiled (None: resumed)
  compiled_init: Any = None


def prepare(config: Config, workdir: str) -> PretrainInputs:
  """All checks that can fail on bad input, in the order a user would fix them. A gs:// workdir
  is mirrored locally first (jaxlm/remote.py)."""
  workdir = run_lib.local_workdir(workdir)
  run_lib.check_resumable(workdir, config, None)
  adds = [k for k in ("num_classes", "lora_rank", "prefix_length") if getattr(config.model, k)]
  if adds:
    field = adds[0]
    raise config_lib.ConfigError(
        f"model.{field} is for fine-tuning (experiments.finetune_classifier / "
        f"finetune_instruct); pretraining trains a whole language model: set it to 0.")
  config_lib.check_sampling(config)
  metrics.check_wandb(config.train.wandb_project)
  if run_lib.saved_config(workdir) is None:  # (a resumed run keeps the data it started with)
    config_lib.check_training_data(config.data)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.train, mesh)
  eval_tasks = tasks_lib.load_eval_tasks(config)
  tokenizer, _ = tokenizer_lib.get_tokenizer(config.data, config.model.vocab_size)
  run_lib.check_tokenizer(workdir, tokenizer)
  train_sources, eval_sources = data_sources(config, tokenizer)
  steps = steps_lib.make_steps(config, mesh)
  if config.train.compilation_cache:  # (before either compile starts)
    steps_lib.use_compilation_cache(os.path.join(config.data.data_dir, "jax_cache"))
  # A fresh run's initializer compiles in a second thread while the train step compiles: on a
  # cold start it is the other large compile before the first step (the random initializers of
  # every parameter: 5.9 of GPT-2 124M's 12.5 s of compiling on 2 CPU cores, now hidden).
  pool = concurrent.futures.ThreadPoolExecutor(1)
  init_compiling = (pool.submit(steps.compile_init) if run_lib.saved_config(workdir) is None
                    else None)
  try:
    train_step, compile_seconds = steps_lib.compile_checked(
        config, steps, steps_lib.abstract_batch(config, mesh), mesh)
    warmup_steps, seconds = _warmup_steps(config, steps, mesh)
    compiled_init = init_compiling.result() if init_compiling else None
  finally:  # (a step that does not fit is reported without waiting for the initializer)
    pool.shutdown(wait=False)
  return PretrainInputs(config, workdir, tokenizer, train_sources, eval_sources, mesh, steps,
                        train_step, compile_seconds + seconds, eval_tasks, warmup_steps,
                        compiled_init)


def _warmup_steps(config: Config, steps: steps_lib.Steps, mesh) -> tuple[dict[int, Any], float]:
  """The batch-size warmup's smaller steps compiled ahead of time (none without it), and the
  seconds that took; ConfigError if its first size cannot be split over the mesh."""
  t = config.train
  if not t.batch_warmup_tokens:
    return {}, 0.0
  try:
    sharding.check_batch(dataclasses.replace(t, global_batch_size=t.batch_warmup_start), mesh)
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"train.batch_warmup_start={t.batch_warmup_start} (the "
                                 f"warmup's first steps): {e}") from None
  started, compiled = time.perf_counter(), {}
  for rows in batch_warmup.ladder(t)[:-1]:
    smaller = config_lib.replace(config, train={"global_batch_size": rows})
    compiled[rows] = steps.compile_train(steps.abstract_state,
                                         steps_lib.abstract_batch(smaller, mesh))
  return compiled, time.perf_counter() - started


def _by_rows(prepared: PretrainInputs):
  """The train step for a batch: the compiled one, or during a batch-size warmup the one
  compiled for its rows."""
  if not prepared.warmup_steps:
    return prepared.train_step
  steps = {**prepared.warmup_steps, prepared.config.train.global_batch_size: prepared.train_step}
  return lambda state, batch: steps[batch["inputs"].shape[0]](state, batch)


def data_sources(config: Config, tokenizer) -> tuple[list[loader.Source], list[loader.Source]]:
  """(train, validation) windows of the run's corpus: prepared shards (data.corpus=tokens, one
  folder or a mixture), or a corpus encoded here on first use; each with at least one window."""
  data = config.data
  if data.corpus == "tokens":
    train = loader.token_sources(data, "train", data.window_stride)
    held_out = loader.token_sources(data, "validation", data.seq_len)
  else:
    train_tokens = data_lib.load_tokens(data, "train", tokenizer)
    eval_tokens = data_lib.load_tokens(data, "validation", tokenizer)
    data_lib.check_enough_tokens(train_tokens, data, "train", 1)
    data_lib.check_enough_tokens(eval_tokens, dataclasses.replace(data, stride=0),
                                 "validation", 1)
    train = [loader.Source(data.corpus, loader.Windows([train_tokens], data.seq_len,
                                                       data.window_stride))]
    held_out = [loader.Source(data.corpus, loader.Windows([eval_tokens], data.seq_len))]
  for sources, split in ((train, "train"), (held_out, "validation")):
    for source in sources:
      if not len(source.windows):
        more = (" (or prepare the shards with a larger --validation_fraction)"
                if data.corpus == "tokens" and split == "validation" else "")
        raise data_lib.DataError(
            f"the {split} split of {source.name} has no window of data.seq_len+1="
            f"{data.seq_len + 1} tokens; add text or lower data.seq_len{more}.")
  return train, held_out


def train(config: Config, workdir: str, *, base_config: Mapping[str, Any] | None = None,
          stop_at_step: int | None = None, restore_step: int | None = None,
          show_progress: bool = True, hooks: Sequence[loop.Hook] = ()) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir` to `config.train.num_steps`.

  base_config: the config the run was derived from (e.g. the config file before CLI overrides),
    written as `config_diff.json`. stop_at_step: behave as if preempted once this many steps are
    done (tests use it to compare resumed and uninterrupted runs). restore_step: resume from
    this checkpoint instead of the newest valid one (later ones are moved aside, not deleted).
    hooks: periodic work of your own, e.g. [loop.Hook(fn, every=100)] (jaxlm/hooks.py).
  Returns the final summary (also written to `summary.json`).
  """
  config = config_lib.validate(config)  # (a dict or ConfigDict too; a Config is re-checked)
  return loop.fit(job(prepare(config, workdir), base_config), stop_at_step=stop_at_step,
                  restore_step=restore_step, show_progress=show_progress, hooks=hooks)


def job(prepared: PretrainInputs, base_config: Mapping[str, Any] | None = None) -> loop.Job:
  """The pretraining job of a prepared run."""
  cfg, mesh = prepared.config, prepared.mesh
  eos_id = prepared.tokenizer.eos_id
  group = sharding.batch_group(mesh)
  eval_batches = loader.eval_batches(prepared.eval_sources, cfg.train.global_batch_size, eos_id,
                                     cfg.train.eval_batches, *group)
  byte_lengths = prepared.tokenizer.byte_lengths()

  def data():
    batches = loader.Loader(prepared.train_sources, cfg.seed, cfg.train.global_batch_size,
                            eos_id, *group)
    if cfg.train.batch_warmup_tokens:
      return batch_warmup.WarmupBatches(batches, cfg.train, cfg.data.seq_len)
    return batches

  def data_metrics(iterator, state) -> dict[str, float]:
    """Bytes of token data this process (process 0: it writes the metrics) has read, and the
    tokens each source of a mixture has given the steps so far; during a batch-size warmup,
    the last step's rows."""
    metrics = {}
    if isinstance(iterator, batch_warmup.WarmupBatches):
      metrics["batch_rows"] = batch_warmup.rows_of_last_step(cfg.train, cfg.data.seq_len, state)
      iterator = iterator.inner
    if not isinstance(iterator, loader.Loader):  # (a wrapped loader: tests poison batches)
      return metrics
    metrics["data_bytes_read"] = iterator.bytes_read
    if len(prepared.train_sources) > 1:
      metrics.update((f"tokens_seen/{name}", tokens)
                     for name, tokens in iterator.tokens_per_source(state["batch"]).items())
    return metrics

  evaluate_tasks = tasks_lib.in_training_evaluator(cfg, prepared.tokenizer, prepared.eval_tasks,
                                                   mesh)

  def evaluate(state) -> dict[str, float]:
    result = evaluate_lib.evaluate(prepared.steps.eval, state.params, eval_batches,
                                   byte_lengths, mesh)  # loss, perplexity, bits_per_byte, tokens
    return {**{f"eval_{k}": v for k, v in result.items()}, **evaluate_tasks(state.params)}

  attention = resolve_attention_impl(cfg.model, mesh.devices.flat[0].platform)
  return loop.Job(
      config=cfg, workdir=prepared.workdir, mesh=mesh, tokenizer=prepared.tokenizer,
      steps=prepared.steps, train_step=_by_rows(prepared),
      compile_seconds=prepared.compile_seconds, compiled_step=prepared.train_step, data=data,
      init_state=lambda: (prepared.compiled_init or prepared.steps.init)(
          jax.random.PRNGKey(cfg.seed)),
      evaluate=evaluate, eval_every=cfg.train.eval_every,
      flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len),
      base_config=base_config, description=f"attention {attention}; ",
      data_metrics=data_metrics)
