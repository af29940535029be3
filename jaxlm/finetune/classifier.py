"""Classification (the book's chapter 6): the LM head is replaced by a `num_classes` head
(`model.num_classes`), and the class logits of the last real token of each text are the
prediction. Data: a table (CSV, or tab-separated TSV/TXT) or JSON/JSONL records with a text and
a label field; the best checkpoint has the highest validation accuracy (ties: the lower loss).
"""

from __future__ import annotations

import os
import random
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import data as data_lib
from jaxlm import files, sharding
from jaxlm import loss as loss_lib
from jaxlm import run as run_lib
from jaxlm import steps as steps_lib
from jaxlm.config import Config, FinetuneConfig
from jaxlm.finetune.objective import (
  Batch,
  Encoded,
  Example,
  FinetuneError,
  Objective,
  batches,
  register,
)
from jaxlm.model import Transformer


def read_labeled(path: str, text_column: str = "text", label_column: str = "label",
                 flag: str = "--data", table_columns: Sequence[str] = ()) -> list[Example]:
  """Examples of a table (`.csv`, or tab-separated `.tsv` / `.txt`) with a header row naming
  `text_column` and `label_column`, or of JSON / JSONL records with those fields (the formats
  of `files.read_records`); `table_columns` given: a table without a header row, whose columns
  those name (the SMS Spam Collection's raw file: ("label", "text"))."""
  records = files.read_records(path, FinetuneError, flag, table_columns)
  if not records:
    raise FinetuneError(f"{path} has no examples (a header row alone, or an empty list).")
  first = records[0][1]
  columns = [c for c in first if isinstance(c, str)] if isinstance(first, dict) else []
  missing = [c for c in (text_column, label_column) if c not in columns]
  if missing:
    raise FinetuneError(
        f"{path} has no column '{missing[0]}' (columns: {', '.join(columns) or 'none'}); name "
        f"the columns with --config.finetune.text_column / label_column"
        + (" (and a headerless table's with --config.finetune.table_columns)." if table_columns
           else ", or give a table without a header row its columns with "
                "--config.finetune.table_columns=label,text."))
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


def _read(path: str, f: FinetuneConfig, tokenizer, flag: str) -> list[Example]:
  del tokenizer
  return read_labeled(path, f.text_column, f.label_column, flag=flag,
                      table_columns=table_columns(f))


def table_columns(f: FinetuneConfig) -> tuple[str, ...]:
  """finetune.table_columns as names ("label,text" -> ("label", "text")); () for none."""
  return tuple(c.strip() for c in f.table_columns.split(",")) if f.table_columns else ()


def _classes(examples: Sequence[Example], path: str) -> list[str]:
  classes = class_names([e.label for e in examples])
  if len(classes) < 2:
    raise FinetuneError(f"{path}: the training examples have a single label "
                        f"'{classes[0]}'; a classifier needs at least two.")
  return classes


def _row(split: Encoded, index: int, length: int, pad_id: int) -> Batch:
  """The text, right-padded; last_index (where the class is read), labels, row_weight."""
  ids = split.ids[index]
  return dict(data_lib.padded_row(ids, length, pad_id), last_index=np.int32(len(ids) - 1),
              labels=np.int32(split.labels[index]), row_weight=np.float32(1.0))


def check_no_lm_head(config: Config) -> None:
  """FinetuneError for settings that use the language-model head a class head replaces (the
  classifier's and GLUE fine-tuning's check)."""
  t = config.train
  lm_head_keys = [key for key, value in [("train.eval_tasks", t.eval_tasks),
                                         ("train.sample_every", t.sample_every),
                                         ("train.sample_max_new_tokens",
                                          t.sample_max_new_tokens)] if value]
  if lm_head_keys:
    raise FinetuneError(f"{lm_head_keys[0]} uses the language-model head, which classifier "
                        f"fine-tuning replaces; drop it (or fine-tune with finetune_instruct).")


OBJECTIVE = register(Objective(
    name="classifier", read=_read, classes=_classes, encode=encode_classifier, row=_row,
    model_length=lambda split, i: len(split.ids[i]), loss=lambda config: loss_lib.classifier_loss,
    metrics=lambda name, sums, loss: {
        f"{name}_accuracy": sums["correct"] / max(sums["weight_sum"], 1.0)},
    # Ties (a small saturated split) go to the lower loss.
    rank=lambda r: (r["validation_accuracy"], -r["validation_loss"]),
    select=lambda examples, config: (balance(examples, config.seed)
                                     if config.finetune.balance else examples),
    check=check_no_lm_head))


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
  class_probs = steps_lib.make_eval_step(config.model, mesh, _class_probabilities)
  probabilities = []  # a row per text, then the last batch's padding rows (dropped by zip)
  for batch in batches(encoded, batch_size, max_length, run.tokenizer.pad_id, OBJECTIVE):
    probs = jax.device_get(class_probs(params, sharding.global_batch(batch, mesh)))
    probabilities.extend(probs["probabilities"])
  return [{"text": text, "label": classes[int(np.argmax(row))],
           "probabilities": {c: round(float(p), 6) for c, p in zip(classes, row)}}
          for text, row in zip(texts, probabilities)]


def _class_probabilities(model: Transformer, params: Any, batch: Mapping, rng: Any = None
                         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Loss-function-shaped (see loss.LossFn): "probabilities" [batch, classes], the softmax of
  the class logits at each row's last real token."""
  probabilities = jax.nn.softmax(loss_lib.class_logits(model, params, batch), axis=-1)
  return jnp.zeros(()), {"probabilities": probabilities}
