"""Fine-tuning a run: text classification and instruction following, fully, partly or with LoRA.

Classification (the book's chapter 6): the LM head is replaced by a `num_classes` head
(`model.num_classes`); the class logits of the last real token of each text are the
prediction. Instruction tuning (chapter 7): records {instruction, input?, output} are formatted
with a prompt template and trained with the language-model loss on the response tokens only.

What trains is `finetune.trainable` (see `jaxlm.config.FinetuneConfig`): the trainable params
are split from the frozen ones, the gradient is taken with respect to the trainable ones only
(XLA then never computes the frozen weights' gradients), and only they get optimizer state.

Data flow: records (file, row) -> token ids, checked against `max_length` -> splits -> batches
padded to their own longest example (rounded up to a multiple of 16, so a few shapes compile)
-> jitted steps on the run's mesh. Every error names the file and row.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import random
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import files, loop, lora, sharding
from jaxlm import generate as generate_lib
from jaxlm import params as params_lib
from jaxlm import run as run_lib
from jaxlm import tasks as tasks_lib
from jaxlm import train as train_lib
from jaxlm.config import Config, ModelConfig
from jaxlm.errors import UserError
from jaxlm.model import Transformer, count_params, flops_per_token, unstack_layers

Batch = data_lib.Batch
LENGTH_BUCKET = 16  # padded lengths are multiples of this: few compiled shapes


class FinetuneError(UserError):
  """Fine-tuning input is unusable; the message names the file, row or flag and the fix."""


# -- Data: classification -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Example:
  """One record: its text (classifier) or prompt + response (instruct), label, and origin."""
  where: str            # "file:row" for error messages
  text: str             # classifier text, or the formatted prompt
  label: str = ""       # classifier label (as written in the file)
  response: str = ""    # instruct: the expected output
  record: Mapping[str, Any] | None = None  # instruct: the original record (for the report)


def read_labeled(path: str, text_column: str = "text", label_column: str = "label",
                 flag: str = "--data") -> list[Example]:
  """Examples of a table (`.csv`, or tab-separated `.tsv` / `.txt`) with a header row naming
  `text_column` and `label_column`, or of JSON / JSONL records with those fields (the formats
  of `files.read_records`)."""
  records = files.read_records(path, FinetuneError, flag)
  if not records:
    raise FinetuneError(f"{path} has no examples (a header row alone, or an empty list).")
  first = records[0][1]
  columns = [c for c in first if isinstance(c, str)] if isinstance(first, dict) else []
  missing = [c for c in (text_column, label_column) if c not in columns]
  if missing:
    raise FinetuneError(
        f"{path} has no column '{missing[0]}' (columns: {', '.join(columns) or 'none'}); name "
        f"the columns with --config.finetune.text_column / label_column.")
  examples = []
  for where, row in records:
    text, label = (row.get(text_column), row.get(label_column)) if isinstance(row, dict) else (
        None, None)
    if not isinstance(text, str) or label is None or not str(label).strip():
      raise FinetuneError(f"{where}: missing {text_column} or {label_column}; every row needs "
                          f"both.")
    examples.append(Example(where, text, str(label).strip()))
  return examples


def class_names(labels: Sequence[str]) -> list[str]:
  """Sorted distinct labels; numerically if they are all integers ("0", "1", ...)."""
  distinct = set(labels)
  if all(label.lstrip("-").isdigit() for label in distinct):
    return sorted(distinct, key=int)
  return sorted(distinct)


def label_ids(examples: Sequence[Example], classes: Sequence[str]) -> np.ndarray:
  index = {name: i for i, name in enumerate(classes)}
  for example in examples:
    if example.label not in index:
      raise FinetuneError(f"{example.where}: label '{example.label}' does not occur in the "
                          f"training data (classes: {', '.join(classes)}); fix the label or add "
                          f"training examples of it.")
  return np.asarray([index[e.label] for e in examples], np.int32)


def balance(examples: Sequence[Example], seed: int) -> list[Example]:
  """Undersamples every class to the size of the smallest one (seeded); keeps file order."""
  by_class: dict[str, list[int]] = {}
  for i, example in enumerate(examples):
    by_class.setdefault(example.label, []).append(i)
  smallest = min(len(v) for v in by_class.values())
  rng = random.Random(seed)
  keep = sorted(i for indices in by_class.values() for i in rng.sample(indices, smallest))
  return [examples[i] for i in keep]


def split_examples(examples: Sequence[Example], train_fraction: float,
                   validation_fraction: float, seed: int
                   ) -> tuple[list[Example], list[Example], list[Example]]:
  """Seeded shuffle, then train / validation / test by fractions (the rest is test)."""
  order = list(range(len(examples)))
  random.Random(seed).shuffle(order)
  n_train = int(round(train_fraction * len(order)))
  n_validation = int(round(validation_fraction * len(order)))
  pick = lambda part: [examples[i] for i in part]
  return (pick(order[:n_train]), pick(order[n_train:n_train + n_validation]),
          pick(order[n_train + n_validation:]))


def read_texts(path: str, text_column: str) -> list[str]:
  """The texts to label: the `text_column` field of a CSV/TSV/JSON/JSONL file's records (the
  formats of --data), or one text per non-blank line of any other file (.txt)."""
  if path.lower().endswith((".csv", ".tsv", ".json", ".jsonl")):
    texts = []
    for where, record in files.read_records(path, FinetuneError, "--predict"):
      text = record.get(text_column) if isinstance(record, dict) else None
      if not isinstance(text, str):
        raise FinetuneError(f"{where}: no text in field '{text_column}'; every record needs "
                            f"one (--config.finetune.text_column names it).")
      texts.append(text)
    return texts
  if not os.path.isfile(path):
    raise FinetuneError(f"--predict={path} does not exist; pass an existing file.")
  try:
    with open(path, encoding="utf-8-sig") as f:
      return [line for line in f.read().splitlines() if line.strip()]
  except UnicodeDecodeError as e:
    raise FinetuneError(f"--predict={path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        f"save it as UTF-8.") from None


# -- Data: instructions -------------------------------------------------------------------------

ALPACA_HEADER = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.")


def format_prompt(instruction: str, input_text: str, template: str) -> str:
  """The prompt the response follows. alpaca: the Alpaca template (as in the book's ch. 7);
  chat: `<|user|>` / `<|assistant|>` turns."""
  if template == "alpaca":
    prompt = f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}"
    if input_text:
      prompt += f"\n\n### Input:\n{input_text}"
    return prompt + "\n\n### Response:\n"
  user = instruction + (f"\n{input_text}" if input_text else "")
  return f"<|user|>\n{user}\n<|assistant|>\n"


def read_instructions(path: str, template: str, flag: str = "--data") -> list[Example]:
  """Examples of a JSON file (a list of records) or JSONL file (a record per line; or any
  format of `files.read_records`), each with a string `instruction`, an optional string `input`
  and a string `output`."""
  records = files.read_records(path, FinetuneError, flag)
  if not records:
    raise FinetuneError(f"{path} has no records.")
  examples = []
  for where, record in records:
    if not isinstance(record, dict):
      raise FinetuneError(f"{where}: a record must be a JSON object with instruction/output.")
    for field in ("instruction", "output"):
      if not isinstance(record.get(field), str):
        raise FinetuneError(f"{where}: field '{field}' is missing or not a string (fields: "
                            f"{', '.join(sorted(map(str, record))) or 'none'}).")
    input_text = record.get("input") or ""
    if not isinstance(input_text, str):
      raise FinetuneError(f"{where}: field 'input' must be a string.")
    examples.append(Example(where, format_prompt(record["instruction"], input_text, template),
                            response=record["output"], record=record))
  return examples


# -- Tokens and batches -------------------------------------------------------------------------

@dataclasses.dataclass
class Encoded:
  """Token ids of a split, ready for batching."""
  examples: list[Example]
  ids: list[list[int]]           # classifier: text ids; instruct: prompt + response + eos
  prompt_lengths: list[int]      # instruct: tokens before the response (0 for classifier)
  labels: np.ndarray | None      # classifier: [num_examples] class ids


def encode_classifier(examples: Sequence[Example], tokenizer, classes: Sequence[str],
                      max_length: int) -> Encoded:
  ids = tokenizer.encode_batch([e.text for e in examples])
  for example, row in zip(examples, ids):
    if not row:
      raise FinetuneError(f"{example.where}: the text is empty.")
    if len(row) > max_length:
      raise FinetuneError(f"{example.where}: the text is {len(row)} tokens, longer than "
                          f"max_length={max_length}; shorten it or raise "
                          f"--config.finetune.max_length (at most the model's context).")
  return Encoded(list(examples), [list(r) for r in ids], [0] * len(ids),
                 label_ids(examples, classes))


def encode_instructions(examples: Sequence[Example], tokenizer, max_length: int) -> Encoded:
  prompts = tokenizer.encode_batch([e.text for e in examples])
  responses = tokenizer.encode_batch([e.response for e in examples])
  ids, prompt_lengths = [], []
  for example, prompt, response in zip(examples, prompts, responses):
    sequence = list(prompt) + list(response) + [tokenizer.eos_id]
    if len(sequence) - 1 > max_length:  # inputs are the sequence minus its last token
      raise FinetuneError(f"{example.where}: prompt + response are {len(sequence)} tokens, "
                          f"longer than max_length={max_length} + 1; shorten the example or "
                          f"raise --config.finetune.max_length (at most the model's context).")
    ids.append(sequence)
    prompt_lengths.append(len(prompt))
  return Encoded(list(examples), ids, prompt_lengths, None)


def make_batch(encoded: Encoded, indices: Sequence[int], batch_size: int, max_length: int,
               pad_id: int, task: str) -> Batch:
  """[batch_size, length] arrays for `indices` (rows beyond them are weight-0 padding).

  classifier: inputs, segment_ids, positions, last_index [batch], labels [batch], row_weight
  [batch]. instruct: inputs, targets, weights (1 on response tokens and the final EOS only),
  segment_ids, positions. Padding goes to the right with segment id 0.
  """
  classifier = task == "classifier"
  # (instruct inputs are the sequence minus its last token)
  longest = max(len(encoded.ids[i]) for i in indices) - (0 if classifier else 1)
  length = data_lib.bucketed_length(longest, LENGTH_BUCKET, max_length)
  rows = []
  for i in indices:
    ids = encoded.ids[i]
    if classifier:
      rows.append(dict(data_lib.padded_row(ids, length, pad_id),
                       last_index=np.int32(len(ids) - 1), labels=np.int32(encoded.labels[i]),
                       row_weight=np.float32(1.0)))
    else:  # weight 1 on the targets ids[prompt_length:]: the response and the EOS
      rows.append(data_lib.lm_row(ids, length, pad_id, len(ids) - encoded.prompt_lengths[i]))
  return data_lib.stack_rows(rows, batch_size)[0]


def batches(encoded: Encoded, batch_size: int, max_length: int, pad_id: int, task: str
            ) -> Iterator[Batch]:
  """All examples of a split, in order, in batches of `batch_size`."""
  for start in range(0, len(encoded.ids), batch_size):
    indices = range(start, min(start + batch_size, len(encoded.ids)))
    yield make_batch(encoded, indices, batch_size, max_length, pad_id, task)


# -- Params: what trains ------------------------------------------------------------------------

def resolved_trainable(config: Config) -> str:
  return "lora" if config.model.lora_rank else (config.finetune.trainable or "all")


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
    "optim": {"schedule": "constant", "min_learning_rate": 0.0, "warmup_steps": 0,
              "weight_decay": 0.1, "grad_clip": 1.0},
    "train": {"global_batch_size": 8, "microbatches": 1, "log_every": 10, "z_loss": 0.0,
              "eval_every": 0, "checkpoint_every": 0, "sample_every": 0,
              "sample_max_new_tokens": 0},
}


def finetune_config(init: Config, task: str, overrides: Mapping[str, Any]) -> Config:
  """The fine-tuning run's config: the init run's model, data (tokenizer) and mesh, the
  fine-tuning defaults (learning rate LEARNING_RATE_TIMES_WIDTH / model.embed_dim), then
  `overrides` ({'section.key': value}, e.g. from --config.K=V). `train.num_steps` is derived
  from the data (epochs x batches per epoch) in `prepare`."""
  values = config_lib.to_dict(init)
  for section, defaults in FINETUNE_DEFAULTS.items():
    values[section].update(defaults)
  values["optim"]["learning_rate"] = LEARNING_RATE_TIMES_WIDTH / init.model.embed_dim
  values["finetune"] = dict(config_lib.to_dict(config_lib.Config())["finetune"], task=task)
  values["model"].update(scan_layers=False, num_classes=0, lora_rank=0)
  # Fine-tuning addresses blocks by index (trainable last_n_blocks, adapters per block), so it
  # runs unscanned and without pipeline stages: a staged init run's stage devices join its data
  # axis (unless another axis already takes the rest).
  if values["mesh"]["stage"] != 1:
    values["mesh"]["stage"] = 1
    if -1 not in values["mesh"].values():
      values["mesh"]["data"] = -1
  config = config_lib.from_dict(config_lib.apply_overrides(values, overrides))
  _check_task_keys(config, overrides)
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
                                 "lora_alpha", "lora_dropout", "lora_targets")


def _check_task_keys(config: Config, overrides: Mapping[str, Any]) -> None:
  """FinetuneError for a key set that this task could only ignore."""
  if "train.num_steps" in overrides:
    raise FinetuneError("train.num_steps is set by fine-tuning (finetune.epochs x batches per "
                        "epoch); set --config.finetune.epochs instead.")
  if config.finetune.task == "instruct" and config.finetune.balance:
    raise FinetuneError("finetune.balance undersamples the classes of classifier data; "
                        "instruction data has none: drop it.")
  lm_head_keys = [key for key, value in [("train.eval_tasks", config.train.eval_tasks),
                                         ("train.sample_every", config.train.sample_every),
                                         ("train.sample_max_new_tokens",
                                          config.train.sample_max_new_tokens)] if value]
  if config.finetune.task == "classifier" and lm_head_keys:
    raise FinetuneError(f"{lm_head_keys[0]} uses the language-model head, which classifier "
                        f"fine-tuning replaces; drop it (or fine-tune with finetune_instruct).")
  config_lib.check_sampling(config)


def _check_model(base: ModelConfig, model: ModelConfig) -> None:
  """FinetuneError unless `model` computes what the init run's `base` does (see
  MODEL_KEYS_FINETUNING_MAY_SET): its weights would otherwise load into another function."""
  for field in dataclasses.fields(ModelConfig):
    old, new = getattr(base, field.name), getattr(model, field.name)
    if field.name == "max_seq_len" and base.positional != "learned":
      continue  # no position table: a longer context is the same function on the old one
    if field.name not in MODEL_KEYS_FINETUNING_MAY_SET and old != new:
      raise FinetuneError(
          f"model.{field.name}={new!r} differs from the init run's {old!r}; fine-tuning keeps "
          f"the init run's model (of model.* only {', '.join(MODEL_KEYS_FINETUNING_MAY_SET)} "
          f"may be set): drop --config.model.{field.name}.")


def initial_params(config: Config, base_params: Any, mesh, seed: int) -> Any:
  """The base run's params plus what fine-tuning adds (a classification head, LoRA adapters),
  initialised as the model initialises them, with the shardings of `config` on `mesh`."""
  if "layers" in base_params:  # a scanned base run: fine-tuning addresses blocks by index
    base_params = unstack_layers(base_params)
  shardings = jax.tree.map(lambda leaf: leaf.sharding,
                           train_lib.abstract_params(config.model, mesh))
  model = Transformer(config.model)

  def init(rng):
    tokens = jnp.zeros((1, LENGTH_BUCKET), jnp.int32)
    return nn.unbox(model.init({"params": rng}, tokens)["params"])
  with jax.set_mesh(mesh), sharding.axis_rules():
    fresh = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))
  # Shared params keep the init run's values (the same model: see `_check_model`); a
  # classifier has no lm_head, so a base lm_head is dropped.
  base, targets = params_lib.flatten(base_params), params_lib.flatten(shardings)
  return params_lib.unflatten({
      path: jax.device_put(base[path], targets[path]) if path in base else leaf
      for path, leaf in params_lib.flatten(fresh).items()})


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
  steps: train_lib.Steps | None = None
  largest_step: Any = None
  largest_shape: tuple[int, ...] = ()
  compile_seconds: float = 0.0

  @property
  def tokenizer(self) -> Any:
    return self.init.tokenizer

  @property
  def source(self) -> dict[str, str]:
    return {"fine_tuned_from": os.path.abspath(self.init.workdir),
            "task": self.config.finetune.task, "data_sha256": self.data_sha256}

  def batch(self, split: Encoded, indices: Sequence[int], batch_size: int) -> Batch:
    """`make_batch` with this run's max_length, pad id and task."""
    return make_batch(split, indices, batch_size, self.max_length, self.tokenizer.pad_id,
                      self.config.finetune.task)


def load_splits(config: Config, data: str, validation_data: str, test_data: str, tokenizer,
                max_length: int) -> tuple[dict[str, Encoded], list[str]]:
  """Reads, (balances,) splits and encodes the data; returns the splits and the class names."""
  f = config.finetune
  read = (functools.partial(read_labeled, text_column=f.text_column, label_column=f.label_column)
          if f.task == "classifier" else functools.partial(read_instructions, template=f.template))
  examples = read(data, flag="--data")
  if f.balance and f.task == "classifier":
    examples = balance(examples, config.seed)
  if validation_data or test_data:
    if not (validation_data and test_data):
      raise FinetuneError("pass both --validation_data and --test_data, or neither (then "
                          "--data is split by finetune.train_fraction/validation_fraction).")
    parts = {"train": examples, "validation": read(validation_data, flag="--validation_data"),
             "test": read(test_data, flag="--test_data")}
  else:
    parts = dict(zip(("train", "validation", "test"), split_examples(
        examples, f.train_fraction, f.validation_fraction, config.seed)))
  if not parts["train"]:
    raise FinetuneError(f"{data}: no training examples after splitting; add examples or raise "
                        f"finetune.train_fraction.")
  classes = class_names([e.label for e in parts["train"]]) if f.task == "classifier" else []
  if f.task == "classifier" and len(classes) < 2:
    raise FinetuneError(f"{data}: the training examples have a single label "
                        f"'{classes[0]}'; a classifier needs at least two.")
  encode = (functools.partial(encode_classifier, classes=classes) if f.task == "classifier"
            else encode_instructions)
  return {name: encode(part, tokenizer, max_length=max_length)
          for name, part in parts.items() if part}, classes


def prepare(init_workdir: str, workdir: str, task: str, data: str, overrides: Mapping[str, Any],
            validation_data: str = "", test_data: str = "") -> FinetuneInputs:
  """All checks that can fail on bad input, before anything is written: the data, the config,
  the model against the init run's, and last the train step of the largest batch, compiled from
  shapes, against the device's memory. A `workdir` holding an unfinished fine-tuning run of the
  same init run and task resumes. A gs:// workdir is mirrored locally (jaxlm/remote.py)."""
  workdir = run_lib.local_workdir(workdir)
  run_lib.check_writable(workdir)
  init = run_lib.open_run(init_workdir, what="--init", language_model=True)
  config = finetune_config(init.config, task, overrides or {})
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
  data_sha256 = {}  # (the files were read above: they exist)
  for flag, path in (("--data", data), ("--validation_data", validation_data),
                     ("--test_data", test_data)):
    if path:
      with open(path, "rb") as f:
        data_sha256[flag] = hashlib.file_digest(f, "sha256").hexdigest()
  prepared = FinetuneInputs(config, workdir, splits, classes, init, mesh, max_length,
                            steps_per_epoch, eval_tasks, data_sha256)
  run_lib.check_resumable(workdir, config, prepared.source)
  _compile_largest_step(prepared)
  return prepared


def _compile_largest_step(prepared: FinetuneInputs) -> None:
  """Builds the run's steps and compiles, from shapes, the train step of its largest batch
  (global_batch_size rows as long as the longest training example): DoesNotFit (one line)
  unless it fits a device, before anything is written. Batches of other lengths compile when
  first used."""
  config, mesh, split = prepared.config, prepared.mesh, prepared.splits["train"]
  steps = train_lib.make_steps(config, mesh, trainable=trainable_filter(config))
  longest = max(range(len(split.ids)), key=lambda i: len(split.ids[i]))
  row = prepared.batch(split, [longest], 1)  # shapes only: the global batch may be huge
  largest = {key: jax.ShapeDtypeStruct((config.train.global_batch_size,) + value.shape[1:],
                                       value.dtype, sharding=sharding.batch_sharding(mesh))
             for key, value in row.items()}
  compiled, prepared.compile_seconds = train_lib.compile_checked(
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
  """loss (+ accuracy for the classifier, perplexity for instruct) of every split, as
  {split}_loss, {split}_accuracy / {split}_perplexity."""
  task, mesh = prepared.config.finetune.task, prepared.mesh
  results: dict[str, float] = {}
  for name, split in prepared.splits.items():
    sums = jax.device_get([
        prepared.steps.eval(params, sharding.global_batch(sharding.local_rows(batch, mesh), mesh))
        for batch in batches(split, prepared.config.train.global_batch_size,
                             prepared.max_length, prepared.tokenizer.pad_id, task)])
    totals = {key: sum(float(s[key]) for s in sums) for key in sums[0]}
    loss = totals["loss_sum"] / max(totals["weight_sum"], 1.0)
    results[f"{name}_loss"] = loss
    if task == "classifier":
      results[f"{name}_accuracy"] = totals["correct"] / max(totals["weight_sum"], 1.0)
    else:
      results[f"{name}_perplexity"] = math.exp(min(loss, 700.0))
  return results


def make_task(prepared: FinetuneInputs) -> loop.Task:
  """The fine-tuning task for the shared loop: evaluation of every split after each epoch
  (or every `train.eval_every` steps), keeping the checkpoint of the best validation accuracy
  (classifier; ties go to the lower validation loss) or loss (instruct)."""
  config, mesh = prepared.config, prepared.mesh
  task_name, f = config.finetune.task, config.finetune
  steps = prepared.steps
  started = time.perf_counter()

  def init_state() -> train_lib.TrainState:  # (a resumed run restores its own checkpoint)
    params = initial_params(config, base_params(prepared), mesh, config.seed)
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
    if task_name == "classifier":  # ties (a small saturated split) go to the lower loss
      return (results["validation_accuracy"], -results["validation_loss"])
    return (-results["validation_loss"],)

  def train_step(state, batch):  # the compiled step for its shape; jit compiles the others
    largest = batch["inputs"].shape == prepared.largest_shape
    return (prepared.largest_step if largest else steps.train)(state, batch)

  num_trainable = count_params(steps.split(steps.abstract_state.params)[0])
  num_total = count_params(steps.abstract_state.params)

  def finish(summary: dict, best: dict | None) -> dict:
    out = dict(summary, task=task_name, steps=config.train.num_steps,
               seconds=round(time.perf_counter() - started, 1),
               trainable_params=num_trainable, total_params=num_total)
    if best is not None:
      out.update(best_epoch=best["results"]["epoch"], best_step=best["step"],
                 **{k: v for k, v in best["results"].items() if k != "epoch"})
    if not (config.model.lora_rank or (task_name == "instruct" and "test" in prepared.splits)):
      return out
    params = run_lib.restore_params(run_lib.open_run(prepared.workdir), mesh)  # the best
    if config.model.lora_rank:
      lora.save_adapters(os.path.join(prepared.workdir, "adapters.safetensors"), config.model,
                         params)
    if task_name == "instruct" and "test" in prepared.splits:
      report = respond(config, params, prepared.tokenizer, prepared.splits["test"],
                       max_new_tokens=f.max_new_tokens)
      if jax.process_index() == 0:
        files.write_json(os.path.join(prepared.workdir, "test_responses.json"), report)
      out["test_exact_match"] = float(np.mean([r["exact_match"] for r in report]))
    return out

  description = (f"fine-tuning {task_name} from {prepared.init.workdir}: {num_trainable:,} of "
                 f"{num_total:,} parameters train ({100 * num_trainable / num_total:.2f}%, "
                 f"trainable={resolved_trainable(config)}); "
                 + ", ".join(f"{k} {len(v.ids)}" for k, v in prepared.splits.items())
                 + f" examples; {f.epochs} epochs of {prepared.steps_per_epoch} steps; ")
  return loop.Task(
      config=config, workdir=prepared.workdir, mesh=mesh, tokenizer=prepared.tokenizer,
      steps=steps, train_step=train_step, compile_seconds=prepared.compile_seconds,
      compiled_step=prepared.largest_step, data=lambda: EpochBatches(prepared),
      init_state=init_state, evaluate=evaluate,
      eval_every=config.train.eval_every or prepared.steps_per_epoch,
      flops_per_token=flops_per_token(config.model, prepared.max_length), rank=rank,
      can_sample=task_name == "instruct", train_loss_key="train_batch_loss",
      run_source=prepared.source, class_names=prepared.classes or None,
      description=description, finish=finish)


def finetune(prepared: FinetuneInputs, show_progress: bool = True,
             stop_at_step: int | None = None, restore_step: int | None = None
             ) -> dict[str, Any]:
  """Trains for `finetune.epochs` (or resumes: from the newest valid checkpoint, or from
  `restore_step`), evaluating every split after each epoch; keeps the best checkpoint (see
  `make_task`). Returns the summary (also written to summary.json)."""
  return loop.fit(make_task(prepared), stop_at_step=stop_at_step, restore_step=restore_step,
                  show_progress=show_progress)


def respond(config: Config, params: Any, tokenizer, split: Encoded, max_new_tokens: int,
            batch_size: int = 16) -> list[dict[str, Any]]:
  """Greedy responses to the prompts of `split`: records with `response` and `exact_match`
  (the response equals the expected output after stripping surrounding whitespace). At most
  `max_new_tokens` tokens, and no more than the context leaves after each prompt (room its
  expected response fits: see `encode_instructions`), so prompts are not cut (but for one that
  fills the whole context: it loses its first token to the one new token). Prompts of one
  budget are generated together (most share `max_new_tokens`)."""
  budgets = [max(1, min(max_new_tokens, config.model.max_seq_len - length))
             for length in split.prompt_lengths]
  completions: list[Any] = [None] * len(budgets)
  for budget in sorted(set(budgets)):
    rows = [i for i, b in enumerate(budgets) if b == budget]
    for i, completion in zip(rows, generate_lib.generate(
        config.model, params, tokenizer, [split.examples[i].text for i in rows],
        max_new_tokens=budget, temperature=0.0, truncate=True, batch_size=batch_size)):
      completions[i] = completion
  return [dict(e.record or {}, response=c.text, exact_match=c.text.strip() == e.response.strip())
          for e, c in zip(split.examples, completions)]


def predict(workdir: str, texts: Sequence[str]) -> list[dict[str, Any]]:
  """Labels and class probabilities of `texts` under a fine-tuned classifier run."""
  if isinstance(texts, str):  # (a label per character otherwise)
    raise FinetuneError("texts is one string; pass a list of texts, e.g. [text].")
  run = run_lib.open_run(workdir)
  config = run.config
  if not config.model.num_classes:
    raise FinetuneError(f"--workdir={workdir} is not a classifier run (no classification "
                        f"head); pass a run written by experiments.finetune_classifier.")
  classes = run_lib.labels(workdir)
  max_length = config.finetune.max_length or config.model.max_seq_len
  mesh = run_lib.default_mesh(config)
  params = run_lib.restore_params(run, mesh)
  # A long text keeps its end, where the classifier reads; an empty one is a document boundary.
  ids = [row[-max_length:] or [run.tokenizer.eos_id]
         for row in run.tokenizer.encode_batch(list(texts))]
  encoded = Encoded([], ids, [0] * len(ids), np.zeros(len(ids), np.int32))
  batch_size = data_lib.round_to_devices(8, mesh)
  class_probs = train_lib.make_eval_step(config.model, mesh, _class_probabilities)
  probabilities = []  # a row per text, then the last batch's padding rows (dropped by zip)
  for batch in batches(encoded, batch_size, max_length, run.tokenizer.pad_id, "classifier"):
    probs = jax.device_get(class_probs(params, sharding.global_batch(batch, mesh)))
    probabilities.extend(probs["probabilities"])
  return [{"text": text, "label": classes[int(np.argmax(row))],
           "probabilities": {c: round(float(p), 6) for c, p in zip(classes, row)}}
          for text, row in zip(texts, probabilities)]


def _class_probabilities(model: Transformer, params: Any, batch: dict, rng: Any = None
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Loss-function-shaped (see train.LossFn): "probabilities" [batch, classes], the softmax of
  the class logits at each row's last real token."""
  probabilities = jax.nn.softmax(train_lib.class_logits(model, params, batch), axis=-1)
  return jnp.zeros(()), {"probabilities": probabilities}
