"""GLUE and SuperGLUE: every task read from its published files (or TFDS dataset), prompted as
lm-evaluation-harness prompts it, scored zero/few-shot with the benchmark's official metrics.

Each example is multiple choice, scored as `tasks.score_items` scores (the log-likelihood of
each choice's continuation; the prediction is the choice of highest log-likelihood), and the
predictions of all examples give the task's metrics, computed with scikit-learn and SciPy:

  GLUE       cola: mcc; sst2, mnli, mnli_mismatched, qnli, rte, wnli: acc; mrpc, qqp: acc and
             f1 (the positive class: paraphrase, duplicate); stsb: pearson and spearman
  SuperGLUE  boolq, copa, rte, wic, wsc: acc; cb: acc and f1 (macro over its 3 classes);
             multirc: f1a (binary F1 over every answer option) and em (the share of questions
             with every option right); record: f1 and em (the best over the gold answers, SQuAD's
             normalisation), the choices being the passage's entities

STS-B (no harness task): the choices are the ratings " 0" ... " 5" and the prediction is the
expected rating under the model, sum_k k * softmax(log-likelihoods)_k, not the argmax.
MNLI is two tasks, `mnli` (dev_matched) and `mnli_mismatched` (dev_mismatched). sst2, rte and
boolq are tasks.py's, unchanged (they report acc and acc_norm).

The groups `glue:DIR` and `superglue:DIR` (or `glue:tfds`, `superglue:tfds`) score every task of
the benchmark found (the dev/validation split: the test labels are hidden) and report the
benchmark's score as its papers do: a task's score is the mean of its metrics (MRPC: (acc +
f1) / 2; STS-B: (pearson + spearman) / 2; MNLI: the mean of matched and mismatched accuracy),
the benchmark's the mean over its tasks, with the tasks that were missing named. Metrics (and
scores) are fractions, not percentages. The diagnostics (GLUE's AX, SuperGLUE's AX-b, AX-g) are
not built.

Tasks, prompts and groups are added to `tasks.TASKS`, `tasks.TFDS_DEFAULTS` and `tasks.GROUPS`
when this module is imported (tasks.py imports it last).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import math
import os
import re
import string
from typing import Any, Callable, Sequence

import numpy as np

from jaxlm import tasks
from jaxlm.tasks import Item, TaskError, TaskGroup, TaskKind

# -- Items and rows -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GlueItem(Item):
  """An Item with what its task's metrics need beyond the label: `group` (MultiRC: the question
  the answer option belongs to), `answers` (ReCoRD: the gold answers; `entities[i]` is the
  entity `choices[i]` puts in the query), `target` (STS-B: the gold similarity, 0-5)."""
  group: Any = None
  entities: tuple[str, ...] = ()
  answers: tuple[str, ...] = ()
  target: float = 0.0


# TFDS splits of the catalog's glue/* and super_glue/* datasets (MNLI's, AX's: their own).
TFDS_SPLITS = ("train", "validation", "test")
TFDS_SPLITS_OF = {
    "glue/mnli": ("train", "validation_matched", "validation_mismatched", "test_matched",
                  "test_mismatched"),
    "glue/mnli_matched": ("validation", "test"), "glue/mnli_mismatched": ("validation", "test"),
    "glue/ax": ("test",), "super_glue/axb": ("test",), "super_glue/axg": ("test",)}


def _rows(path: str) -> list[tasks._Row]:
  """The records of a task file or TFDS dataset (tasks._rows), a GLUE or SuperGLUE dataset's
  split checked first."""
  if path.startswith("tfds:"):
    location, _, directory = path[len("tfds:"):].rpartition("@")
    dataset, _, split = location.rpartition(":")
    known = TFDS_SPLITS_OF.get(dataset, TFDS_SPLITS)
    if dataset.startswith(("glue/", "super_glue/")) and split not in known:
      raise TaskError(f"TFDS dataset {dataset} has no split {split!r}; one of "
                      f"{', '.join(known)} (tasks score the validation split by default: the "
                      f"test labels are hidden).")
  return tasks._rows(path)


def _label(row: tasks._Row, names: Sequence[str], *fields: str) -> int:
  """The row's label (the first of `fields` it has) as an index of `names`: the class's name
  (any case; a JSON boolean for ("False", "True")) or its index (TFDS's ClassLabel, GLUE's 0/1
  columns)."""
  value = row.field(*fields)
  text = str(value).strip()
  lowered = [name.lower() for name in names]
  if text.lower() in lowered:
    return lowered.index(text.lower())
  if text.isdigit() and int(text) < len(names):
    return int(text)
  hidden = (" (-1: an example of a test split, whose labels are hidden; score the dev/validation "
            "split)" if text == "-1" else "")
  raise row.error(f"label {value!r} is not one of {', '.join(names)} (or 0-{len(names) - 1})"
                  f"{hidden}; fix the row or pass the task's dev/validation file.")


def _choice(row: tasks._Row, context: str, choices: Sequence[str], label: int,
            **fields: Any) -> GlueItem:
  item = row.choice(context, choices, label)  # (checks the label)
  return GlueItem(item.contexts, item.choices, item.label, **fields)


def _text(row: tasks._Row, *fields: str) -> str:
  value = row.field(*fields)
  if not isinstance(value, str):
    raise row.error(f"field {fields[0]!r} must be text, not {value!r}.")
  return value


# -- GLUE readers (the TSV files of GLUE's download script, or TFDS's glue/TASK) -----------------

COLA_COLUMNS = ("source", "label", "mark", "sentence")  # CoLA's TSV: no header row


def _cola_rows(path: str) -> list[tasks._Row]:
  """CoLA's published dev.tsv/train.tsv have no header row: source, label, the original
  acceptability mark, sentence (read with quotes as text, as every GLUE TSV)."""
  if path.startswith("tfds:") or not path.endswith(".tsv"):
    return _rows(path)
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise TaskError(f"task file {path} cannot be read ({e}).") from None
  rows = []
  for index, line in enumerate(lines):
    if not line:
      continue
    row = tasks._Row(dict(zip(COLA_COLUMNS, line)), path, index)
    if len(line) != len(COLA_COLUMNS):
      raise row.error(f"{len(line)} columns; CoLA's TSV has 4 (source, label, original mark, "
                      f"sentence) and no header row: pass its dev.tsv as published.")
    rows.append(row)
  return rows


def read_cola(path: str) -> list[Item]:
  """CoLA (MCC): headerless TSV, or TFDS glue/cola (sentence, label); 1 = acceptable."""
  return [_choice(r, f"{_text(r, 'sentence')}\nQuestion: Does this sentence make sense?"
                  "\nAnswer:", [" no", " yes"],
                  _label(r, ("unacceptable", "acceptable"), "label", "is_acceptable"))
          for r in _cola_rows(path)]


def read_mrpc(path: str) -> list[Item]:
  """MRPC (acc, F1): TSV (Quality, #1 ID, #2 ID, #1 String, #2 String) or TFDS glue/mrpc
  (sentence1, sentence2, label); 1 = paraphrase."""
  return [_choice(r, f"Sentence 1: {_text(r, 'sentence1', '#1 String')}\nSentence 2: "
                  f"{_text(r, 'sentence2', '#2 String')}\nQuestion: Do both sentences mean the "
                  "same thing?\nAnswer:", [" no", " yes"],
                  _label(r, ("not_equivalent", "equivalent"), "label", "Quality"))
          for r in _rows(path)]


def read_qqp(path: str) -> list[Item]:
  """QQP (acc, F1): TSV (id, qid1, qid2, question1, question2, is_duplicate) or TFDS glue/qqp
  (question1, question2, label); 1 = duplicate."""
  return [_choice(r, f"Question 1: {_text(r, 'question1')}\nQuestion 2: "
                  f"{_text(r, 'question2')}\nQuestion: Do both questions ask the same thing?"
                  "\nAnswer:", [" no", " yes"],
                  _label(r, ("not_duplicate", "duplicate"), "label", "is_duplicate"))
          for r in _rows(path)]


STSB_RATINGS = tuple(f" {k}" for k in range(6))


def stsb_target(row: tasks._Row) -> float:
  """An STS-B row's gold similarity (its score or label field), checked to be 0-5."""
  value = row.field("score", "label")
  try:
    target = float(value)
  except (TypeError, ValueError):
    target = math.nan
  if not 0 <= target <= 5:
    raise row.error(f"score {value!r} is not a similarity from 0 to 5; fix the row or pass "
                    f"STS-B's dev file.")
  return target


def read_stsb(path: str) -> list[Item]:
  """STS-B (Pearson, Spearman): TSV (sentence1, sentence2, score among its columns) or TFDS
  glue/stsb (label: the score). The harness has no STS-B task: the prompt is jaxlm's, in the
  harness's GLUE wording; the choices are the ratings 0-5 (the label, for few-shot
  demonstrations, is the gold score rounded)."""
  items = []
  for r in _rows(path):
    target = stsb_target(r)
    items.append(_choice(
        r, f"Sentence 1: {_text(r, 'sentence1')}\nSentence 2: {_text(r, 'sentence2')}\n"
        "Question: On a scale from 0 to 5, how similar in meaning are the two sentences?"
        "\nAnswer:", STSB_RATINGS, int(round(target)), target=target))
  return items


def read_mnli(path: str) -> list[Item]:
  """MNLI (acc; matched and mismatched are tasks mnli and mnli_mismatched): TSV
  (sentence1, sentence2, gold_label among its columns) or TFDS glue/mnli (premise, hypothesis,
  label)."""
  items = []
  for r in _rows(path):
    hypothesis = _text(r, "hypothesis", "sentence2").strip()
    hypothesis += "" if hypothesis.endswith(".") else "."
    items.append(_choice(
        r, f"{_text(r, 'premise', 'sentence1')}\nQuestion: {hypothesis} True, False or Neither?"
        "\nAnswer:", [" True", " Neither", " False"],
        _label(r, ("entailment", "neutral", "contradiction"), "label", "gold_label")))
  return items


def read_qnli(path: str) -> list[Item]:
  """QNLI (acc): TSV (index, question, sentence, label) or TFDS glue/qnli; 0 = entailment
  (the sentence answers the question: " yes")."""
  return [_choice(r, f"{_text(r, 'question')}\n{_text(r, 'sentence')}\nQuestion: Does this "
                  "response answer the question?\nAnswer:", [" yes", " no"],
                  _label(r, ("entailment", "not_entailment"), "label"))
          for r in _rows(path)]


def read_wnli(path: str) -> list[Item]:
  """WNLI (acc): TSV (index, sentence1, sentence2, label) or TFDS glue/wnli; 1 = entailment."""
  return [_choice(r, f"{_text(r, 'sentence1')}\nQuestion: {_text(r, 'sentence2')} True or "
                  "False?\nAnswer:", [" False", " True"],
                  _label(r, ("not_entailment", "entailment"), "label"))
          for r in _rows(path)]


# -- SuperGLUE readers (the JSONL files of SuperGLUE's download, or TFDS's super_glue/TASK) ------

def read_cb(path: str) -> list[Item]:
  """CB (acc, macro F1): premise, hypothesis, label (entailment, contradiction, neutral)."""
  return [_choice(r, f"{_text(r, 'premise')}\nQuestion: {_text(r, 'hypothesis')}. True, False, "
                  "or Neither?\nAnswer:", [" True", " False", " Neither"],
                  _label(r, ("entailment", "contradiction", "neutral"), "label"))
          for r in _rows(path)]


def read_copa(path: str) -> list[Item]:
  """COPA (acc): premise, choice1, choice2, question (cause or effect), label 0/1: the premise
  without its full stop, joined by "because" or "therefore" to each choice (lower-cased first
  letter), as the harness does."""
  items = []
  for r in _rows(path):
    question = r.field("question")
    if question not in ("cause", "effect"):
      raise r.error(f"question {question!r} is neither 'cause' nor 'effect'.")
    connector = {"cause": "because", "effect": "therefore"}[question]
    choices = [_text(r, f"choice{k}") for k in (1, 2)]
    items.append(_choice(r, f"{_text(r, 'premise').strip()[:-1]} {connector}",
                         [" " + c[:1].lower() + c[1:] for c in choices],
                         _label(r, ("choice1", "choice2"), "label")))
  return items


def read_multirc(path: str) -> list[Item]:
  """MultiRC (F1a, EM): an item per answer option. The published JSONL nests passage.text,
  passage.questions[].question, .answers[].text, .label; TFDS super_glue/multirc has one record
  per option (paragraph, question, answer, label, idx). The harness's prompt; its 0.4 YAML
  lists the " yes" choice first and indexes the choices by the label (1 = true), which pairs a
  right answer with " no" (its earlier fix, harness PR #243, paired true with yes): here a
  right answer is " yes"."""
  items = []
  for r in _rows(path):
    for group, text, question, answer, label in multirc_options(r):
      items.append(_choice(r, f"{text}\nQuestion: {question}\nAnswer:",
                           [f" {answer}\nIs the answer correct? no",
                            f" {answer}\nIs the answer correct? yes"], label, group=group))
  return items


def multirc_options(r: tasks._Row) -> list[tuple[str, str, str, str, int]]:
  """A MultiRC record's answer options: (group (its question), passage text, question, answer,
  label 0/1 (1: a right answer)), from either layout (see `read_multirc`)."""
  passage = r.field("passage", "paragraph")
  if isinstance(passage, dict):  # the published layout: a passage with its questions
    options = [(f"{r.index}/{q}", question.get("question"), answer.get("text"),
                answer.get("label"))
               for q, question in enumerate(passage.get("questions", []))
               for answer in question.get("answers", [])]
    text = passage.get("text")
  else:
    idx = r.field("idx")
    options = [(f"{idx.get('paragraph')}/{idx.get('question')}" if isinstance(idx, dict)
                else str(idx), r.field("question"), r.field("answer"), r.field("label"))]
    text = passage
  out = []
  for group, question, answer, label in options:
    if not all(isinstance(v, str) for v in (text, question, answer)):
      raise r.error("needs passage text, and a question and answer text for every answer "
                    "option.")
    row = dataclasses.replace(r, fields={"label": label})
    out.append((group, text, question, answer, _label(row, ("False", "True"), "label")))
  return out


def _record_passage(text: str) -> str:
  """ReCoRD's passage as the harness writes it: the article, then its highlights as a list."""
  initial, *highlights = text.strip().split("\n@highlight\n")
  return initial + "\n\n" + "".join(f"  - {highlight}.\n" for highlight in highlights)


def read_record(path: str) -> list[Item]:
  """ReCoRD (F1, EM): an item per query; the choices are the query with its @placeholder
  replaced by each of the passage's entities (distinct, sorted), as the harness does. The
  published JSONL: passage {text, entities [{start, end} (end inclusive)]}, qas [{query,
  answers [{text, ...}]}]; TFDS super_glue/record: passage, query, entities, answers."""
  items = []
  for r in _rows(path):
    for text, entities, query, answers in record_queries(r):
      found = [entities.index(a) for a in answers if a in entities]
      choices = [" " + f"  - {query}".replace("@placeholder", e) for e in entities]
      items.append(_choice(r, _record_passage(text), choices, found[0],
                           entities=tuple(entities), answers=tuple(answers)))
  return items


def record_queries(r: tasks._Row) -> list[tuple[str, list[str], str, list[str]]]:
  """A ReCoRD record's queries: (passage text, its entities (distinct, sorted), query (with
  its @placeholder), gold answers (sorted, at least one of them an entity)), from either
  layout (see `read_record`)."""
  passage = r.field("passage")
  if isinstance(passage, dict):  # the published layout
    text = passage.get("text")
    if not isinstance(text, str) or not isinstance(passage.get("entities"), list):
      raise r.error("passage needs text and a list of entities.")
    entities = sorted({text[e["start"]:e["end"] + 1] for e in passage["entities"]})
    queries = [(qa.get("query"), sorted({a["text"] for a in qa.get("answers", [])}))
               for qa in r.field("qas")]
  else:
    text, entities = passage, sorted(set(r.field("entities")))
    queries = [(r.field("query"), sorted(set(r.field("answers"))))]
  for query, answers in queries:
    if not isinstance(query, str) or "@placeholder" not in query:
      raise r.error(f"query {query!r} has no @placeholder.")
    if not any(a in entities for a in answers):
      raise r.error(f"none of the answers {answers} is one of the passage's entities (a "
                    f"test split has no answers: score the validation split).")
  return [(text, entities, query, answers) for query, answers in queries]


def read_wic(path: str) -> list[Item]:
  """WiC (acc): word, sentence1, sentence2, start1, end1 (the word's span in sentence1),
  label (true: the same sense)."""
  items = []
  for r in _rows(path):
    sentence1 = _text(r, "sentence1")
    word = sentence1[int(r.field("start1")):int(r.field("end1"))]
    items.append(_choice(r, f"Sentence 1: {sentence1}\nSentence 2: {_text(r, 'sentence2')}\n"
                         f"Question: Is the word '{word}' used in the same way in the two "
                         "sentences above?\nAnswer:", [" no", " yes"],
                         _label(r, ("False", "True"), "label")))
  return items


def _fix_wsc_span(example: dict[str, Any], key: str) -> None:
  """A WSC span made a substring of the text, as TFDS's (and Hugging Face's) wsc.fixed does
  (tensorflow_datasets/text/super_glue.py `_fix_wst`, reproduced step by step, including
  its "theyscold" case that only moves the index)."""
  text, index = example[key + "_text"], example[key + "_index"]
  if text in example["text"] or text in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
    return
  if "theyscold" in text:
    example["span2_index"] = 10
  first_word = example["text"].split()[index]
  text = (text[0].lower() if first_word[0].islower() else text[0].upper()) + text[1:]
  example[key + "_text"] = text.rstrip(".").replace("\n", " ")


def _detokenize(text: str) -> str:
  """lm_eval.utils.general_detokenize."""
  for old, new in ((" n't", "n't"), (" )", ")"), ("( ", "("), ('" ', '"'), (' "', '"')):
    text = text.replace(old, new)
  return re.sub(r" (['.,])", r"\1", text)


def wsc_spans(r: tasks._Row) -> tuple[str, str, str]:
  """A WSC record's (passage with its pronoun marked *...*, pronoun (span2), noun (span1)),
  the spans fixed as TFDS's wsc.fixed (see `read_wsc`)."""
  example = dict(r.fields, **(r.fields.get("target") or {}))
  names = ("text", "span1_index", "span1_text", "span2_index", "span2_text")
  missing = [name for name in names if name not in example]
  if missing:
    raise r.error(f"no field {missing[0]!r} (top-level or in target); its fields are "
                  f"{sorted(example)}.")
  _fix_wsc_span(example, "span1")
  _fix_wsc_span(example, "span2")
  raw, pronoun, noun = example["text"], example["span2_text"], example["span1_text"]
  pre = " ".join(raw.split()[:int(example["span2_index"])])
  post = raw[len(pre) + len(pronoun) + 1:]
  return _detokenize(pre + f" *{pronoun}*" + post), pronoun, noun


def read_wsc(path: str) -> list[Item]:
  """WSC (acc), SuperGLUE's wsc.fixed as the harness reads it: the published JSONL (text,
  target {span1_index, span1_text, span2_index, span2_text}, label) with TFDS's span fixes, or
  TFDS super_glue/wsc.fixed (the spans top-level). The pronoun (span2, a word index) is
  marked *...* in the passage; does it refer to span1?"""
  items = []
  for r in _rows(path):
    passage, pronoun, noun = wsc_spans(r)
    items.append(_choice(r, f"Passage: {passage}\nQuestion: In the passage above, does the "
                         f"pronoun \"*{pronoun}*\" refer to \"*{noun}*\"?\nAnswer:",
                         [" no", " yes"], _label(r, ("False", "True"), "label")))
  return items


# -- Metrics -------------------------------------------------------------------------------------
# scikit-learn and SciPy, imported when a metric is computed (a training process never needs
# them); labels and predictions are class indices.

def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
  from sklearn.metrics import accuracy_score
  return float(accuracy_score(labels, predictions))


def f1(labels: Sequence[int], predictions: Sequence[int]) -> float:
  """Binary F1 of class 1 (MRPC: paraphrase; QQP: duplicate; MultiRC's F1a: a right answer);
  0 where it has no true positives (as sklearn's default, without its warning)."""
  from sklearn.metrics import f1_score
  return float(f1_score(labels, predictions, zero_division=0.0))


def macro_f1(labels: Sequence[int], predictions: Sequence[int], num_classes: int = 3) -> float:
  """The unweighted mean of each class's F1 (CB: the harness's and SuperGLUE's definition)."""
  from sklearn.metrics import f1_score
  return float(f1_score(labels, predictions, labels=list(range(num_classes)), average="macro",
                        zero_division=0.0))


def mcc(labels: Sequence[int], predictions: Sequence[int]) -> float:
  """Matthews correlation (CoLA); 0 where either side is constant."""
  from sklearn.metrics import matthews_corrcoef
  return float(matthews_corrcoef(labels, predictions))


def pearson(targets: Sequence[float], predictions: Sequence[float]) -> float:
  """Pearson's r (STS-B); NaN for fewer than 2 examples or constant predictions."""
  from scipy.stats import pearsonr
  if len(targets) < 2 or np.ptp(predictions) == 0 or np.ptp(targets) == 0:
    return math.nan
  return float(pearsonr(targets, predictions).statistic)


def spearman(targets: Sequence[float], predictions: Sequence[float]) -> float:
  """Spearman's rank correlation (STS-B); NaN as `pearson`."""
  from scipy.stats import spearmanr
  if len(targets) < 2 or np.ptp(predictions) == 0 or np.ptp(targets) == 0:
    return math.nan
  return float(spearmanr(targets, predictions).statistic)


def exact_match_groups(groups: Sequence[Any], labels: Sequence[int],
                       predictions: Sequence[int]) -> float:
  """MultiRC's EM: the share of questions (groups) whose every answer option is predicted
  right."""
  right: dict[Any, bool] = collections.defaultdict(lambda: True)
  for group, label, prediction in zip(groups, labels, predictions):
    right[group] &= bool(label == prediction)
  return float(np.mean(list(right.values())))


# SQuAD's answer normalisation and token F1 / exact match, as the official SQuAD 2.0 evaluation
# script (evaluate-v2.0.py: normalize_answer, get_tokens, compute_exact, compute_f1) writes them;
# ReCoRD's official evaluation (SuperGLUE's record_evaluation.py) normalises the same way, and
# the harness's record task scores with these functions (transformers' squad_metrics copy).

def normalize_answer(text: str) -> str:
  """Lower case, no punctuation, no articles (a, an, the), single spaces."""
  text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
  """F1 of the normalised answers' words; two empty answers match (SQuAD 2.0)."""
  predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
  if not predicted or not wanted:
    return float(predicted == wanted)
  same = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(predicted), same / len(wanted)
  return 2 * precision * recall / (precision + recall)


def best_over_answers(metric: Callable[[str, str], float], prediction: str,
                      answers: Sequence[str]) -> float:
  """The metric of the prediction against the gold answer it matches best (ReCoRD)."""
  return max(metric(prediction, gold) for gold in answers)


# -- Scoring -------------------------------------------------------------------------------------

def predictions(scorer: tasks.Scorer, items: Sequence[Item]) -> np.ndarray:
  """The predicted choice of each item [len(items)]: the highest log-likelihood."""
  return np.array([int(np.argmax(ll)) for ll in tasks.choice_loglikelihoods(scorer, items)],
                  dtype=np.int64)


def classification(**metrics: Callable[[Sequence[int], Sequence[int]], float]
                   ) -> Callable[[tasks.Scorer, Sequence[Item]], dict[str, float]]:
  """A task's score function: each of `metrics` (name=fn(labels, predictions)) over the
  items' predicted choices, acc's standard error beside acc, and the number of examples."""

  def score(scorer: tasks.Scorer, items: Sequence[Item]) -> dict[str, float]:
    predicted, labels = predictions(scorer, items), np.array([item.label for item in items])
    result = {}
    for name, metric in metrics.items():
      result[name] = metric(labels, predicted)
      if name == "acc":
        result["acc_stderr"] = tasks._stderr((predicted == labels).astype(np.float64))
    return {**result, "examples": len(items)}
  return score


def expected_ratings(scorer: tasks.Scorer, items: Sequence[Item]) -> np.ndarray:
  """STS-B: each item's expected rating under the model, sum_k k * p(k), with p the softmax
  of the log-likelihoods of the ratings " 0" ... " 5"."""
  out = []
  for ll in tasks.choice_loglikelihoods(scorer, items):
    p = np.exp(ll - ll.max())
    out.append(float(np.dot(p / p.sum(), np.arange(len(ll)))))
  return np.array(out)


def score_stsb(scorer: tasks.Scorer, items: Sequence[Item]) -> dict[str, float]:
  """Pearson and Spearman correlation of the expected ratings with the gold scores."""
  rated, targets = expected_ratings(scorer, items), [item.target for item in items]
  return {"pearson": pearson(targets, rated), "spearman": spearman(targets, rated),
          "examples": len(items)}


def score_multirc(scorer: tasks.Scorer, items: Sequence[Item]) -> dict[str, float]:
  """f1a (F1 of "right answer" over all answer options), em (questions with every option
  right), acc (answer options right, the harness's metric)."""
  predicted, labels = predictions(scorer, items), np.array([item.label for item in items])
  correct = (predicted == labels).astype(np.float64)
  return {"f1a": f1(labels, predicted),
          "em": exact_match_groups([item.group for item in items], labels, predicted),
          "acc": float(correct.mean()), "acc_stderr": tasks._stderr(correct),
          "examples": len(items)}


def score_record(scorer: tasks.Scorer, items: Sequence[Item]) -> dict[str, float]:
  """The predicted entity's token F1 and exact match, each the best over the gold answers,
  averaged over queries (the harness's and ReCoRD's definition)."""
  predicted = predictions(scorer, items)
  entities = [item.entities[k] for item, k in zip(items, predicted)]
  return {"f1": float(np.mean([best_over_answers(token_f1, e, item.answers)
                               for e, item in zip(entities, items)])),
          "em": float(np.mean([best_over_answers(exact_match, e, item.answers)
                               for e, item in zip(entities, items)])),
          "examples": len(items)}


# -- The registry and the groups -----------------------------------------------------------------

TASKS: dict[str, TaskKind] = {
    "cola": TaskKind(read_cola, classification(mcc=mcc)),
    "mrpc": TaskKind(read_mrpc, classification(acc=accuracy, f1=f1)),
    "qqp": TaskKind(read_qqp, classification(acc=accuracy, f1=f1)),
    "stsb": TaskKind(read_stsb, score_stsb),
    "mnli": TaskKind(read_mnli, classification(acc=accuracy)),
    "mnli_mismatched": TaskKind(read_mnli, classification(acc=accuracy)),
    "qnli": TaskKind(read_qnli, classification(acc=accuracy)),
    "wnli": TaskKind(read_wnli, classification(acc=accuracy)),
    "cb": TaskKind(read_cb, classification(acc=accuracy, f1=macro_f1)),
    "copa": TaskKind(read_copa, classification(acc=accuracy)),
    "multirc": TaskKind(read_multirc, score_multirc),
    "record": TaskKind(read_record, score_record),
    "wic": TaskKind(read_wic, classification(acc=accuracy)),
    "wsc": TaskKind(read_wsc, classification(acc=accuracy)),
}

# Each benchmark's files (as its download leaves them under DIR: the dev/validation split) and
# TFDS datasets (dataset, split), task by task; sst2, rte and boolq are tasks.py's tasks.
GLUE_FILES = {
    "cola": "CoLA/dev.tsv", "sst2": "SST-2/dev.tsv", "mrpc": "MRPC/dev.tsv",
    "qqp": "QQP/dev.tsv", "stsb": "STS-B/dev.tsv", "mnli": "MNLI/dev_matched.tsv",
    "mnli_mismatched": "MNLI/dev_mismatched.tsv", "qnli": "QNLI/dev.tsv", "rte": "RTE/dev.tsv",
    "wnli": "WNLI/dev.tsv"}
SUPERGLUE_FILES = {
    "boolq": "BoolQ/val.jsonl", "cb": "CB/val.jsonl", "copa": "COPA/val.jsonl",
    "multirc": "MultiRC/val.jsonl", "record": "ReCoRD/val.jsonl", "rte": "RTE/val.jsonl",
    "wic": "WiC/val.jsonl", "wsc": "WSC/val.jsonl"}
GLUE_TFDS = {name: (f"glue/{name}", "validation") for name in GLUE_FILES}
GLUE_TFDS.update(mnli=("glue/mnli", "validation_matched"),
                 mnli_mismatched=("glue/mnli", "validation_mismatched"))
SUPERGLUE_TFDS = {name: (f"super_glue/{name}", "validation") for name in SUPERGLUE_FILES}
SUPERGLUE_TFDS.update(wsc=("super_glue/wsc.fixed", "validation"))

# A benchmark's score: per task, the metrics averaged (over all of the task's parts: MNLI's
# matched and mismatched), then the tasks averaged (GLUE: Wang et al. 2019, SuperGLUE: Wang et
# al. 2019b; the diagnostics not included).
BENCHMARKS: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "glue": {"cola": {"cola": ("mcc",)}, "sst2": {"sst2": ("acc",)},
             "mrpc": {"mrpc": ("acc", "f1")}, "stsb": {"stsb": ("pearson", "spearman")},
             "qqp": {"qqp": ("acc", "f1")},
             "mnli": {"mnli": ("acc",), "mnli_mismatched": ("acc",)},
             "qnli": {"qnli": ("acc",)}, "rte": {"rte": ("acc",)}, "wnli": {"wnli": ("acc",)}},
    "superglue": {"boolq": {"boolq": ("acc",)}, "cb": {"cb": ("acc", "f1")},
                  "copa": {"copa": ("acc",)}, "multirc": {"multirc": ("f1a", "em")},
                  "record": {"record": ("f1", "em")}, "rte": {"rte": ("acc",)},
                  "wic": {"wic": ("acc",)}, "wsc": {"wsc": ("acc",)}},
}


def benchmark_summary(benchmark: str, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The benchmark's score from the results of its tasks (`tasks.score_task`'s, matched by
  "task"): `score` the mean over the tasks scored of each one's mean metric (`task_scores`),
  `missing` the tasks (MNLI: the parts) with no result, not counted."""
  by_task = {result["task"]: result for result in results}
  scores, missing = {}, []
  for task, parts in BENCHMARKS[benchmark].items():
    values = [float(by_task[part][metric]) for part, metrics in parts.items()
              if part in by_task for metric in metrics]
    missing += [part for part in parts if part not in by_task]
    if values:
      scores[task] = float(np.mean(values))
  return {"score": float(np.mean(list(scores.values()))) if scores else math.nan,
          "task_scores": scores, "tasks_scored": len(scores),
          "tasks": len(BENCHMARKS[benchmark]), "missing": missing}


def benchmark_members(benchmark: str, files: dict[str, str],
                      datasets: dict[str, tuple[str, str]]
                      ) -> Callable[[str, str | None], list[tuple[str, str]]]:
  """GROUP:DIR -> (task, file) of each of the benchmark's files found under DIR; GROUP:tfds ->
  (task, TFDS path) of each of its datasets prepared in data_dir/tfds."""

  def members(spec: str, data_dir: str | None) -> list[tuple[str, str]]:
    if spec == "tfds":
      if not data_dir:
        raise TaskError(f"task {benchmark}:tfds reads TFDS datasets from data.data_dir; set it.")
      directory = os.path.join(os.path.expanduser(data_dir), "tfds")
      found = [(task, f"tfds:{dataset}:{split}@{directory}")
               for task, (dataset, split) in datasets.items()
               if os.path.isdir(os.path.join(directory, dataset))]
      expected = f"none of its datasets ({', '.join(sorted({d for d, _ in datasets.values()}))})"
      where = f"is prepared in {directory}"
    else:
      directory = os.path.expanduser(spec)
      if spec.startswith("tfds:") or not os.path.isdir(directory):
        raise TaskError(f"task {benchmark}:{spec}: write {benchmark}:DIR (the folder holding "
                        f"the benchmark's task folders) or {benchmark}:tfds.")
      found = [(task, os.path.join(directory, name)) for task, name in files.items()
               if os.path.isfile(os.path.join(directory, name))]
      expected, where = f"none of its files ({', '.join(files.values())})", f"is in {directory}"
    if not found:
      raise TaskError(f"task {benchmark}:{spec}: {expected} {where}.")
    return found
  return members


tasks.TASKS.update(TASKS)
tasks.TFDS_DEFAULTS.update({name: GLUE_TFDS[name] for name in TASKS if name in GLUE_TFDS})
tasks.TFDS_DEFAULTS.update({name: SUPERGLUE_TFDS[name] for name in TASKS
                            if name in SUPERGLUE_TFDS})
tasks.GROUPS.update(
    glue=TaskGroup(benchmark_members("glue", GLUE_FILES, GLUE_TFDS),
                   lambda results: benchmark_summary("glue", results)),
    superglue=TaskGroup(benchmark_members("superglue", SUPERGLUE_FILES, SUPERGLUE_TFDS),
                        lambda results: benchmark_summary("superglue", results)))
