"""Zero- and few-shot tasks, scored the way lm-evaluation-harness scores them.

Multiple choice (HellaSwag, PIQA, ARC, Winogrande, BoolQ, RTE, SST-2): each choice is a
continuation of the task's context; the model's log-likelihood of every continuation decides.
`acc` takes the choice of highest summed log-probability, `acc_norm` the highest
log-probability per character of the choice (the harness's definition: the choice's text
without the space that joins it to the context; per byte for ASCII). LAMBADA: `acc` is 1 when
greedy decoding of the passage's last word reproduces it exactly, `perplexity` = exp(-mean
log-likelihood of the last word). WikiText: rolling log-likelihood of each detokenized article
(disjoint windows of the model's context, as the harness's `loglikelihood_rolling`), reported
as perplexity per word of the original text, per byte, and bits per byte.

Examples come from the published files or from TFDS datasets prepared in data.data_dir/tfds
(`NAME:tfds[:DATASET[:SPLIT]]`, read without TensorFlow; the readers take both layouts).

Tokenization as the harness does it: the context loses its trailing whitespace to the
continuation, the pair is encoded whole and the continuation is what follows the context's
own tokens; an empty context is the end-of-text token. Sequences longer than the model's
context keep their end. Requests are sorted by length and scored in fixed-size batches padded
to length buckets, so each bucket compiles once.

Few-shot: `num_fewshot` solved examples drawn (with `seed`, per example) from the same file,
the example itself excluded, precede the context, separated by a blank line.

GLUE and SuperGLUE (jaxlm/glue.py, imported at the end of this file) add their tasks, scored
from each example's predicted choice (`choice_loglikelihoods`) with their official metrics, and
the groups (`GROUPS`) glue:DIR and superglue:DIR that stand for every task of the benchmark.
jaxlm/generative.py (imported there too) adds the tasks whose answers are generated (QA,
summarization, translation), scored with EM/F1, ROUGE, BLEU and chrF.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import evaluate as evaluate_lib
from jaxlm import files, sharding
from jaxlm import steps as steps_lib
from jaxlm.config import Config, ModelConfig
from jaxlm.errors import UserError
from jaxlm.loss import token_losses
from jaxlm.model import Transformer

LENGTH_BUCKET = 64   # padded lengths are multiples of this (or the model's context)
FEWSHOT_SEPARATOR = "\n\n"


class TaskError(UserError):
  """A task spec or task file is unusable; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One example: `contexts[i]` continued by `choices[i]`; `label` indexes the right one."""
  contexts: tuple[str, ...]
  choices: tuple[str, ...]
  label: int

  def solved(self) -> str:
    """The example with its right answer, as a few-shot demonstration."""
    return self.contexts[self.label] + self.choices[self.label]


# -- Task files (the published formats) ---------------------------------------------------------

def _rows(path: str) -> list[_Row]:
  """Rows of a task file (.jsonl, or a .tsv/.csv table: `files.read_records`) or of a TFDS
  dataset (a `tfds_source` path)."""
  if path.startswith("tfds:"):
    records = _tfds_records(path)
  else:
    records = [r for _, r in files.read_records(path, lambda message: TaskError(
        f"task file {message}"))]
  return [_Row(record, path, index) for index, record in enumerate(records)]


# TFDS datasets prepared in data.data_dir/tfds (`tfds build NAME --file_format=array_record`),
# read without TensorFlow: task -> (the catalog's dataset name, the split scored by default).
TFDS_DEFAULTS = {
    "hellaswag": ("hellaswag", "validation"), "piqa": ("piqa", "validation"),
    "arc_easy": ("ai2_arc/ARC-Easy", "test"), "arc_challenge": ("ai2_arc/ARC-Challenge", "test"),
    "winogrande": ("winogrande/winogrande_xl", "validation"),
    "boolq": ("super_glue/boolq", "validation"), "rte": ("super_glue/rte", "validation"),
    "sst2": ("glue/sst2", "validation"), "lambada": ("lambada", "test")}


def tfds_source(name: str, spec: str, data_dir: str | None) -> str:
  """The path string of a task's TFDS dataset, "tfds:DATASET:SPLIT@DIR", from the `spec` after
  "NAME:" ("tfds", "tfds:DATASET" or "tfds:DATASET:SPLIT"; defaults: TFDS_DEFAULTS)."""
  _, dataset, split = (spec.split(":", 2) + ["", ""])[:3]
  default_dataset, default_split = TFDS_DEFAULTS.get(name, ("", "test"))  # wikitext: no default
  dataset, split = dataset or default_dataset, split or default_split
  if not dataset:
    raise TaskError(f"task {name}:{spec}: name the TFDS dataset, {name}:tfds:DATASET[:SPLIT] "
                    f"(a dataset with a 'text' feature, one document per example).")
  if not data_dir:
    raise TaskError(f"task {name}:{spec} reads TFDS datasets from data.data_dir; set it.")
  directory = os.path.join(os.path.expanduser(data_dir), "tfds")
  if not os.path.isdir(os.path.join(directory, dataset)):
    raise TaskError(
        f"task {name}:{spec}: TFDS dataset '{dataset}' is not prepared in {directory}; prepare "
        f"it on a machine with network (`tfds build {dataset} --data_dir={directory} "
        f"--file_format=array_record`) and copy it there, or pass the task's published file.")
  return f"tfds:{dataset}:{split}@{directory}"


def _plain(value: Any) -> Any:
  """A decoded TFDS value as the JSON-like value a task file holds (bytes -> str, arrays and
  sequences -> lists, numpy scalars -> Python)."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {key: _plain(v) for key, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_plain(v) for v in value]
  return value.item() if isinstance(value, np.generic) else value


def _tfds_records(path: str) -> list[dict[str, Any]]:
  """The examples of the TFDS dataset of a `tfds_source` path, as records."""
  # Imported here: TFDS costs every training process ~0.5 s of startup, and only these task
  # sources need it.
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  location, _, directory = path[len("tfds:"):].rpartition("@")
  dataset, _, split = location.rpartition(":")
  try:
    source = tfds.data_source(dataset, split=split, data_dir=directory)
    return [_plain(source[i]) for i in range(len(source))]
  except Exception as e:  # TFDS raises many types: one line naming the dataset and the fix
    raise TaskError(f"TFDS dataset {dataset} (split {split}) in {directory} cannot be read "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); prepare it with "
                    f"`tfds build {dataset} --file_format=array_record`.") from None


def _read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise TaskError(f"task file {path} cannot be read: {e}") from None


@dataclasses.dataclass(frozen=True)
class _Row:
  """One record of a task file (`index` from 0), for the readers: its errors name the file and
  the row."""
  fields: dict[str, Any]
  path: str
  index: int

  def error(self, message: str) -> TaskError:
    return TaskError(f"task file {self.path}, row {self.index + 1}: {message}")

  def field(self, *names: str) -> Any:
    """The first of `names` the record has."""
    for name in names:
      if name in self.fields:
        return self.fields[name]
    raise self.error(f"no field {' or '.join(map(repr, names))}; its fields are "
                     f"{sorted(self.fields)}.")

  def choice(self, context: str, choices: Sequence[str], label: int) -> Item:
    if not 0 <= label < len(choices):
      raise self.error(f"label {label} is not one of the {len(choices)} choices.")
    return Item((context,) * len(choices), tuple(choices), label)

  def yes_no(self, value: Any) -> int:
    """1 for true/yes/positive/1, 0 for false/no/negative/0."""
    text = str(value).strip().lower()
    if text in ("true", "yes", "positive", "1"):
      return 1
    if text in ("false", "no", "negative", "0"):
      return 0
    raise self.error(f"label {value!r} is not a yes/no value.")


def _hellaswag_text(text: str) -> str:
  """HellaSwag's WikiHow artefacts removed, as the harness does."""
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def read_hellaswag(path: str) -> list[Item]:
  items = []
  for r in _rows(path):
    ctx = (r.fields["ctx_a"] + " " + r.fields["ctx_b"].capitalize()
           if "ctx_a" in r.fields and "ctx_b" in r.fields else r.field("ctx", "context"))
    context = _hellaswag_text(f"{r.fields.get('activity_label', '')}: {ctx}".lstrip(": "))
    if not isinstance(r.field("endings"), list):
      raise r.error(f"endings must be a list of strings, not {r.field('endings')!r}.")
    endings = [" " + _hellaswag_text(e) for e in r.field("endings")]
    items.append(r.choice(context, endings, int(r.field("label"))))
  return items


def read_piqa(path: str) -> list[Item]:
  """PIQA jsonl (goal, sol1, sol2) with a "label" field or the published labels file beside
  it (valid.jsonl + valid-labels.lst)."""
  rows = _rows(path)
  labels_path = re.sub(r"\.jsonl$", "-labels.lst", path)
  labels = None
  if rows and "label" not in rows[0].fields and os.path.isfile(labels_path):
    with open(labels_path) as f:
      labels = [int(line) for line in f if line.strip()]
    if len(labels) != len(rows):
      raise TaskError(f"{labels_path} holds {len(labels)} labels for the {len(rows)} records "
                      f"of {path}; they must be the same count.")
  items = []
  for r in rows:
    label = labels[r.index] if labels is not None else int(r.field("label"))
    items.append(r.choice(f"Question: {r.field('goal')}\nAnswer:",
                          [" " + r.field("sol1"), " " + r.field("sol2")], label))
  return items


def read_arc(path: str) -> list[Item]:
  """AI2 ARC jsonl: question.stem, question.choices[{text, label}], answerKey; or TFDS's
  layout: question (the stem), choices {text: [...], label: [...]}, answerKey."""
  items = []
  for r in _rows(path):
    question, answer = r.field("question"), r.field("answerKey")
    if isinstance(question, str):
      stem, texts, keys = question, r.field("choices")["text"], r.field("choices")["label"]
    else:
      stem = question["stem"]
      texts, keys = [c["text"] for c in question["choices"]], [c["label"] for c in
                                                               question["choices"]]
    if answer not in keys:
      raise r.error(f"answerKey {answer!r} is not one of {keys}.")
    items.append(r.choice(f"Question: {stem}\nAnswer:", [" " + t for t in texts],
                          keys.index(answer)))
  return items


def read_winogrande(path: str) -> list[Item]:
  """Winogrande jsonl (sentence with one "_", option1, option2, answer "1"/"2"; TFDS: label
  0/1), scored by
  partial evaluation: each option fills the blank in the context, and the likelihood of the
  rest of the sentence decides."""
  items = []
  for r in _rows(path):
    sentence = r.field("sentence")
    blank = sentence.find("_")
    if blank < 0:
      raise r.error("the sentence has no '_' blank.")
    options = [r.field("option1"), r.field("option2")]
    rest = " " + sentence[blank + 1:].strip()
    label = int(r.field("answer")) - 1 if "answer" in r.fields else int(r.field("label"))
    item = r.choice("", [rest, rest], label)
    items.append(dataclasses.replace(
        item, contexts=tuple(sentence[:blank] + option for option in options)))
  return items


def read_boolq(path: str) -> list[Item]:
  """BoolQ jsonl (passage, question, label or answer true/false)."""
  return [r.choice(f"{r.field('passage')}\nQuestion: {r.field('question')}?\nAnswer:",
                   [" no", " yes"], r.yes_no(r.field("label", "answer")))
          for r in _rows(path)]


def read_rte(path: str) -> list[Item]:
  """RTE: SuperGLUE jsonl (premise, hypothesis, label) or GLUE tsv (sentence1, sentence2,
  label); the answer is " True" for entailment."""
  items = []
  for r in _rows(path):
    premise, hypothesis = r.field("premise", "sentence1"), r.field("hypothesis", "sentence2")
    value = str(r.field("label")).strip().lower()
    if value not in ("entailment", "0", "not_entailment", "1"):
      raise r.error(f"label {value!r} is neither entailment (0) nor not_entailment (1).")
    items.append(r.choice(f"{premise}\nQuestion: {hypothesis} True or False?\nAnswer:",
                          [" True", " False"], 0 if value in ("entailment", "0") else 1))
  return items


def read_sst2(path: str) -> list[Item]:
  """SST-2: GLUE tsv (sentence, label 0/1) or jsonl with the same fields."""
  return [r.choice(f"{r.field('sentence')}\nQuestion: Is this sentence positive or negative?"
                   "\nAnswer:", [" negative", " positive"], r.yes_no(r.field("label")))
          for r in _rows(path)]


def read_lambada(path: str) -> list[Item]:
  """LAMBADA: one passage per line (.txt) or a "text" field per line (.jsonl; TFDS:
  "passage"); the target is the passage's last word."""
  if path.endswith(".jsonl") or path.startswith("tfds:"):
    passages = [r.field("text", "passage") for r in _rows(path)]
  else:
    passages = [line.strip() for line in _read_text(path).split("\n") if line.strip()]
  items = []
  for row, passage in enumerate(passages):
    context, _, word = passage.strip().rpartition(" ")
    if not context:
      raise TaskError(f"task file {path}, row {row + 1}: a passage needs words before its "
                      f"last word.")
    items.append(Item((context,), (" " + word,), 0))
  return items


WIKITEXT_HEADING = re.compile(r"^ = [^=].* = $")


def read_wikitext(path: str) -> list[str]:
  """WikiText raw files (wiki.test.raw ...) as articles, split at their top-level headings;
  any other text file is one document; a TFDS dataset: the "text" (or "page") of each
  example."""
  if path.startswith("tfds:"):
    return [text for text in (r.field("text", "page") for r in _rows(path)) if text.strip()]
  articles: list[list[str]] = []
  for line in _read_text(path).split("\n"):
    if WIKITEXT_HEADING.match(line) or not articles:
      articles.append([])
    articles[-1].append(line)
  return [text for text in ("\n".join(a).strip() for a in articles) if text]


# WikiText's tokenization undone, rule by rule in this order, as lm-evaluation-harness's
# wikitext task does before scoring (words and bytes are still counted on the original text).
_WIKITEXT_RULES: tuple[tuple[str | re.Pattern, str], ...] = (
    ("s '", "s'"),                                                      # plural possessives
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),                     # inside numbers
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),                        # inside brackets
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"), (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'), (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),                # heading markers
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"), (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "),
    (" 's", "'s"))


def wikitext_detokenize(text: str) -> str:
  """WikiText's tokenized text (" @-@ ", " , ", "( x )" ...) written as plain text."""
  for pattern, replacement in _WIKITEXT_RULES:
    text = (pattern.sub(replacement, text) if isinstance(pattern, re.Pattern)
            else text.replace(pattern, replacement))
  return text


def parse_specs(text: str, data_dir: str | None = None) -> list[tuple[str, str]]:
  """"name:path,name:tfds[:DATASET[:SPLIT]],..." -> [(name, path)], a TFDS dataset prepared
  in `data_dir`/tfds as a `tfds_source` path; TaskError for an unknown name or missing file.
  A group (GROUPS: glue:DIR, superglue:tfds ...) stands for each of its tasks found there,
  except those the spec names on their own (their file replaces the group's) or an earlier
  group already gave (GLUE's and SuperGLUE's RTE)."""
  entries, specs = [], []
  for spec in (s.strip() for s in text.split(",") if s.strip()):
    name, sep, path = spec.partition(":")
    if not sep or not path:
      raise TaskError(f"task {spec!r}: write NAME:PATH, e.g. hellaswag:/data/hellaswag_val.jsonl.")
    if name in (n for n, _ in entries):  # (results are keyed by name: the second would win)
      raise TaskError(f"task {name} is given twice; score one file per task (or run the command "
                      f"once per file).")
    if name not in TASKS and name not in GROUPS:
      raise TaskError(f"unknown task {name!r}; one of {_known()}.")
    entries.append((name, path))
  named = {name for name, _ in entries}
  for name, path in entries:
    if name in GROUPS:
      given = named | {n for n, _ in specs}
      specs += [(task, p) for task, p in GROUPS[name].members(path, data_dir) if task not in given]
      continue
    if path == "tfds" or path.startswith("tfds:"):
      specs.append((name, tfds_source(name, path, data_dir)))
      continue
    if not os.path.isfile(os.path.expanduser(path)):
      raise TaskError(f"task file {path} (task {name}) does not exist; pass the path of the "
                      f"task's published file.")
    specs.append((name, os.path.expanduser(path)))
  if not specs:
    raise TaskError("no tasks given; pass NAME:PATH[,NAME:PATH...].")
  return specs


def with_fewshot(items: Sequence[Item], num_fewshot: int, seed: int, limit: int = 0
                 ) -> list[Item]:
  """The first `limit` items (0: all), each with `num_fewshot` other solved items of the file
  before each of its contexts."""
  scored = list(items[:limit or None])
  if num_fewshot <= 0:
    return scored
  if num_fewshot >= len(items):
    raise TaskError(f"--num_fewshot={num_fewshot} needs more than {num_fewshot} examples in the "
                    f"task file; it has {len(items)}.")
  out = []
  for index, item in enumerate(scored):
    others = np.random.default_rng([seed, index]).choice(len(items) - 1, num_fewshot,
                                                         replace=False)
    shots = [items[i if i < index else i + 1].solved() for i in others]
    prefix = FEWSHOT_SEPARATOR.join(shots) + FEWSHOT_SEPARATOR
    out.append(dataclasses.replace(item, contexts=tuple(prefix + c for c in item.contexts)))
  return out


# -- Scoring ------------------------------------------------------------------------------------

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as the harness forms them."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  if not context:
    return [tokenizer.eos_id], tokenizer.encode(continuation)
  whole = tokenizer.encode(context + continuation)
  context_ids = tokenizer.encode(context)
  return context_ids, whole[len(context_ids):]


def continuation_scores(model: Transformer, params: Any, batch: dict, rng: Any = None
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Loss-function-shaped (see steps.LossFn): per row, the summed log-probability of its
  weighted targets ("loglikelihood" [batch]) and whether each of them is the argmax
  ("greedy" [batch])."""
  logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"]).astype(jnp.float32)
  nll, _ = token_losses(logits, batch["targets"])                      # [batch, length]
  weights = batch["weights"]
  loglikelihood = -jnp.sum(nll * weights, axis=-1)
  greedy = jnp.all((jnp.argmax(logits, -1) == batch["targets"]) | (weights == 0), axis=-1)
  return -jnp.sum(loglikelihood), {"loglikelihood": loglikelihood, "greedy": greedy}


def make_scorer(model_config: ModelConfig, mesh) -> Callable[[Any, dict], dict[str, Any]]:
  """(params, global batch) -> `continuation_scores`' per-row arrays, replicated: the eval
  step of `steps.make_eval_step` with this scorer as its loss."""
  return steps_lib.make_eval_step(model_config, mesh, continuation_scores)


@dataclasses.dataclass
class Scorer:
  """A model ready to score requests: the run's config, params and tokenizer, the mesh the
  batches are sharded over, the global batch size (rounded to the devices), a progress bar, and
  the compiled scoring step (`make_scorer`, made on first use; share one Scorer, or its `step`,
  so each length bucket compiles once). `dataclasses.replace(scorer, params=...)` scores other
  params with the same step. Generative tasks (jaxlm/generative.py): `max_new_tokens` overrides
  every task's answer budget (0: each task's own), `samples` answers are kept in each result
  beside their references."""
  config: Config
  params: Any
  tokenizer: Any
  mesh: Any = None
  batch_size: int = 8
  progress: bool = False
  step: Callable[[Any, dict], dict[str, Any]] | None = None
  max_new_tokens: int = 0
  samples: int = 0

  def scores(self, batches) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
    """(key, per-row scores) of each (key, global batch) of `batches`, host-side."""
    if self.step is None:
      self.step = make_scorer(self.config.model, self.mesh)
    show = self.progress and jax.process_index() == 0
    for key, batch in tqdm(batches, disable=not show, unit="batch", file=sys.stderr,
                           desc="scoring"):
      yield key, jax.device_get(self.step(
          self.params, sharding.global_batch(sharding.local_rows(batch, self.mesh), self.mesh)))


def request_batches(scorer: Scorer, pairs: Sequence[tuple[str, str]]
                    ) -> list[tuple[list[int], dict[str, np.ndarray]]]:
  """The scoring batches of `pairs`: (indices of the pairs in it, global batch [batch_size,
  bucket length]), longest first; rows past the pairs are weight-0 padding."""
  max_length, tokenizer = scorer.config.model.max_seq_len, scorer.tokenizer
  encoded = [encode_pair(tokenizer, c, x) for c, x in pairs]
  lengths = [min(len(c) + len(x) - 1, max_length) for c, x in encoded]
  order = sorted(range(len(pairs)), key=lambda i: -lengths[i])
  batch_size = data_lib.round_to_devices(scorer.batch_size, scorer.mesh)
  out = []
  for start in range(0, len(order), batch_size):
    chosen = order[start:start + batch_size]
    length = data_lib.bucketed_length(lengths[chosen[0]], LENGTH_BUCKET, max_length)
    # The pair's last max_length + 1 tokens, weight 1 on the continuation's targets.
    rows = [data_lib.lm_row((c + x)[-(max_length + 1):], length, tokenizer.pad_id, len(x))
            for c, x in (encoded[i] for i in chosen)]
    out.append((chosen, data_lib.stack_rows(rows, batch_size)[0]))
  return out


def loglikelihoods(scorer: Scorer, pairs: Sequence[tuple[str, str]]
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Log-likelihood [len(pairs)] of each (context, continuation)'s continuation given its
  context, and whether greedy decoding reproduces it [len(pairs)] (bool)."""
  ll, greedy = np.zeros(len(pairs)), np.zeros(len(pairs), bool)
  for chosen, scores in scorer.scores(request_batches(scorer, pairs)):
    ll[chosen] = scores["loglikelihood"][:len(chosen)]
    greedy[chosen] = scores["greedy"][:len(chosen)]
  return ll, greedy


def document_loglikelihoods(scorer: Scorer, documents: Sequence[str]) -> tuple[np.ndarray, int]:
  """Rolling log-likelihood [len(documents)] of each whole document (after end-of-text; disjoint
  windows of the model's context, each carrying one token over: the harness's
  `loglikelihood_rolling`), and the number of tokens scored."""
  length, tokenizer = scorer.config.model.max_seq_len, scorer.tokenizer
  batch_size = data_lib.round_to_devices(scorer.batch_size, scorer.mesh)
  owners, rows = [], []
  for index, ids in enumerate(tokenizer.encode_batch(list(documents))):
    windows = evaluate_lib.document_windows(ids, length, length, tokenizer.eos_id,
                                            tokenizer.pad_id)
    owners += [index] * len(windows)
    rows += windows
  batches = [(np.array(owners[start:start + batch_size]), batch) for start, batch in
             zip(range(0, len(rows), batch_size), data_lib.stack_rows(rows, batch_size))]
  ll = np.zeros(len(documents))
  for owner, scores in scorer.scores(batches):
    np.add.at(ll, owner, scores["loglikelihood"][:len(owner)])
  return ll, int(sum(row["weights"].sum() for row in rows))


def _stderr(values: np.ndarray) -> float:
  """Standard error of a mean, as the harness reports it (sample standard deviation)."""
  return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def choice_loglikelihoods(scorer: Scorer, items: Sequence[Item]) -> list[np.ndarray]:
  """Per item, the log-likelihood of each of its choices given its context [len(choices)]:
  what every multiple-choice metric is computed from (argmax: the predicted choice)."""
  pairs = [(c, x) for item in items for c, x in zip(item.contexts, item.choices)]
  ll, _ = loglikelihoods(scorer, pairs)
  return np.split(ll, np.cumsum([len(i.choices) for i in items])[:-1])


def score_items(scorer: Scorer, items: Sequence[Item]) -> dict[str, float]:
  """Multiple choice: acc, acc_norm (per character of the choice) and their standard errors
  over `items`."""
  correct, correct_norm = [], []
  for item, scores in zip(items, choice_loglikelihoods(scorer, items)):
    # The harness's acc_norm: per character of the choice, without the " " joining it on.
    lengths = np.array([max(len(x) - x.startswith(" "), 1) for x in item.choices])
    correct.append(float(np.argmax(scores) == item.label))
    correct_norm.append(float(np.argmax(scores / lengths) == item.label))
  correct, correct_norm = np.array(correct), np.array(correct_norm)
  return {"acc": float(correct.mean()), "acc_stderr": _stderr(correct),
          "acc_norm": float(correct_norm.mean()), "acc_norm_stderr": _stderr(correct_norm),
          "examples": len(items)}


def score_last_word(scorer: Scorer, items: Sequence[Item]) -> dict[str, float]:
  """LAMBADA: acc (greedy reproduces the last word) and perplexity of the last word."""
  ll, greedy = loglikelihoods(scorer, [(item.contexts[0], item.choices[0]) for item in items])
  correct = greedy.astype(np.float64)
  return {"acc": float(correct.mean()), "acc_stderr": _stderr(correct),
          "perplexity": math.exp(min(-float(ll.mean()), 700.0)), "examples": len(items)}


def score_documents(scorer: Scorer, documents: Sequence[str], detokenize: bool = False
                    ) -> dict[str, float]:
  """WikiText-style: word and byte perplexity and bits per byte of whole documents (the
  rolling log-likelihood of `document_loglikelihoods`), as the harness computes them.
  detokenize: score `wikitext_detokenize` of each document (the wikitext task), while words
  and bytes are counted on the documents as given."""
  scored = [wikitext_detokenize(doc) for doc in documents] if detokenize else documents
  ll, tokens = document_loglikelihoods(scorer, scored)
  nll = -float(ll.sum())
  words = sum(len(re.split(r"\s+", doc)) for doc in documents)
  num_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
  return {"word_perplexity": math.exp(min(nll / max(words, 1), 700.0)),
          "byte_perplexity": math.exp(min(nll / max(num_bytes, 1), 700.0)),
          "bits_per_byte": nll / max(num_bytes, 1) / math.log(2), "tokens": tokens,
          "documents": len(documents)}


# -- The registry --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TaskKind:
  """How a task is read and scored: read(path) -> its examples (Items, or whole documents when
  `documents`: scored for perplexity, never few-shot); score(scorer, examples) -> metrics."""
  read: Callable[[str], list]
  score: Callable[[Scorer, Sequence], dict[str, float]]
  documents: bool = False


TASKS: dict[str, TaskKind] = {
    "hellaswag": TaskKind(read_hellaswag, score_items),
    "piqa": TaskKind(read_piqa, score_items),
    "arc_easy": TaskKind(read_arc, score_items),
    "arc_challenge": TaskKind(read_arc, score_items),
    "winogrande": TaskKind(read_winogrande, score_items),
    "boolq": TaskKind(read_boolq, score_items),
    "rte": TaskKind(read_rte, score_items),
    "sst2": TaskKind(read_sst2, score_items),
    "lambada": TaskKind(read_lambada, score_last_word),
    "wikitext": TaskKind(read_wikitext, functools.partial(score_documents, detokenize=True),
                         documents=True),
}  # + GLUE's and SuperGLUE's tasks (jaxlm/glue.py adds them: imported at the end of this file)


@dataclasses.dataclass(frozen=True)
class TaskGroup:
  """A benchmark named in a spec as one task, GROUP:PATH: members(PATH, data_dir) -> the
  (task, path) of each of its tasks found there; summary(results of those tasks) -> the
  benchmark's score as its papers compute it (and which tasks are missing)."""
  members: Callable[[str, str | None], list[tuple[str, str]]]
  summary: Callable[[Sequence[dict[str, Any]]], dict[str, Any]]


GROUPS: dict[str, TaskGroup] = {}  # glue, superglue (jaxlm/glue.py)


def _known() -> str:
  return ", ".join(list(TASKS) + list(GROUPS))


@dataclasses.dataclass(frozen=True)
class LoadedTask:
  """A task read from its file, ready to score: `items` (multiple choice, LAMBADA) or
  `documents` (WikiText)."""
  name: str
  path: str
  num_fewshot: int
  items: list[Item] | None = None
  documents: list[str] | None = None


def load_task(name: str, path: str, *, num_fewshot: int = 0, limit: int = 0,
              seed: int = 0) -> LoadedTask:
  """Reads a task file (the first `limit` examples, 0: all; few-shot prompts built): every
  error a task file can cause is raised here, before any scoring."""
  if name not in TASKS:  # (any file would be read as the fallback, LAMBADA)
    raise TaskError(f"unknown task {name!r}; one of {', '.join(TASKS)}.")
  for flag, value in (("limit", limit), ("num_fewshot", num_fewshot)):
    if value < 0:
      raise TaskError(f"--{flag}={value} must be >= 0.")
  kind = TASKS[name]
  if kind.documents:
    documents = kind.read(path)[:limit or None]
    if not documents:
      raise TaskError(f"task file {path} ({name}) holds no text.")
    # Whole documents, scored for perplexity: no few-shot prompt (recorded as 0-shot).
    return LoadedTask(name, path, 0, documents=documents)
  try:
    items = kind.read(path)
  except TaskError:
    raise
  except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # a field's value
    raise TaskError(f"task file {path} ({name}) has a malformed record ({type(e).__name__}: "
                    f"{e}); see the task formats in docs/evaluation.md.") from None
  if not items:
    raise TaskError(f"task file {path} ({name}) holds no examples.")
  return LoadedTask(name, path, num_fewshot, items=with_fewshot(items, num_fewshot, seed, limit))


def load_tasks(specs: str, *, num_fewshot: int = 0, limit: int = 0, seed: int = 0,
               data_dir: str | None = None) -> list[LoadedTask]:
  """Every task of a "NAME:PATH,..." spec (`parse_specs`), read and checked."""
  return [load_task(name, path, num_fewshot=num_fewshot, limit=limit, seed=seed)
          for name, path in parse_specs(specs, data_dir)]


def score_groups(specs: str, results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """The summary ({"group": NAME, "score": ..., "missing": [...], ...}) of each group a
  "NAME:PATH,..." spec names, from the results (`score_task`'s) of its tasks."""
  names = [spec.partition(":")[0].strip() for spec in specs.split(",")]
  return [{"group": name, **GROUPS[name].summary(results)} for name in names if name in GROUPS]


def score_task(task: LoadedTask, scorer: Scorer) -> dict[str, Any]:
  """The task's metrics (its kind's `score`), plus task, file and num_fewshot."""
  config_lib.language_model(scorer.config, f"task {task.name}")
  examples = task.documents if task.documents is not None else task.items
  result = TASKS[task.name].score(scorer, examples)
  return {"task": task.name, "file": task.path, "num_fewshot": task.num_fewshot, **result}


def load_eval_tasks(config: Config) -> list[LoadedTask]:
  """The zero-shot tasks of `train.eval_tasks` (first `train.eval_tasks_limit` examples),
  read and checked: what a training run calls before it writes anything."""
  if not config.train.eval_tasks:
    return []
  return load_tasks(config.train.eval_tasks, limit=config.train.eval_tasks_limit,
                    seed=config.seed, data_dir=config.data.data_dir)


def in_training_evaluator(config: Config, tokenizer, loaded: Sequence[LoadedTask], mesh
                          ) -> Callable[[Any], dict[str, float]]:
  """params -> the tasks' results as flat eval metrics for metrics.jsonl / TensorBoard:
  eval_{task}_{acc, acc_norm, perplexity, word_perplexity, bits_per_byte} and the GLUE metrics
  (mcc, f1, f1a, em, pearson, spearman) and the generative ones (bleu, chrf, rouge1, rouge2,
  rougeL) (empty without tasks). The scorer compiles once per
  length bucket, on first use."""
  scorer = Scorer(config, None, tokenizer, mesh, batch_size=config.train.global_batch_size)
  keys = ("acc", "acc_norm", "perplexity", "word_perplexity", "bits_per_byte", "mcc", "f1",
          "f1a", "em", "pearson", "spearman", "bleu", "chrf", "rouge1", "rouge2", "rougeL")

  def evaluate(params: Any) -> dict[str, float]:
    scorer.params = params
    results = [score_task(task, scorer) for task in loaded]
    return {f"eval_{r['task']}_{k}": float(r[k]) for r in results for k in keys if k in r}
  return evaluate


# GLUE and SuperGLUE (jaxlm/glue.py) and the generative tasks (jaxlm/generative.py: answers
# generated and scored against references) build on this module and add their tasks (and GLUE's
# groups) to TASKS and GROUPS when imported; imported last, so any of them may be imported first.
from jaxlm import generative as _generative  # noqa: E402,F401  pylint: disable=wrong-import-position
from jaxlm import glue as _glue  # noqa: E402,F401  pylint: disable=wrong-import-position
