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

import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import config as config_lib
from jaxlm import files
from jaxlm import loss as loss_lib
from jaxlm import sharding
from jaxlm.config import Config
from jaxlm.model import Transformer
from jaxlm.optim import make_optimizer

Batch = dict[str, np.ndarray]
LENGTH_BUCKET = 16  # padded lengths are multiples of this: few compiled shapes


class FinetuneError(ValueError):
  """Fine-tuning input is unusable; the message names the file, row or flag and the fix."""


# ---------------------------------------------------------------------------------------------
# Data: classification
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Example:
  """One record: its text (classifier) or prompt + response (instruct), label, and origin."""
  where: str            # "file:row" for error messages
  text: str             # classifier text, or the formatted prompt
  label: str = ""       # classifier label (as written in the file)
  response: str = ""    # instruct: the expected output
  record: Mapping[str, Any] | None = None  # instruct: the original record (for the report)


def _check_file(path: str, flag: str) -> None:
  if not os.path.isfile(path):
    raise FinetuneError(f"{flag}={path} does not exist; pass an existing file.")
  if os.path.getsize(path) == 0:
    raise FinetuneError(f"{flag}={path} is empty; it needs a header row and examples.")


def read_labeled(path: str, text_column: str = "text", label_column: str = "label",
                 flag: str = "--data") -> list[Example]:
  """Examples of a CSV (`.csv`) or TSV (`.tsv`, `.txt`) file with a header row naming
  `text_column` and `label_column`."""
  _check_file(path, flag)
  delimiter = "\t" if path.endswith((".tsv", ".txt")) else ","
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f, delimiter=delimiter)
    columns = reader.fieldnames or []
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
      raise FinetuneError(
          f"{path} has no column '{missing[0]}' (columns: {', '.join(columns) or 'none'}); name "
          f"the columns with --config.finetune.text_column / label_column.")
    examples = []
    for row_number, row in enumerate(reader, start=2):  # row 1 is the header
      text, label = row.get(text_column), row.get(label_column)
      if text is None or label is None or not label.strip():
        raise FinetuneError(f"{path}:{row_number}: missing {text_column} or {label_column}; every "
                            f"row needs both.")
      examples.append(Example(f"{path}:{row_number}", text, label.strip()))
  if not examples:
    raise FinetuneError(f"{path} has a header but no examples.")
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


# ---------------------------------------------------------------------------------------------
# Data: instructions
# ---------------------------------------------------------------------------------------------

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
  """Examples of a JSON file (a list of records) or JSONL file (a record per line), each with a
  string `instruction`, an optional string `input` and a string `output`."""
  _check_file(path, flag)
  with open(path, encoding="utf-8") as f:
    content = f.read()
  records: list[tuple[str, Any]] = []
  if path.endswith(".jsonl"):
    for number, line in enumerate(content.splitlines(), start=1):
      if line.strip():
        try:
          records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as e:
          raise FinetuneError(f"{path}:{number}: not JSON ({e.msg}).") from None
  else:
    try:
      value = json.loads(content)
    except json.JSONDecodeError as e:
      raise FinetuneError(f"{path} is not JSON ({e.msg} at line {e.lineno}); write a list of "
                          f"records, or use a .jsonl file with one record per line.") from None
    if not isinstance(value, list):
      raise FinetuneError(f"{path} must hold a JSON list of records, not a "
                          f"{type(value).__name__}.")
    records = [(f"{path}:record {i}", r) for i, r in enumerate(value)]
  if not records:
    raise FinetuneError(f"{path} has no records.")
  examples = []
  for where, record in records:
    if not isinstance(record, dict):
      raise FinetuneError(f"{where}: a record must be a JSON object with instruction/output.")
    for field in ("instruction", "output"):
      if not isinstance(record.get(field), str):
        raise FinetuneError(f"{where}: field '{field}' is missing or not a string (fields: "
                            f"{', '.join(sorted(record)) or 'none'}).")
    input_text = record.get("input") or ""
    if not isinstance(input_text, str):
      raise FinetuneError(f"{where}: field 'input' must be a string.")
    examples.append(Example(where, format_prompt(record["instruction"], input_text, template),
                            response=record["output"], record=record))
  return examples


# ---------------------------------------------------------------------------------------------
# Tokens and batches
# ---------------------------------------------------------------------------------------------

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


def padded_length(longest: int, max_length: int) -> int:
  return min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, max_length)


def make_batch(encoded: Encoded, indices: Sequence[int], batch_size: int, max_length: int,
               pad_id: int, task: str) -> Batch:
  """[batch_size, length] arrays for `indices` (rows beyond them are weight-0 padding).

  classifier: inputs, segment_ids, positions, last_index [batch], labels [batch], row_weight
  [batch]. instruct: inputs, targets, weights (1 on response tokens and the final EOS only),
  segment_ids, positions. Padding goes to the right with segment id 0.
  """
  if task == "classifier":
    longest = max(len(encoded.ids[i]) for i in indices)
  else:
    longest = max(len(encoded.ids[i]) - 1 for i in indices)
  length = padded_length(longest, max_length)
  inputs = np.full((batch_size, length), pad_id, np.int32)
  segment_ids = np.zeros((batch_size, length), np.int32)
  batch: Batch = {"inputs": inputs, "segment_ids": segment_ids,
                  "positions": np.broadcast_to(np.arange(length, dtype=np.int32),
                                               (batch_size, length)).copy()}
  if task == "classifier":
    last_index = np.zeros(batch_size, np.int32)
    labels = np.zeros(batch_size, np.int32)
    row_weight = np.zeros(batch_size, np.float32)
    for row, i in enumerate(indices):
      ids = encoded.ids[i]
      inputs[row, :len(ids)] = ids
      segment_ids[row, :len(ids)] = 1
      last_index[row], labels[row], row_weight[row] = len(ids) - 1, encoded.labels[i], 1.0
    batch.update(last_index=last_index, labels=labels, row_weight=row_weight)
  else:
    targets = np.full((batch_size, length), pad_id, np.int32)
    weights = np.zeros((batch_size, length), np.float32)
    for row, i in enumerate(indices):
      ids = encoded.ids[i]
      n = len(ids) - 1
      inputs[row, :n], targets[row, :n] = ids[:-1], ids[1:]
      segment_ids[row, :n] = 1
      # Target t predicts token t + 1: the response starts at token prompt_length.
      weights[row, encoded.prompt_lengths[i] - 1:n] = 1.0
    batch.update(targets=targets, weights=weights)
  return batch


def batches(encoded: Encoded, batch_size: int, max_length: int, pad_id: int, task: str,
            shuffle_seed: int | None = None) -> Iterator[Batch]:
  """All examples of a split in batches of `batch_size` (shuffled if a seed is given)."""
  order = list(range(len(encoded.ids)))
  if shuffle_seed is not None:
    random.Random(shuffle_seed).shuffle(order)
  for start in range(0, len(order), batch_size):
    yield make_batch(encoded, order[start:start + batch_size], batch_size, max_length, pad_id,
                     task)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def classifier_sums(logits: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """logits [batch, length, classes] -> summed loss, correct predictions and example count,
  read at each row's last real token."""
  last = jnp.take_along_axis(logits, batch["last_index"][:, None, None], axis=1)[:, 0]
  log_probs = jax.nn.log_softmax(last.astype(jnp.float32))       # [batch, classes]
  nll = -jnp.take_along_axis(log_probs, batch["labels"][:, None], axis=1)[:, 0]
  weight = batch["row_weight"]
  correct = (jnp.argmax(last, axis=-1) == batch["labels"]).astype(jnp.float32)
  return {"loss_sum": jnp.sum(nll * weight), "correct": jnp.sum(correct * weight),
          "count": jnp.sum(weight)}


def lm_sums(logits: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Masked token cross-entropy: only weighted (response) targets count."""
  nll, _ = loss_lib.token_losses(logits.astype(jnp.float32), batch["targets"])
  return {"loss_sum": jnp.sum(nll * batch["weights"]), "count": jnp.sum(batch["weights"])}


# ---------------------------------------------------------------------------------------------
# Params: what trains
# ---------------------------------------------------------------------------------------------

def _path_names(path) -> tuple[str, ...]:
  return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def resolved_trainable(config: Config) -> str:
  f = config.finetune
  if config.model.lora_rank:
    return "lora"
  if f.trainable:
    return f.trainable
  return "last_n_blocks" if f.task == "classifier" else "all"


def is_trainable(names: tuple[str, ...], config: Config) -> bool:
  """Whether the param at `names` (e.g. ('layers_3', 'mlp', 'fc', 'kernel')) trains."""
  mode, model = resolved_trainable(config), config.model
  head = names[0] in ("classifier", "lm_head") or (
      names[0] == "token_embed" and model.tie_embeddings and not model.num_classes)
  if mode == "all":
    return True
  if mode == "lora":
    return names[-1] in ("lora_a", "lora_b") or names[0] == "classifier"
  if mode == "head":
    return head
  first_trained = model.num_layers - config.finetune.last_n_blocks
  in_last_blocks = names[0].startswith("layers_") and int(names[0][7:]) >= first_trained
  return head or names[0] == "final_norm" or in_last_blocks


def partition(params: Any, config: Config) -> tuple[dict, dict]:
  """(trainable, frozen): two nested dicts that together hold every param once."""
  from jaxlm import lora
  return lora.partition(params, lambda path: is_trainable(tuple(path), config))


def combine(first: Mapping, second: Mapping) -> dict:
  """One params tree from the two halves of `partition` (see `jaxlm.lora.combine`)."""
  from jaxlm import lora
  return lora.combine(first, second)


def count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------
# Config and initial params
# ---------------------------------------------------------------------------------------------

# Defaults for fine-tuning (the book's settings: AdamW 5e-5, weight decay 0.1, batch 8, 5
# epochs, a constant learning rate). Anything can be overridden with --config.K=V.
FINETUNE_DEFAULTS = {
    "optim": {"schedule": "constant", "learning_rate": 5e-5, "min_learning_rate": 5e-5,
              "warmup_steps": 0, "weight_decay": 0.1, "grad_clip": 1.0},
    "train": {"global_batch_size": 8, "microbatches": 1, "log_every": 10, "z_loss": 0.0},
}


def finetune_config(init: Config, task: str, overrides: Mapping[str, Any]) -> Config:
  """The fine-tuning run's config: the init run's model, data (tokenizer) and mesh, the
  fine-tuning defaults, then `overrides` ({'section.key': value}, e.g. from --config.K=V)."""
  values = config_lib.to_dict(init)
  for section, defaults in FINETUNE_DEFAULTS.items():
    values[section].update(defaults)
  values["finetune"] = dict(config_lib.to_dict(config_lib.Config())["finetune"], task=task)
  values["model"].update(scan_layers=False, num_classes=0, lora_rank=0)
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    if section not in values or name not in values[section]:
      raise config_lib.ConfigError(f"unknown config key '{key}'.")
    values[section][name] = value
  return config_lib.validate(values)


def initial_params(config: Config, base_params: Any, mesh, seed: int) -> Any:
  """The base run's params plus what fine-tuning adds (a classification head, LoRA adapters),
  initialised as the model initialises them, with the shardings of `config` on `mesh`."""
  import flax.linen as nn
  from jaxlm import train as train_lib
  from jaxlm.model import unstack_layers
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
  base_flat = {_path_names(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(
      base_params)[0]}

  def pick(path, new_leaf, target_sharding):
    names = _path_names(path)
    if names in base_flat:  # (a classifier has no lm_head, so a base lm_head is dropped)
      old = base_flat[names]
      if old.shape != new_leaf.shape:
        raise FinetuneError(f"param {'/'.join(names)} has shape {old.shape} in the init run but "
                            f"{new_leaf.shape} in the fine-tuning model; keep model.* as in the "
                            f"init run.")
      return jax.device_put(old, target_sharding)
    return new_leaf
  return jax.tree_util.tree_map_with_path(pick, fresh, shardings)


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FinetuneSteps:
  train: Callable  # (trainable, opt_state, frozen, batch, step, rng) -> (trainable, opt, metrics)
  eval: Callable   # (trainable, frozen, batch) -> sums
  optimizer: optax.GradientTransformation


def make_finetune_steps(config: Config, mesh, num_steps: int) -> FinetuneSteps:
  model = Transformer(config.model)
  optimizer = make_optimizer(config.optim, num_steps)
  sums_fn = classifier_sums if config.finetune.task == "classifier" else lm_sums
  dropout = config.model.dropout > 0 or config.model.lora_dropout > 0

  def forward(params, batch, rng):
    rngs = {"dropout": rng} if rng is not None else {}
    return model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"], deterministic=rng is None, rngs=rngs)

  def objective(trainable, frozen, batch, rng):
    sums = sums_fn(forward(combine(trainable, frozen), batch, rng), batch)
    return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), sums

  def train_step(trainable, opt_state, frozen, batch, step, rng):
    step_rng = jax.random.fold_in(rng, step) if dropout else None
    grads, sums = jax.grad(objective, has_aux=True)(trainable, frozen, batch, step_rng)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, sums

  def eval_step(trainable, frozen, batch):
    return objective(trainable, frozen, batch, None)[1]

  def under_mesh(fn):
    def wrapped(*args):
      with jax.set_mesh(mesh), sharding.axis_rules():
        return fn(*args)
    return wrapped

  return FinetuneSteps(train=under_mesh(jax.jit(train_step, donate_argnums=(0, 1))),
                       eval=under_mesh(jax.jit(eval_step)), optimizer=optimizer)


def evaluate_split(steps: FinetuneSteps, trainable, frozen, encoded: Encoded, config: Config,
                   max_length: int, pad_id: int, mesh) -> dict[str, float]:
  """loss (+ accuracy for the classifier, perplexity for instruct) of a whole split."""
  task = config.finetune.task
  totals: dict[str, float] = {}
  for batch in batches(encoded, config.train.global_batch_size, max_length, pad_id, task):
    sums = jax.device_get(steps.eval(trainable, frozen, sharding.global_batch(batch, mesh)))
    for key, value in sums.items():
      totals[key] = totals.get(key, 0.0) + float(value)
  loss = totals["loss_sum"] / max(totals["count"], 1.0)
  result = {"loss": loss}
  if task == "classifier":
    result["accuracy"] = totals["correct"] / max(totals["count"], 1.0)
  else:
    result["perplexity"] = math.exp(min(loss, 700.0))
  return result


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Prepared:
  """Everything a fine-tuning run needs, checked before anything is written."""
  config: Config
  splits: dict[str, Encoded]
  classes: list[str]
  tokenizer: Any
  base_params: Any
  mesh: Any
  max_length: int
  init_workdir: str


def check_workdir(workdir: str) -> None:
  from jaxlm import trainer
  trainer.check_workdir(workdir)
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise FinetuneError(f"--workdir={workdir} already exists and is not empty; fine-tuning "
                        f"writes a new run, pick a new --workdir. Nothing was changed.")


def load_splits(config: Config, data: str, validation_data: str, test_data: str, tokenizer,
                max_length: int) -> tuple[dict[str, Encoded], list[str]]:
  """Reads, (balances,) splits and encodes the data; returns the splits and the class names."""
  f = config.finetune
  if f.task == "classifier":
    read = lambda path, flag: read_labeled(path, f.text_column, f.label_column, flag)
  else:
    read = lambda path, flag: read_instructions(path, f.template, flag)
  examples = read(data, "--data")
  if f.balance and f.task == "classifier":
    examples = balance(examples, config.seed)
  if validation_data or test_data:
    if not (validation_data and test_data):
      raise FinetuneError("pass both --validation_data and --test_data, or neither (then "
                          "--data is split by finetune.train_fraction/validation_fraction).")
    parts = {"train": examples, "validation": read(validation_data, "--validation_data"),
             "test": read(test_data, "--test_data")}
  else:
    train, validation, test = split_examples(examples, f.train_fraction, f.validation_fraction,
                                             config.seed)
    parts = {"train": train, "validation": validation, "test": test}
  if not parts["train"]:
    raise FinetuneError(f"{data}: no training examples after splitting; add examples or raise "
                        f"finetune.train_fraction.")
  classes: list[str] = []
  if f.task == "classifier":
    classes = class_names([e.label for e in parts["train"]])
    if len(classes) < 2:
      raise FinetuneError(f"{data}: the training examples have a single label "
                          f"'{classes[0]}'; a classifier needs at least two.")
    splits = {name: encode_classifier(part, tokenizer, classes, max_length)
              for name, part in parts.items() if part}
  else:
    splits = {name: encode_instructions(part, tokenizer, max_length)
              for name, part in parts.items() if part}
  return splits, classes


def prepare(init_workdir: str, workdir: str, task: str, data: str, overrides: Mapping[str, Any],
            validation_data: str = "", test_data: str = "") -> Prepared:
  """All checks that can fail on bad input, before anything is written or compiled."""
  from jaxlm import generate as generate_lib
  check_workdir(workdir)
  run = generate_lib.open_run(init_workdir)
  if run.config.model.num_classes:
    raise FinetuneError(f"--init={init_workdir} is a classifier run; fine-tune from a language "
                        f"model run (pretrained or imported).")
  base = run.config
  config = finetune_config(base, task, overrides)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.train.global_batch_size, 1, mesh)
  max_length = config.finetune.max_length or config.model.max_seq_len
  splits, classes = load_splits(config, data, validation_data, test_data, run.tokenizer,
                                max_length)
  if task == "classifier":
    config = config_lib.replace(config, model={"num_classes": len(classes)})
  sharding.check_model(config.model, mesh)
  base_params = generate_lib.restore_params(run, mesh)
  if base.model.lora_rank:
    from jaxlm import lora
    _, base_params = lora.merge(base.model, base_params)
  return Prepared(config, splits, classes, run.tokenizer, base_params, mesh, max_length,
                  init_workdir)


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def finetune(prepared: Prepared, workdir: str, show_progress: bool = True) -> dict[str, Any]:
  """Trains for `finetune.epochs`, evaluating every split after each epoch; keeps the
  checkpoint of the best validation accuracy (classifier; ties go to the lower validation loss)
  or loss (instruct). Returns the
  summary (also written to summary.json)."""
  from jaxlm import checkpoint as ckpt
  from jaxlm import metrics as metrics_lib

  config, mesh, tokenizer = prepared.config, prepared.mesh, prepared.tokenizer
  task, f = config.finetune.task, config.finetune
  train_split = prepared.splits["train"]
  batch_size = config.train.global_batch_size
  steps_per_epoch = -(-len(train_split.ids) // batch_size)
  num_steps = steps_per_epoch * f.epochs
  config = config_lib.replace(config, train={"num_steps": num_steps})
  params = initial_params(config, prepared.base_params, mesh, config.seed)
  prepared.base_params = None  # the fine-tuning params hold them now
  trainable, frozen = partition(params, config)
  del params
  steps = make_finetune_steps(config, mesh, num_steps)
  opt_state = jax.jit(steps.optimizer.init)(trainable)
  num_trainable, num_total = count(trainable), count(trainable) + count(frozen)
  _log(f"fine-tuning {task} from {prepared.init_workdir}: {num_trainable:,} of {num_total:,} "
       f"parameters train ({100 * num_trainable / num_total:.2f}%, "
       f"trainable={resolved_trainable(config)}); "
       + ", ".join(f"{k} {len(v.ids)}" for k, v in prepared.splits.items())
       + f" examples; {f.epochs} epochs of {steps_per_epoch} steps")

  os.makedirs(workdir, exist_ok=True)
  config_dict = config_lib.to_dict(config)
  files.write_json(os.path.join(workdir, "config.json"), config_dict)
  files.write_bytes(os.path.join(workdir, tokenizer.file_name), tokenizer.serialize())
  files.write_json(os.path.join(workdir, "source.json"),
                   {"fine_tuned_from": os.path.abspath(prepared.init_workdir), "task": task})
  if task == "classifier":
    files.write_json(os.path.join(workdir, "labels.json"), prepared.classes)
  writer = metrics_lib.MetricWriter(workdir)
  checkpointer = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
  rng = jax.random.PRNGKey(config.seed)
  best: dict[str, Any] = {}
  progress = None
  if show_progress:
    from tqdm import tqdm
    progress = tqdm(total=num_steps, unit="step", file=sys.stderr, dynamic_ncols=True)
  step, start = 0, time.perf_counter()
  for epoch in range(1, f.epochs + 1):
    for batch in batches(train_split, batch_size, prepared.max_length, tokenizer.pad_id, task,
                         shuffle_seed=config.seed * 1000 + epoch):
      trainable, opt_state, sums = steps.train(trainable, opt_state, frozen,
                                               sharding.global_batch(batch, mesh),
                                               np.int32(step), rng)
      step += 1
      if step % config.train.log_every == 0 or step == num_steps:
        sums = jax.device_get(sums)
        loss = float(sums["loss_sum"]) / max(float(sums["count"]), 1.0)
        writer.write(step, {"train_batch_loss": loss, "epoch": epoch})
        if progress is not None:
          progress.set_postfix(epoch=epoch, loss=f"{loss:.3f}", refresh=False)
      if progress is not None:
        progress.update(1)
    results = {"epoch": epoch}
    for name, split in prepared.splits.items():
      values = evaluate_split(steps, trainable, frozen, split, config, prepared.max_length,
                              tokenizer.pad_id, mesh)
      results.update({f"{name}_{k}": v for k, v in values.items()})
    writer.write(step, results)
    message = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "epoch")
    (progress.write if progress is not None else _log)(f"epoch {epoch}: {message}")
    if "validation" in prepared.splits:
      # Classifiers rank by accuracy, ties (common once a small validation split saturates)
      # broken by the lower loss; instruction tuning ranks by response loss alone.
      def rank(r: dict) -> tuple[float, ...]:
        if task == "classifier":
          return (r.get("validation_accuracy", -1.0), -r.get("validation_loss", math.inf))
        return (-r.get("validation_loss", math.inf),)
      better = rank(results) > rank(best)
    else:  # no validation split: keep the last epoch
      better = True
    if better:
      best = dict(results, step=step)
      params = combine(trainable, frozen)
      checkpointer.save(step, {"params": params}, {}, config_dict, tokenizer)
      if config.model.lora_rank:
        from jaxlm import lora
        checkpointer.wait()
        lora.save_adapters(os.path.join(workdir, "adapters.safetensors"), config.model, params)
      del params
  if progress is not None:
    progress.close()
  checkpointer.wait()
  writer.close()
  summary = {"task": task, "steps": num_steps, "seconds": round(time.perf_counter() - start, 1),
             "trainable_params": num_trainable, "total_params": num_total,
             "best_epoch": best.get("epoch"), "best_step": best.get("step"),
             **{k: v for k, v in best.items() if k not in ("epoch", "step")}}
  if task == "instruct" and "test" in prepared.splits:
    from jaxlm import generate as generate_lib
    restored = generate_lib.restore_params(generate_lib.open_run(workdir), mesh)
    report = respond(config, restored, tokenizer, prepared.splits["test"],
                     max_new_tokens=f.max_new_tokens)
    files.write_json(os.path.join(workdir, "test_responses.json"), report)
    summary["test_exact_match"] = float(np.mean([r["exact_match"] for r in report]))
  files.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def respond(config: Config, params: Any, tokenizer, split: Encoded, max_new_tokens: int,
            batch_size: int = 16) -> list[dict[str, Any]]:
  """Greedy responses to the prompts of `split`: records with `response` and `exact_match`
  (the response equals the expected output after stripping surrounding whitespace)."""
  from jaxlm import generate as generate_lib
  report = []
  for start in range(0, len(split.examples), batch_size):
    chunk = split.examples[start:start + batch_size]
    completions = generate_lib.generate(config.model, params, tokenizer,
                                        [e.text for e in chunk], max_new_tokens=max_new_tokens,
                                        temperature=0.0, truncate=True)
    for example, completion in zip(chunk, completions):
      response = completion.text
      report.append(dict(example.record or {}, response=response,
                         exact_match=response.strip() == example.response.strip()))
  return report


def predict(workdir: str, texts: Sequence[str]) -> list[dict[str, Any]]:
  """Labels and class probabilities of `texts` under a fine-tuned classifier run."""
  from jaxlm import generate as generate_lib
  run = generate_lib.open_run(workdir)
  config = run.config
  if not config.model.num_classes:
    raise FinetuneError(f"--workdir={workdir} is not a classifier run (no classification "
                        f"head); pass a run written by experiments.finetune_classifier.")
  with open(os.path.join(workdir, "labels.json")) as f:
    classes = json.load(f)
  max_length = config.finetune.max_length or config.model.max_seq_len
  mesh = generate_lib.generation_mesh(config)
  params = generate_lib.restore_params(run, mesh)
  examples = [Example(f"text {i}", text, classes[0]) for i, text in enumerate(texts)]
  ids = run.tokenizer.encode_batch(list(texts))
  for example, row in zip(examples, ids):
    if len(row) > max_length:  # predictions keep the end, where the classifier reads
      row[:] = row[-max_length:]
    if not row:
      row.append(run.tokenizer.eos_id)
  encoded = Encoded(examples, [list(r) for r in ids], [0] * len(ids),
                    np.zeros(len(ids), np.int32))
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  batch_size = -(-8 // ways) * ways
  model = Transformer(config.model)

  @jax.jit
  def class_probs(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    last = jnp.take_along_axis(logits, batch["last_index"][:, None, None], axis=1)[:, 0]
    return jax.nn.softmax(last, axis=-1)

  out = []
  with jax.set_mesh(mesh), sharding.axis_rules():
    for start, batch in zip(range(0, len(texts), batch_size),
                            batches(encoded, batch_size, max_length, run.tokenizer.pad_id,
                                    "classifier")):
      probs = np.asarray(jax.device_get(class_probs(params, sharding.global_batch(batch, mesh))))
      for row in range(min(batch_size, len(texts) - start)):
        best = int(np.argmax(probs[row]))
        out.append({"text": texts[start + row], "label": classes[best],
                    "probabilities": {c: round(float(p), 6) for c, p in zip(classes,
                                                                             probs[row])}})
  return out
