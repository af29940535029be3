"""Fine-tuning a run, whatever the objective: the config, which weights train (fully, partly or
with LoRA), the initial params, epochs of batches, the job for the shared loop (evaluation of
every split, the best checkpoint), and the steps' preflight. The objective (classifier.py,
instruct.py; `objective.Objective`) decides how records are read, encoded, batched, scored
and ranked.

What trains is `finetune.trainable` (see `jaxlm.config.FinetuneConfig`): the trainable params
are split from the frozen ones, the gradient is taken with respect to the trainable ones only
(XLA then never computes the frozen weights' gradients), and only they get optimizer state.

Data flow: records (file, row) -> token ids, checked against `max_length` -> splits -> batches
padded to their own longest example (rounded up to a multiple of 16, so a few shapes compile)
-> jitted steps on the run's mesh. Every error names the file and row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib
from jaxlm import loop, lora, metrics, sharding
from jaxlm import params as params_lib
from jaxlm import run as run_lib
from jaxlm import steps as steps_lib
from jaxlm import tasks as tasks_lib
from jaxlm.config import Config, ModelConfig
from jaxlm.finetune import objective as objective_lib
from jaxlm.finetune.objective import (
  LENGTH_BUCKET,
  Batch,
  Encoded,
  FinetuneError,
  batches,
  make_batch,
  split_examples,
)
from jaxlm.model import Transformer, count_params, flops_per_token, init_cache, unstack_layers

# -- Params: what trains ------------------------------------------------------------------------

PREFIX_NAMES = ("prefix_key", "prefix_value")  # model.prefix_length's params, in every layer

def resolved_trainable(config: Config) -> str:
  if config.model.lora_rank:
    return "lora"
  return "prefix" if config.model.prefix_length else (config.finetune.trainable or "all")


def trainable_filter(config: Config) -> Callable[[params_lib.Path], bool]:
  """Whether the param at a path (e.g. ('layers_3', 'mlp', 'fc', 'kernel')) trains."""
  mode, model = resolved_trainable(config), config.model
  first_trained = model.num_layers - config.finetune.last_n_blocks

  def trains(names: params_lib.Path) -> bool:
    head = names[0] in ("classifier", "lm_head") or (
        names[0] == "token_embed" and model.tie_embeddings and not model.num_classes)
    if mode == "all":
      return True
    if mode == "lora":
      return lora.is_adapter_path(names) or names[0] == "classifier"
    if mode == "prefix":
      return names[-1] in PREFIX_NAMES or names[0] == "classifier"
    if mode == "head":
      return head
    in_last_blocks = names[0].startswith("layers_") and int(names[0][7:]) >= first_trained
    return head or names[0] == "final_norm" or in_last_blocks
  return trains


# -- Config and initial params ------------------------------------------------------------------

# Fine-tuning defaults. Measured (experiments/finetune_study.py, docs/finetuning.md): on a
# keyword classification task the book's GPT-2 recipe (last block + head, AdamW 5e-5) reached
# 0.66-0.84 test accuracy on the models here (briefly pretrained 64-256 dims, a random
# GPT-2-shaped import), while all weights at 0.064 / embed_dim reached >= 0.995 on every one
# (1e-3 at 64 dims, 2.5e-4 at 256; 8.3e-5 for GPT-2 124M's 768, close to the book's rate).
# Weight decay 0.1, batch 8, 5 epochs and a constant rate are the book's. Any of it can be
# overridden with --config.K=V.
LEARNING_RATE_TIMES_WIDTH = 0.064
FINETUNE_DEFAULTS = {
    # AdamW whatever the init run trained with (the default pretraining config uses Muon): the
    # fine-tuning learning rates were measured with it; --config.optim.name=muon still works.
    "optim": {"name": "adamw", "schedule": "constant", "min_learning_rate": 0.0,
              "warmup_steps": 0, "weight_decay": 0.1, "grad_clip": 1.0},
    "train": {"global_batch_size": 8, "microbatches": 1, "log_every": 10, "z_loss": 0.0,
              "eval_every": 0, "checkpoint_every": 0, "sample_every": 0,
              "sample_max_new_tokens": 0,
              # (a pretraining schedule: fine-tuning's steps are epochs of its own batches)
              "batch_warmup_tokens": 0, "batch_warmup_start": 0},
}


def finetune_config(init: Config, objective: str, overrides: Mapping[str, Any]) -> Config:
  """The fine-tuning run's config: the init run's model, data (tokenizer) and mesh, the
  fine-tuning defaults (learning rate LEARNING_RATE_TIMES_WIDTH / model.embed_dim), then
  `overrides` ({'section.key': value}, e.g. from --config.K=V). `train.num_steps` is derived
  from the data (epochs x batches per epoch) in `prepare`."""
  objective_lib.get(objective)  # (FinetuneError for an unknown one)
  values = config_lib.to_dict(init)
  for section, defaults in FINETUNE_DEFAULTS.items():
    values[section].update(defaults)
  values["optim"]["learning_rate"] = LEARNING_RATE_TIMES_WIDTH / init.model.embed_dim
  values["finetune"] = dict(config_lib.to_dict(config_lib.Config())["finetune"],
                            objective=objective)
  values["model"].update(scan_layers=False, num_classes=0, lora_rank=0)
  # Fine-tuning addresses blocks by index (trainable last_n_blocks, adapters per block), so it
  # runs unscanned and without pipeline stages: a staged init run's stage devices join its data
  # axis (unless another axis already takes the rest).
  if values["mesh"]["stage"] != 1:
    values["mesh"]["stage"] = 1
    if -1 not in values["mesh"].values():
      values["mesh"]["data"] = -1
  config = config_lib.from_dict(config_lib.apply_overrides(values, overrides))
  _check_objective_keys(config, overrides)
  _check_model(init.model, config.model)
  if config.model.scan_layers or config.mesh.stage != 1:
    raise FinetuneError(f"fine-tuning runs with unscanned layers and without pipeline stages "
                        f"(it addresses blocks by index); drop --config.model.scan_layers and "
                        f"--config.mesh.stage (got scan_layers={config.model.scan_layers}, "
                        f"stage={config.mesh.stage}).")
  return config_lib.validate(config)


# model.* keys a fine-tuning run may set: how the model runs and what fine-tuning adds, not the
# function the init run's weights compute (every other key must stay the init run's).
MODEL_KEYS_FINETUNING_MAY_SET = ("dropout", "attention_impl", "scan_layers", "scan_unroll",
                                 "remat_policy", "dtype", "init_std", "num_classes", "lora_rank",
                                 "lora_alpha", "lora_dropout", "lora_targets", "prefix_length")


# finetune.* keys only preference tuning reads (jaxlm/finetune/preference.py)
PREFERENCE_KEYS = ("preference_loss", "beta", "label_smoothing", "simpo_gamma", "reference")


def _check_objective_keys(config: Config, overrides: Mapping[str, Any]) -> None:
  """FinetuneError for a key set that this objective could only ignore."""
  if "train.num_steps" in overrides:
    raise FinetuneError("train.num_steps is set by fine-tuning (finetune.epochs x batches per "
                        "epoch); set --config.finetune.epochs instead.")
  objective_lib.get(config.finetune.objective).check(config)
  if config.finetune.objective != "glue" and "finetune.glue_task" in overrides:
    raise FinetuneError(f"finetune.glue_task is for GLUE fine-tuning (experiments.finetune_glue); "
                        f"this run is {config.finetune.objective}: drop it.")
  if config.finetune.objective != "preference":
    for key in PREFERENCE_KEYS:
      if f"finetune.{key}" in overrides:
        raise FinetuneError(f"finetune.{key} is a preference-tuning setting "
                            f"(experiments.finetune_preference); this run is "
                            f"{config.finetune.objective}: drop it.")
  config_lib.check_sampling(config)


def _check_model(base: ModelConfig, model: ModelConfig) -> None:
  """FinetuneError unless `model` computes what the init run's `base` does (see
  MODEL_KEYS_FINETUNING_MAY_SET): its weights would otherwise load into another function."""
  if base.prefix_length and model.prefix_length != base.prefix_length:
    raise FinetuneError(
        f"model.prefix_length={model.prefix_length}: the init run was prefix-tuned with "
        f"{base.prefix_length} slots, and prefixes cannot be merged into the weights; fine-tune "
        f"it with its prefixes (drop --config.model.prefix_length) or from its own init run.")
  for field in dataclasses.fields(ModelConfig):
    old, new = getattr(base, field.name), getattr(model, field.name)
    if field.name == "max_seq_len" and base.positional != "learned":
      continue  # no position table: a longer context is the same function on the old one
    if field.name not in MODEL_KEYS_FINETUNING_MAY_SET and old != new:
      raise FinetuneError(
          f"model.{field.name}={new!r} differs from the init run's {old!r}; fine-tuning keeps "
          f"the init run's model (of model.* only {', '.join(MODEL_KEYS_FINETUNING_MAY_SET)} "
          f"may be set): drop --config.model.{field.name}.")


def initial_params(config: Config, base_params: Any, mesh, seed: int,
                   prefix_tokens: Sequence[int] = ()) -> Any:
  """The base run's params plus what fine-tuning adds (a classification head, LoRA adapters,
  prefix-tuning slots), initialised as the model initialises them, with the shardings of
  `config` on `mesh`; new prefix slots from `prefix_tokens` when given (`prefix_from_tokens`)."""
  if "layers" in base_params:  # a scanned base run: fine-tuning addresses blocks by index
    base_params = unstack_layers(base_params)
  shardings = jax.tree.map(lambda leaf: leaf.sharding,
                           steps_lib.abstract_params(config.model, mesh))
  model = Transformer(config.model)

  def init(rng):
    tokens = jnp.zeros((1, LENGTH_BUCKET), jnp.int32)
    return nn.unbox(model.init({"params": rng}, tokens)["params"])
  with jax.set_mesh(mesh), sharding.axis_rules():
    fresh = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))
  # Shared params keep the init run's values (the same model: see `_check_model`); a
  # classifier has no lm_head, so a base lm_head is dropped.
  base, targets = params_lib.flatten(base_params), params_lib.flatten(shardings)
  if config.model.prefix_length and prefix_tokens and not any(
      path[-1] in PREFIX_NAMES for path in base):
    base.update(prefix_from_tokens(config.model, base_params, prefix_tokens, mesh))
  return params_lib.unflatten({
      path: jax.device_put(base[path], targets[path]) if path in base else leaf
      for path, leaf in params_lib.flatten(fresh).items()})


def prefix_from_tokens(model: ModelConfig, base_params: Any, tokens: Sequence[int], mesh
                       ) -> dict[params_lib.Path, jax.Array]:
  """Prefix tuning's init from real words (Li & Liang 2021, sec. 7.2: better than random, most
  of all with little data): each layer's slots hold the keys and values that the init run
  computes for `tokens` (the first model.prefix_length of them, repeated if fewer), placed just
  before position 0 (positions -P..-1; 0..P-1 with a learned position table), so the tuned model
  starts as the init run continuing after those tokens (tests/test_model.py checks that
  equivalence). {('layers_i', 'attention', 'prefix_key' | 'prefix_value'): [P, kv_heads,
  head_dim]}."""
  length = model.prefix_length
  ids = np.resize(np.asarray(tokens, np.int32), length)[None]                   # [1, P]
  positions = np.arange(length, dtype=np.int32)[None] - (
      0 if model.positional == "learned" else length)
  plain = dataclasses.replace(model, prefix_length=0, lora_rank=0, scan_layers=False)

  def slots(params):
    cache = init_cache(plain, 1, length)
    _, variables = Transformer(plain).apply(
        {"params": params, "cache": cache}, ids, positions=positions, decode=True,
        return_hidden=True, mutable=["cache"])
    return {name: {key: layer["attention"][f"cached_{key}"][0] for key in ("key", "value")}
            for name, layer in nn.unbox(variables["cache"]).items()}
  with jax.set_mesh(mesh), sharding.axis_rules():
    found = jax.jit(slots)(base_params)
  return {(name, "attention", f"prefix_{key}"): found[name][key].astype(jnp.float32)
          for name in found for key in ("key", "value")}


# -- Data order ---------------------------------------------------------------------------------

class EpochBatches:
  """The training batches of every epoch of a prepared run: epoch e shuffles the train split
  with seed `seed * 1000 + e`. Its state is the number of batches consumed, so a resumed run
  continues with the same batches without replaying any. Each process gets its group's rows of
  the global batch on the run's mesh (the padded length is the global batch's, the same on every
  process)."""

  def __init__(self, prepared: FinetuneInputs):
    self.prepared = prepared
    self.position = 0
    self._order: tuple[int, list[int]] | None = None

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    prepared, split = self.prepared, self.prepared.splits["train"]
    size = prepared.config.train.global_batch_size
    epoch, index = divmod(self.position, prepared.steps_per_epoch)
    if self._order is None or self._order[0] != epoch:
      order = list(range(len(split.ids)))
      random.Random(prepared.config.seed * 1000 + epoch + 1).shuffle(order)
      self._order = (epoch, order)
    rows = self._order[1][index * size:(index + 1) * size]
    self.position += 1
    return sharding.local_rows(prepared.batch(split, rows, size), prepared.mesh)

  def get_state(self) -> dict[str, int]:
    return {"position": self.position}

  def set_state(self, state: Mapping[str, int]) -> None:
    self.position = int(state["position"])


# -- The run ------------------------------------------------------------------------------------

@dataclasses.dataclass
class FinetuneInputs:
  """Everything a fine-tuning run needs, checked before anything is written."""
  config: Config                 # with train.num_steps = epochs x steps per epoch
  workdir: str
  splits: dict[str, Encoded]
  classes: list[str]
  init: run_lib.RunDirectory      # the run fine-tuning starts from (restored only if needed)
  mesh: Any
  max_length: int
  steps_per_epoch: int
  eval_tasks: list[tasks_lib.LoadedTask] = dataclasses.field(default_factory=list)
  data_sha256: dict[str, str] = dataclasses.field(default_factory=dict)  # by flag: what trains
  # Set by `prepare`: the steps, and the train step of the largest batch compiled from shapes
  # (with its compile time), which runs every batch of that shape.
  steps: steps_lib.Steps | None = None
  largest_step: Any = None
  largest_shape: tuple[int, ...] = ()
  compile_seconds: float = 0.0

  @property
  def tokenizer(self) -> Any:
    return self.init.tokenizer

  @property
  def objective(self) -> objective_lib.Objective:
    return objective_lib.get(self.config.finetune.objective)

  @property
  def source(self) -> dict[str, str]:
    return {"fine_tuned_from": os.path.abspath(self.init.workdir),
            "objective": self.config.finetune.objective, "data_sha256": self.data_sha256}

  def batch(self, split: Encoded, indices: Sequence[int], batch_size: int) -> Batch:
    """`make_batch` with this run's max_length, pad id and objective."""
    return make_batch(split, indices, batch_size, self.max_length, self.tokenizer.pad_id,
                      self.objective)


def load_splits(config: Config, data: str, validation_data: str, test_data: str, tokenizer,
                max_length: int) -> tuple[dict[str, Encoded], list[str]]:
  """Reads, selects (e.g. balances), splits and encodes the data the objective's way; returns
  the splits and the class names."""
  f, objective = config.finetune, objective_lib.get(config.finetune.objective)
  examples = objective.select(objective.read(data, f, tokenizer, "--data"), config)
  if objective.validation_file:
    if not validation_data:
      raise FinetuneError(f"finetune.objective={f.objective} reads the benchmark's own splits: "
                          f"pass --data=TRAIN_FILE --validation_data=DEV_FILE (and optionally "
                          f"--test_data=FILE).")
    parts = {"train": examples,
             "validation": objective.read(validation_data, f, tokenizer, "--validation_data")}
    if test_data:
      parts["test"] = objective.read(test_data, f, tokenizer, "--test_data")
  elif validation_data or test_data:
    if not (validation_data and test_data):
      raise FinetuneError("pass both --validation_data and --test_data, or neither (then "
                          "--data is split by finetune.train_fraction/validation_fraction).")
    parts = {"train": examples,
             "validation": objective.read(validation_data, f, tokenizer, "--validation_data"),
             "test": objective.read(test_data, f, tokenizer, "--test_data")}
  else:
    parts = dict(zip(("train", "validation", "test"), split_examples(
        examples, f.train_fraction, f.validation_fraction, config.seed)))
  if not parts["train"]:
    raise FinetuneError(f"{data}: no training examples after splitting; add examples or raise "
                        f"finetune.train_fraction.")
  classes = objective.classes(parts["train"], data)
  return {name: objective.encode(part, tokenizer, classes, max_length)
          for name, part in parts.items() if part}, classes


def prepare(init_workdir: str, workdir: str, objective: str, data: str,
            overrides: Mapping[str, Any], validation_data: str = "", test_data: str = ""
            ) -> FinetuneInputs:
  """All checks that can fail on bad input, before anything is written: the data, the config,
  the model against the init run's, and last the train step of the largest batch, compiled from
  shapes, against the device's memory. A `workdir` holding an unfinished fine-tuning run of the
  same init run and objective resumes. A gs:// workdir is mirrored locally (jaxlm/remote.py)."""
  workdir = run_lib.local_workdir(workdir)
  run_lib.check_writable(workdir)
  init = run_lib.open_run(init_workdir, what="--init", language_model=True)
  config = finetune_config(init.config, objective, overrides or {})
  if config.train.batch_warmup_tokens:
    raise config_lib.ConfigError(
        "train.batch_warmup_tokens is for pretraining (experiments.pretrain); fine-tuning steps "
        "through epochs of its own batches: drop --config.train.batch_warmup_tokens.")
  metrics.check_wandb(config.train.wandb_project)
  eval_tasks = tasks_lib.load_eval_tasks(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.train, mesh)
  max_length = config.finetune.max_length or config.model.max_seq_len
  splits, classes = load_splits(config, data, validation_data, test_data, init.tokenizer,
                                max_length)
  steps_per_epoch = -(-len(splits["train"].ids) // config.train.global_batch_size)
  config = config_lib.replace(config, train={"num_steps": steps_per_epoch * config.finetune.epochs},
                              model={"num_classes": len(classes)})
  sharding.check_model(config.model, mesh)
  data_sha256 = {}  # (the files were read above: they exist; a TFDS dataset is no file)
  for flag, path in (("--data", data), ("--validation_data", validation_data),
                     ("--test_data", test_data)):
    if path and not path.startswith("tfds:"):
      with open(path, "rb") as f:
        data_sha256[flag] = hashlib.file_digest(f, "sha256").hexdigest()
  prepared = FinetuneInputs(config, workdir, splits, classes, init, mesh, max_length,
                            steps_per_epoch, eval_tasks, data_sha256)
  run_lib.check_resumable(workdir, config, prepared.source)
  _compile_largest_step(prepared)
  if prepared.objective.annotate:
    prepared.objective.annotate(prepared)
  return prepared


def _compile_largest_step(prepared: FinetuneInputs) -> None:
  """Builds the run's steps and compiles, from shapes, the train step of its largest batch
  (global_batch_size rows as long as the longest training example): DoesNotFit (one line)
  unless it fits a device, before anything is written. Batches of other lengths compile when
  first used."""
  config, mesh, split = prepared.config, prepared.mesh, prepared.splits["train"]
  steps = steps_lib.make_steps(config, mesh, loss=prepared.objective.loss(config),
                               trainable=trainable_filter(config))
  longest = max(range(len(split.ids)), key=lambda i: prepared.objective.model_length(split, i))
  row = prepared.batch(split, [longest], 1)  # shapes only: the global batch may be huge
  largest = {key: jax.ShapeDtypeStruct((config.train.global_batch_size,) + value.shape[1:],
                                       value.dtype, sharding=sharding.batch_sharding(mesh))
             for key, value in row.items()}
  compiled, prepared.compile_seconds = steps_lib.compile_checked(
      config, steps, largest, mesh,
      f"finetune.max_length={prepared.max_length} (or the longest example)")
  prepared.steps, prepared.largest_step = steps, compiled
  prepared.largest_shape = largest["inputs"].shape


def base_params(prepared: FinetuneInputs) -> Any:
  """The init run's params on the fine-tuning mesh (LoRA adapters of a LoRA init run merged)."""
  init = prepared.init
  params = run_lib.restore_params(init, prepared.mesh)
  if init.config.model.lora_rank:
    _, params = lora.merge(init.config.model, params)
  return params


def evaluate_splits(params: Any, prepared: FinetuneInputs) -> dict[str, float]:
  """{split}_loss of every split, and the objective's metrics of it (a classifier's
  {split}_accuracy, instruct's {split}_perplexity; GLUE's from the per-row outputs); of the
  train split only its first finetune.train_eval_examples."""
  mesh, objective = prepared.mesh, prepared.objective
  results: dict[str, float] = {}
  for name, split in prepared.splits.items():
    if name == "train":
      split = objective_lib.first_examples(split, prepared.config.finetune.train_eval_examples)
    sums = jax.device_get([
        prepared.steps.eval(params, sharding.global_batch(sharding.local_rows(batch, mesh), mesh))
        for batch in batches(split, prepared.config.train.global_batch_size,
                             prepared.max_length, prepared.tokenizer.pad_id, objective)])
    totals = {key: sum(float(s[key]) for s in sums) for key in sums[0]
              if np.ndim(sums[0][key]) == 0}
    loss = totals["loss_sum"] / max(totals["weight_sum"], 1.0)
    results[f"{name}_loss"] = loss
    results.update(objective.metrics(name, totals, loss))
    if objective.split_metrics:  # per-row outputs, the batches' padding rows dropped
      outputs = {key: np.concatenate([s[key] for s in sums])[:len(split.ids)]
                 for key in sums[0] if np.ndim(sums[0][key]) > 0}
      results.update(objective.split_metrics(name, split, outputs))
  return results


def make_job(prepared: FinetuneInputs) -> loop.Job:
  """The fine-tuning job for the shared loop: evaluation of every split after each epoch
  (or every `train.eval_every` steps), keeping the checkpoint the objective ranks best on the
  validation split (without one: the last)."""
  config, mesh, objective = prepared.config, prepared.mesh, prepared.objective
  objective_name, f = config.finetune.objective, config.finetune
  steps = prepared.steps
  started = time.perf_counter()

  def init_state() -> steps_lib.TrainState:  # (a resumed run restores its own checkpoint)
    params = initial_params(config, base_params(prepared), mesh, config.seed,
                            prefix_tokens=prepared.splits["train"].ids[0])
    return steps.init_from(params, jax.random.PRNGKey(config.seed))

  evaluate_tasks = tasks_lib.in_training_evaluator(config, prepared.tokenizer,
                                                   prepared.eval_tasks, mesh)

  def evaluate(state) -> dict[str, float]:
    epoch = int(state.step) / prepared.steps_per_epoch
    return {"epoch": int(epoch) if epoch == int(epoch) else round(epoch, 3),
            **evaluate_splits(state.params, prepared), **evaluate_tasks(state.params)}

  def rank(results: Mapping[str, float]) -> tuple:
    if "validation" not in prepared.splits:  # no validation split: keep the last evaluation
      return (results["epoch"],)
    return objective.rank(results)

  def train_step(state, batch):  # the compiled step for its shape; jit compiles the others
    largest = batch["inputs"].shape == prepared.largest_shape
    return (prepared.largest_step if largest else steps.train)(state, batch)

  num_trainable = count_params(steps.split(steps.abstract_state.params)[0])
  num_total = count_params(steps.abstract_state.params)

  def finish(summary: dict, best: dict | None) -> dict:
    out = dict(summary, objective=objective_name, steps=config.train.num_steps,
               seconds=round(time.perf_counter() - started, 1),
               trainable_params=num_trainable, total_params=num_total)
    if best is not None:
      out.update(best_epoch=best["results"]["epoch"], best_step=best["step"],
                 **{k: v for k, v in best["results"].items() if k != "epoch"})
    if not (config.model.lora_rank or objective.finish):
      return out
    params = run_lib.restore_params(run_lib.open_run(prepared.workdir), mesh)  # the best
    if config.model.lora_rank:
      lora.save_adapters(os.path.join(prepared.workdir, "adapters.safetensors"), config.model,
                         params)
    if objective.finish:
      out.update(objective.finish(prepared, params))
    return out

  description = (f"fine-tuning {objective_name} from {prepared.init.workdir}: {num_trainable:,} of "
                 f"{num_total:,} parameters train ({100 * num_trainable / num_total:.2f}%, "
                 f"trainable={resolved_trainable(config)}); "
                 + ", ".join(f"{k} {len(v.ids)}" for k, v in prepared.splits.items())
                 + f" examples; {f.epochs} epochs of {prepared.steps_per_epoch} steps; ")
  return loop.Job(
      config=config, workdir=prepared.workdir, mesh=mesh, tokenizer=prepared.tokenizer,
      steps=steps, train_step=train_step, compile_seconds=prepared.compile_seconds,
      compiled_step=prepared.largest_step, data=lambda: EpochBatches(prepared),
      init_state=init_state, evaluate=evaluate,
      eval_every=config.train.eval_every or prepared.steps_per_epoch,
      flops_per_token=flops_per_token(config.model, prepared.max_length), rank=rank,
      can_sample=objective.can_sample, train_loss_key="train_batch_loss",
      run_source=prepared.source, class_names=prepared.classes or None,
      description=description, finish=finish)


def finetune(prepared: FinetuneInputs, show_progress: bool = True,
             stop_at_step: int | None = None, restore_step: int | None = None
             ) -> dict[str, Any]:
  """Trains for `finetune.epochs` (or resumes: from the newest valid checkpoint, or from
  `restore_step`), evaluating every split after each epoch; keeps the best checkpoint (see
  `make_job`). Returns the summary (also written to summary.json)."""
  return loop.fit(make_job(prepared), stop_at_step=stop_at_step, restore_step=restore_step,
                  show_progress=show_progress)
