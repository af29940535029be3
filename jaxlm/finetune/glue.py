"""GLUE and SuperGLUE fine-tuned natively (GPT-1's recipe, Radford et al. 2018, section 3.3):
each task read from its published files (GLUE's TSVs, SuperGLUE's JSONL; or TFDS's glue/* and
super_glue/* datasets) with jaxlm/glue.py's readers, a head on the last real token of the
input, and the benchmark's official metrics (jaxlm/glue.py's) at every evaluation.

Inputs: the task's texts, each tokenized on its own, joined by the tokens of DELIMITER ("$",
the paper's delimiter token; no new token, so any tokenizer and model work unchanged):
ids(text1) + ids("$") + ids(text2) [+ ids("$") + ids(text3)]. An input longer than
finetune.max_length loses the end of its first text (the passage or premise, the longest);
one still too long with a first text of one token is refused, naming its row.

  kind            tasks (texts, in order)                          head, loss
  classification  cola, sst2 (sentence); mrpc, stsb, wnli         the task's classes (its label
                  (sentence1, sentence2); qqp (question1,          names, in the benchmark's
                  question2); mnli, rte, cb (premise, hypothesis); order), cross-entropy
                  qnli (question, sentence); boolq (passage,
                  question); wic (sentence1, sentence2, word);
                  wsc (passage with the pronoun marked *...*,
                  pronoun, noun); multirc, an example per answer
                  option (passage, question, answer)
  regression      stsb                                             one output
                                                                   (model.num_classes=1), MSE
  candidates      copa, an example per choice (premise, "cause" /  False/True per candidate,
                  "effect", choice); record, an example per        cross-entropy; the candidate
                  entity of the passage (passage, the query with   of the largest log-odds of
                  the entity in its @placeholder)                  True is the answer

Metrics ({split}_NAME, fractions, glue.py's functions): cola mcc; sst2, mnli, qnli, rte, wnli,
boolq, wic, wsc, copa acc; mrpc, qqp acc and f1; cb acc and f1 (macro); stsb pearson and
spearman (of the head's output); multirc f1a and em; record f1 and em (of the picked entity,
the best over the gold answers). {split}_score is the task's benchmark score, the mean of its
metrics (glue.BENCHMARKS: MRPC (acc + f1) / 2, CoLA MCC); the best checkpoint has the highest
validation_score (ties: the lower validation loss). MNLI's mismatched dev file is scored as
--test_data. The data comes as the benchmark's splits: --data (train) and --validation_data
(dev) are both required, --test_data is optional (the benchmark's test labels are hidden).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jaxlm import data as data_lib
from jaxlm import glue as glue_lib
from jaxlm import loss as loss_lib
from jaxlm.config import Config, FinetuneConfig
from jaxlm.finetune.classifier import check_no_lm_head, label_ids
from jaxlm.finetune.objective import Batch, Encoded, Example, FinetuneError, Objective, register
from jaxlm.tasks import _Row

DELIMITER = "$"  # between the texts of an input, tokenized on its own
BINARY = ("False", "True")


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """read(path, task name) -> examples (glue.py's errors name the file and row); classes: the
  head's outputs, in order (("score",): one regression output); score(examples, labels,
  logits [num_examples, classes]) -> the task's metrics (glue.BENCHMARKS's, by name)."""
  read: Callable[[str, str], list[Example]]
  classes: tuple[str, ...]
  score: Callable[[Sequence[Example], np.ndarray, np.ndarray], dict[str, float]]


def _example(r: _Row, task: str, texts: Sequence[str], label: str, **record: Any) -> Example:
  return Example(f"task file {r.path}, row {r.index + 1}", f" {DELIMITER} ".join(texts), label,
                 record=dict(task=task, texts=tuple(texts), **record))


def _texts_and_label(text_fields: Sequence[tuple[str, ...]], label_fields: tuple[str, ...],
                     names: tuple[str, ...], rows: Callable[[str], list[_Row]] = glue_lib._rows
                     ) -> Callable[[str, str], list[Example]]:
  """A reader of a task whose record has its texts (each the first of its field names the
  record has) and a label among `names` (glue._label: a name or an index)."""
  def read(path: str, task: str) -> list[Example]:
    return [_example(r, task, [glue_lib._text(r, *fields) for fields in text_fields],
                     names[glue_lib._label(r, names, *label_fields)]) for r in rows(path)]
  return read


def _read_stsb(path: str, task: str) -> list[Example]:
  return [_example(r, task, [glue_lib._text(r, "sentence1"), glue_lib._text(r, "sentence2")],
                   "score", score=glue_lib.stsb_target(r)) for r in glue_lib._rows(path)]


def _read_wsc(path: str, task: str) -> list[Example]:
  return [_example(r, task, glue_lib.wsc_spans(r), BINARY[glue_lib._label(r, BINARY, "label")])
          for r in glue_lib._rows(path)]


def _read_multirc(path: str, task: str) -> list[Example]:
  return [_example(r, task, [text, question, answer], BINARY[label], group=group)
          for r in glue_lib._rows(path)
          for group, text, question, answer, label in glue_lib.multirc_options(r)]


def _read_copa(path: str, task: str) -> list[Example]:
  examples = []
  for r in glue_lib._rows(path):
    question = r.field("question")
    if question not in ("cause", "effect"):
      raise r.error(f"question {question!r} is neither 'cause' nor 'effect'.")
    right = glue_lib._label(r, ("choice1", "choice2"), "label")
    premise = glue_lib._text(r, "premise")
    examples += [_example(r, task, [premise, question, glue_lib._text(r, f"choice{k + 1}")],
                          BINARY[k == right], group=r.index) for k in (0, 1)]
  return examples


def _read_record(path: str, task: str) -> list[Example]:
  examples = []
  for r in glue_lib._rows(path):
    for q, (text, entities, query, answers) in enumerate(glue_lib.record_queries(r)):
      passage = glue_lib._record_passage(text)
      examples += [_example(r, task, [passage, query.replace("@placeholder", entity)],
                            BINARY[entity in answers], group=(r.index, q), entity=entity,
                            answers=tuple(answers)) for entity in entities]
  return examples


def _classification(**metrics: Callable[[np.ndarray, np.ndarray], float]
                    ) -> Callable[[Sequence[Example], np.ndarray, np.ndarray], dict[str, float]]:
  """Each metric (name=fn(labels, predictions)) of the predicted classes (the argmax)."""
  def score(examples, labels, logits):
    predicted = np.argmax(logits, axis=-1)
    return {name: fn(labels, predicted) for name, fn in metrics.items()}
  return score


def _score_stsb(examples, targets, logits):
  return {"pearson": glue_lib.pearson(targets, logits[:, 0]),
          "spearman": glue_lib.spearman(targets, logits[:, 0])}


def _score_multirc(examples, labels, logits):
  predicted = np.argmax(logits, axis=-1)
  return {"f1a": glue_lib.f1(labels, predicted),
          "em": glue_lib.exact_match_groups([e.record["group"] for e in examples], labels,
                                            predicted)}


def picks(examples: Sequence[Example], logits: np.ndarray) -> list[int]:
  """The picked candidate (an example index) of each group, in order of first appearance: the
  one of the largest log-odds of True, logits[:, 1] - logits[:, 0] (the first of equals)."""
  margin, best = logits[:, 1] - logits[:, 0], {}
  for i, example in enumerate(examples):
    group = example.record["group"]
    if group not in best or margin[i] > margin[best[group]]:
      best[group] = i
  return list(best.values())


def _score_copa(examples, labels, logits):
  return {"acc": float(np.mean([labels[i] == 1 for i in picks(examples, logits)]))}


def _score_record(examples, labels, logits):
  picked = [examples[i].record for i in picks(examples, logits)]
  return {name: float(np.mean([glue_lib.best_over_answers(metric, p["entity"], p["answers"])
                               for p in picked]))
          for name, metric in (("f1", glue_lib.token_f1), ("em", glue_lib.exact_match))}


_ACC = _classification(acc=glue_lib.accuracy)
_ACC_F1 = _classification(acc=glue_lib.accuracy, f1=glue_lib.f1)
_NLI = ("entailment", "not_entailment")
_PREMISE, _HYPOTHESIS = ("premise", "sentence1"), ("hypothesis", "sentence2")

TASKS: dict[str, GlueTask] = {
    # GLUE (the TSVs of its download script, or TFDS glue/TASK)
    "cola": GlueTask(_texts_and_label([("sentence",)], ("label", "is_acceptable"),
                                      ("unacceptable", "acceptable"), glue_lib._cola_rows),
                     ("unacceptable", "acceptable"), _classification(mcc=glue_lib.mcc)),
    "sst2": GlueTask(_texts_and_label([("sentence",)], ("label",), ("negative", "positive")),
                     ("negative", "positive"), _ACC),
    "mrpc": GlueTask(_texts_and_label([("sentence1", "#1 String"), ("sentence2", "#2 String")],
                                      ("label", "Quality"), ("not_equivalent", "equivalent")),
                     ("not_equivalent", "equivalent"), _ACC_F1),
    "qqp": GlueTask(_texts_and_label([("question1",), ("question2",)], ("label", "is_duplicate"),
                                     ("not_duplicate", "duplicate")),
                    ("not_duplicate", "duplicate"), _ACC_F1),
    "stsb": GlueTask(_read_stsb, ("score",), _score_stsb),
    "mnli": GlueTask(_texts_and_label([_PREMISE, _HYPOTHESIS], ("label", "gold_label"),
                                      ("entailment", "neutral", "contradiction")),
                     ("entailment", "neutral", "contradiction"), _ACC),
    "qnli": GlueTask(_texts_and_label([("question",), ("sentence",)], ("label",), _NLI), _NLI,
                     _ACC),
    "rte": GlueTask(_texts_and_label([_PREMISE, _HYPOTHESIS], ("label",), _NLI), _NLI, _ACC),
    "wnli": GlueTask(_texts_and_label([("sentence1",), ("sentence2",)], ("label",),
                                      ("not_entailment", "entailment")),
                     ("not_entailment", "entailment"), _ACC),
    # SuperGLUE (the JSONL files of its download, or TFDS super_glue/TASK); rte is GLUE's
    "boolq": GlueTask(_texts_and_label([("passage",), ("question",)], ("label", "answer"),
                                       BINARY), BINARY, _ACC),
    "cb": GlueTask(_texts_and_label([("premise",), ("hypothesis",)], ("label",),
                                    ("entailment", "contradiction", "neutral")),
                   ("entailment", "contradiction", "neutral"),
                   _classification(acc=glue_lib.accuracy, f1=glue_lib.macro_f1)),
    "copa": GlueTask(_read_copa, BINARY, _score_copa),
    "multirc": GlueTask(_read_multirc, BINARY, _score_multirc),
    "record": GlueTask(_read_record, BINARY, _score_record),
    "wic": GlueTask(_texts_and_label([("sentence1",), ("sentence2",), ("word",)], ("label",),
                                     BINARY), BINARY, _ACC),
    "wsc": GlueTask(_read_wsc, BINARY, _ACC),
}


def task(name: str) -> GlueTask:
  if name not in TASKS:
    raise FinetuneError(f"finetune.glue_task={name!r} (--task): no such GLUE or SuperGLUE task; "
                        f"choose one of {', '.join(TASKS)}.")
  return TASKS[name]


def join_ids(parts: Sequence[Sequence[int]], delimiter: Sequence[int], max_length: int,
             where: str) -> list[int]:
  """parts[0] + delimiter + parts[1] + ...; longer than max_length: the end of parts[0] cut
  (at least one of its tokens kept), FinetuneError naming `where` if that is not enough."""
  parts = [list(p) for p in parts]
  total = sum(map(len, parts)) + len(delimiter) * (len(parts) - 1)
  excess = total - max_length
  if excess > 0 and len(parts) > 1 and len(parts[0]) - excess >= 1:
    parts[0] = parts[0][:len(parts[0]) - excess]
  elif excess > 0:
    raise FinetuneError(f"{where}: the input is {total} tokens, longer than max_length="
                        f"{max_length} even with its first text cut; raise "
                        f"--config.finetune.max_length (at most the model's context).")
  ids = parts[0]
  for part in parts[1:]:
    ids = ids + list(delimiter) + part
  if not ids:
    raise FinetuneError(f"{where}: the text is empty.")
  return ids


def encode(examples: Sequence[Example], tokenizer, classes: Sequence[str], max_length: int
           ) -> Encoded:
  """Each example's texts tokenized on their own (each distinct text once: ReCoRD's passage
  serves all its entities) and joined by DELIMITER's tokens (`join_ids`); labels: class ids,
  or STS-B's similarities (float32)."""
  distinct = list(dict.fromkeys([DELIMITER] + [t for e in examples for t in e.record["texts"]]))
  ids_of = dict(zip(distinct, tokenizer.encode_batch(distinct)))
  ids = [join_ids([ids_of[t] for t in e.record["texts"]], ids_of[DELIMITER], max_length,
                  e.where) for e in examples]
  labels = (np.asarray([e.record["score"] for e in examples], np.float32)
            if tuple(classes) == ("score",) else label_ids(examples, classes))
  return Encoded(list(examples), ids, [0] * len(ids), labels)


def _row(split: Encoded, index: int, length: int, pad_id: int) -> Batch:
  """The input, right-padded; last_index (where the head reads), labels (classes) or score
  (STS-B), row_weight."""
  ids, label = split.ids[index], split.labels[index]
  target = ({"score": np.float32(label)} if split.labels.dtype == np.float32
            else {"labels": np.int32(label)})
  return dict(data_lib.padded_row(ids, length, pad_id), last_index=np.int32(len(ids) - 1),
              row_weight=np.float32(1.0), **target)


def loss(config: Config) -> loss_lib.LossFn:
  """The classifier's cross-entropy, or STS-B's squared error (loss.py's), with the head's
  outputs at the last token [batch, classes] as the per-row output "logits" (for the metrics)."""
  sums_of = loss_lib.regression_sums if config.finetune.glue_task == "stsb" else (
      loss_lib.classifier_sums)

  def glue_loss(model, params, batch, rng):
    logits = loss_lib.class_logits(model, params, batch, rng).astype(jnp.float32)
    objective, sums = sums_of(logits, batch)
    return objective, dict(sums, logits=logits)
  return glue_loss


def split_metrics(name: str, split: Encoded, outputs: Mapping[str, np.ndarray]
                  ) -> dict[str, float]:
  """{name}_METRIC of the task's metrics, and {name}_score, their mean (the benchmark's)."""
  values = TASKS[split.examples[0].record["task"]].score(split.examples, split.labels,
                                                        outputs["logits"])
  return {**{f"{name}_{metric}": value for metric, value in values.items()},
          f"{name}_score": float(np.mean(list(values.values())))}


def _read(path: str, f: FinetuneConfig, tokenizer, flag: str) -> list[Example]:
  del tokenizer, flag  # (glue.py's errors name the file)
  examples = task(f.glue_task).read(path, f.glue_task)
  if not examples:
    raise FinetuneError(f"{path} has no examples.")
  return examples


def _check(config: Config) -> None:
  if not config.finetune.glue_task:
    raise FinetuneError("GLUE fine-tuning needs its task: --task=NAME (finetune.glue_task), one "
                        f"of {', '.join(TASKS)}.")
  task(config.finetune.glue_task)
  check_no_lm_head(config)


def _rank(results: Mapping[str, float]) -> tuple:
  score = results["validation_score"]
  return (score if math.isfinite(score) else -math.inf, -results["validation_loss"])


OBJECTIVE = register(Objective(
    name="glue", read=_read,
    classes=lambda examples, path: list(TASKS[examples[0].record["task"]].classes),
    encode=encode, row=_row, model_length=lambda split, i: len(split.ids[i]), loss=loss,
    metrics=lambda name, sums, loss: {}, rank=_rank, check=_check,
    split_metrics=split_metrics, validation_file=True))
