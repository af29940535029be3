"""The interface every fine-tuning objective implements, the records and encodings they share,
and the registry (`OBJECTIVES`, a plain dict: an objective module calls `register` when it is
imported). Everything else (the config, which weights train, epochs, the loop, the best
checkpoint, LoRA) is shared, in jaxlm/finetune/core.py. A new objective is a new module like
classifier.py and a line importing it in jaxlm/finetune/__init__.py.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from jaxlm import data as data_lib
from jaxlm.config import Config, FinetuneConfig
from jaxlm.errors import UserError
from jaxlm.loss import LossFn

Batch = data_lib.Batch
LENGTH_BUCKET = 16  # padded lengths are multiples of this: few compiled shapes


class FinetuneError(UserError):
  """Fine-tuning input is unusable; the message names the file, row or flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One record: its text (classifier) or prompt + response (instruct; preference: the
  chosen response and the rejected one), label, and origin."""
  where: str            # "file:row" for error messages
  text: str             # classifier text, or the formatted prompt
  label: str = ""       # classifier label (as written in the file)
  response: str = ""    # instruct: the expected output
  record: Mapping[str, Any] | None = None  # instruct: the original record (for the report)
  # instruct with a chat template: the text trained on after the prompt (the response as the
  # template writes it and the template's end of turn); "": the response, then the EOS id
  target: str = ""
  rejected: str = ""         # preference: the response the chosen one is preferred to
  rejected_target: str = ""  # preference with a chat template: as `target`, for `rejected`


@dataclasses.dataclass
class Encoded:
  """Token ids of a split, ready for batching."""
  examples: list[Example]
  ids: list[list[int]]           # classifier: text ids; instruct: prompt + response + eos
  prompt_lengths: list[int]      # instruct: tokens before the response (0 for classifier)
  # classifier: [num_examples] class ids (glue's STS-B: float32 similarities)
  labels: np.ndarray | None
  # preference: prompt + rejected response + eos per example (the chosen one is `ids`), and
  # the reference log-probabilities [num_examples, 2] of (chosen, rejected) responses, filled
  # by the objective's `annotate` before training (None: not computed / not needed)
  rejected_ids: list[list[int]] | None = None
  reference: np.ndarray | None = None


def first_examples(split: Encoded, count: int) -> Encoded:
  """The split's first `count` examples (all of them when count is 0 or more than it has)."""
  if not count or count >= len(split.ids):
    return split
  cut = lambda values: None if values is None else values[:count]
  return dataclasses.replace(
      split, examples=split.examples[:count], ids=split.ids[:count],
      prompt_lengths=split.prompt_lengths[:count], labels=cut(split.labels),
      rejected_ids=cut(split.rejected_ids), reference=cut(split.reference))


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a fine-tuning objective defines.

  read(path, finetune config, tokenizer, flag) -> examples of a data file, formatted for the
    tokenizer (FinetuneError naming the row)
  select(train examples, config) -> the examples trained on (e.g. classes balanced)
  classes(train examples, path) -> the class names ([] for none; they size model.num_classes)
  encode(examples, tokenizer, classes, max_length) -> Encoded (too-long examples refused)
  row(split, index, length, pad id) -> one [length] padded row of the batch dict
  model_length(split, index) -> tokens the model reads of an encoded example (sets the padded
    length)
  loss(config) -> the loss function (jaxlm/loss.py)
  metrics(split name, summed eval sums, mean loss) -> that split's metrics
  rank(evaluation) -> what the best checkpoint maximizes (given a validation split)
  check(config) -> FinetuneError for config keys this objective could only ignore
  finish(prepared run, best params) -> extra summary entries after training (e.g. test answers)
  annotate(prepared run) -> fills what the splits need from a model before training (once
    the steps are built; e.g. preference's reference log-probabilities)
  split_metrics(split name, encoded split, outputs) -> more metrics of that split from the
    loss's per-row outputs (its sums that are arrays [batch, ...], not scalars: `outputs` holds
    them concatenated over the split's examples in order [num_examples, ...]; e.g. GLUE's
    F1, MCC, correlations)
  validation_file: the data comes as separate train and validation files (GLUE's published
    splits): --validation_data is required, --test_data optional, nothing is split
  """
  name: str
  read: Callable[[str, FinetuneConfig, Any, str], list[Example]]
  classes: Callable[[Sequence[Example], str], list[str]]
  encode: Callable[[Sequence[Example], Any, Sequence[str], int], Encoded]
  row: Callable[[Encoded, int, int, int], Batch]
  model_length: Callable[[Encoded, int], int]
  loss: Callable[[Config], LossFn]
  metrics: Callable[[str, Mapping[str, float], float], dict[str, float]]
  rank: Callable[[Mapping[str, float]], tuple]
  can_sample: bool = False       # a language model: samples and in-training task evals work
  select: Callable[[list[Example], Config], list[Example]] = lambda examples, config: examples
  check: Callable[[Config], None] = lambda config: None
  finish: Callable[[Any, Any], dict[str, Any]] | None = None
  annotate: Callable[[Any], None] | None = None
  split_metrics: Callable[[str, Encoded, Mapping[str, np.ndarray]], dict[str, float]] | None = None
  validation_file: bool = False


OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
  OBJECTIVES[objective.name] = objective
  return objective


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise FinetuneError(f"finetune.objective={name!r}: no such fine-tuning objective; choose "
                        f"one of {', '.join(sorted(OBJECTIVES))}.")
  return OBJECTIVES[name]


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


def make_batch(encoded: Encoded, indices: Sequence[int], batch_size: int, max_length: int,
               pad_id: int, objective: Objective | str) -> Batch:
  """[batch_size, length] arrays of the rows `indices` (the objective's `row`; rows beyond them
  are weight-0 padding), `length` the longest of them rounded up to LENGTH_BUCKET."""
  objective = get(objective) if isinstance(objective, str) else objective
  longest = max(objective.model_length(encoded, i) for i in indices)
  length = data_lib.bucketed_length(longest, LENGTH_BUCKET, max_length)
  rows = [objective.row(encoded, i, length, pad_id) for i in indices]
  return data_lib.stack_rows(rows, batch_size)[0]


def batches(encoded: Encoded, batch_size: int, max_length: int, pad_id: int,
            objective: Objective | str) -> Iterator[Batch]:
  """All examples of a split, in order, in batches of `batch_size`."""
  for start in range(0, len(encoded.ids), batch_size):
    indices = range(start, min(start + batch_size, len(encoded.ids)))
    yield make_batch(encoded, indices, batch_size, max_length, pad_id, objective)
