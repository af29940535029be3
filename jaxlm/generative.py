"""Generative tasks: the model writes each answer (greedy, batched through the KV-cache
generator of jaxlm/generate.py) and the answers are scored against references with the field's
own metrics.

  task            file (published layout)                           prompt             metrics
  generate        JSONL: prompt, references (list) or reference     as given           all below
  trivia_qa       JSONL/TFDS: question, answer.aliases (or answers) Question: {q}?\\nAnswer:  em, f1
  nq_open         JSONL/TFDS: question, answer (list) (or answers)  Q: {q}?\\nA:       em, f1
  cnn_dailymail   JSONL/TFDS: article, highlights                   {article}\\nTL;DR: rouge
  xsum            JSONL/TFDS: document, summary                     {document}\\nTL;DR: rouge
  wmt14_en_fr ... JSONL {"translation": {"en": ..., "fr": ...}},    English phrase: {src}\\n
                  TFDS wmt14_translate/fr-en ({"en", "fr"}), or     French phrase:     bleu, chrf
                  plain-text pairs: NAME.en beside NAME.fr, or
                  sacrebleu's NAME.src beside NAME.ref (NAME.ref-*)

Metrics: `em` and `f1` are SQuAD's (the answer normalised: lower case, no punctuation, no
articles, single spaces; token F1), each the best over an example's references, averaged
(fractions); `bleu` and `chrf` are sacrebleu's corpus BLEU and chrF with its defaults (13a
tokenisation, exp smoothing; chrF: character 6-grams, beta 2), on sacrebleu's 0-100 scale, with
sacrebleu's signature; `rouge1`, `rouge2`, `rougeL` are rouge_score's F-measures with its Porter
stemmer (as summarization papers report them; the best reference per example), averaged
(fractions). The harness's prompts (TriviaQA, NQ-open, the GPT-3 translation tasks); GPT-2's
"TL;DR:" for summaries (Radford et al. 2019), decoded greedily here, not with its top-k 2
sampling, and not cut to three sentences.

Each task has a stop (its answers end at the first stop string: a newline for one-line answers,
a blank line for multi-line summaries) and a budget of new tokens (Scorer.max_new_tokens, the
--max_new_tokens flag, overrides it for every generative task; a task's own budget is capped at
half the model's context). Prompts too long for the context keep their end (truncated, counted
in the result). Few-shot: the solved examples are the prompt followed by its first reference.

Tasks are added to `tasks.TASKS` and `tasks.TFDS_DEFAULTS` when this module is imported
(tasks.py imports it last).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import time
from typing import Any, Sequence

import jax
import numpy as np
from tqdm import tqdm

from jaxlm import generate as generate_lib
from jaxlm import glue, metrics, tasks
from jaxlm.tasks import Item, TaskError, TaskKind

# -- Items and readers --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenItem(Item):
  """A prompt (`contexts[0]`) and the references its answer is scored against; `choices[0]` is
  the first reference as the prompt's continuation (its few-shot demonstration)."""
  references: tuple[str, ...] = ()

  @property
  def prompt(self) -> str:
    return self.contexts[0]


def _gen_item(row: tasks._Row, prompt: Any, references: Any, field: str) -> GenItem:
  """The row's GenItem; TaskError (file, row) for a prompt that is not text or references that
  are not one or more non-blank strings."""
  if not isinstance(prompt, str) or not prompt.strip():
    raise row.error(f"the prompt must be non-empty text, not {prompt!r}.")
  if isinstance(references, str):
    references = [references]
  if not isinstance(references, (list, tuple)) or not all(isinstance(r, str)
                                                          for r in references):
    raise row.error(f"{field} must be a string or a list of strings, not {references!r}.")
  if not references:
    raise row.error(f"{field} is an empty list; an example needs at least one reference.")
  if not all(r.strip() for r in references):
    raise row.error(f"{field} holds a blank reference ({list(references)!r}).")
  joiner = "" if prompt[-1].isspace() else " "
  return GenItem((prompt,), (joiner + references[0],), 0, references=tuple(references))


def read_prompts(path: str) -> list[Item]:
  """Any JSONL (or .json/.tsv/.csv) file: `prompt` and `references` (a list, or one string),
  or `reference` / `target` (one string); the prompt is used as written."""
  return [_gen_item(r, r.field("prompt"), r.field("references", "reference", "target"),
                    "references") for r in tasks._rows(path)]


def _answers(row: tasks._Row) -> Any:
  """A QA record's gold answers: `answers` or `answer`, a string, a list (NQ-open) or TriviaQA's
  dict (its `aliases`, else its `value`)."""
  answers = row.field("answers", "answer", "Answer")
  if isinstance(answers, dict):
    answers = (answers.get("aliases") or answers.get("Aliases") or answers.get("value")
               or answers.get("Value") or [])
  return answers


def qa_reader(template: str):
  """A reader of question/answers records, the question ("?" added when missing) put in
  `template`."""

  def read(path: str) -> list[Item]:
    items = []
    for r in tasks._rows(path):
      question = r.field("question", "Question")
      if isinstance(question, str) and question.strip():
        question = question.strip() + ("" if question.strip().endswith("?") else "?")
        question = template.format(question=question)
      items.append(_gen_item(r, question, _answers(r), "answers"))
    return items
  return read


def summary_reader(document: str, summary: str):
  """A reader of (document, summary) records: the prompt is the document, then "\\nTL;DR:"
  (GPT-2's summarization prompt)."""

  def read(path: str) -> list[Item]:
    items = []
    for r in tasks._rows(path):
      text = r.field(document)
      prompt = text.strip() + "\nTL;DR:" if isinstance(text, str) and text.strip() else text
      items.append(_gen_item(r, prompt, r.field(summary), summary))
    return items
  return read


LANGUAGES = {"en": "English", "fr": "French", "de": "German", "ro": "Romanian", "cs": "Czech",
             "ru": "Russian", "fi": "Finnish", "tr": "Turkish", "hi": "Hindi"}


def _text_lines(path: str) -> list[str]:
  lines = tasks._read_text(path).split("\n")
  return lines[:-1] if lines and lines[-1] == "" else lines


def _plain_pairs(path: str, source: str, target: str) -> list[tasks._Row]:
  """Rows {source: line, "references": [lines]} of plain-text pairs: the source file
  NAME.{source} with NAME.{target} beside it (one sentence a line), or sacrebleu's
  NAME.src with its NAME.ref (or NAME.ref-A, NAME.ref-B ...: several references)."""
  stem, extension = os.path.splitext(path)
  if extension == f".{source}":
    reference_files = [f"{stem}.{target}"]
  elif extension == ".src":
    reference_files = sorted(p for p in glob.glob(glob.escape(stem) + ".ref*")
                             if p == stem + ".ref" or p.startswith(stem + ".ref-"))
  else:
    raise TaskError(f"task file {path}: a plain-text source file is NAME.{source} (its "
                    f"translations in NAME.{target}) or sacrebleu's NAME.src (NAME.ref); or "
                    f"pass a .jsonl file of {{\"translation\": {{\"{source}\": ..., "
                    f"\"{target}\": ...}}}} records.")
  missing = [p for p in reference_files if not os.path.isfile(p)] or (
      [] if reference_files else [stem + ".ref"])
  if missing:
    raise TaskError(f"task file {path}: its references {missing[0]} do not exist; put them "
                    f"beside it, one translation a line.")
  sources = _text_lines(path)
  references = [_text_lines(p) for p in reference_files]
  for p, lines in zip(reference_files, references):
    if len(lines) != len(sources):
      raise TaskError(f"task file {path} has {len(sources)} lines but {p} has {len(lines)}; "
                      f"they must be line-aligned translations.")
  return [tasks._Row({source: line, "references": [refs[i] for refs in references]}, path, i)
          for i, line in enumerate(sources)]


def translation_reader(source: str, target: str):
  """A reader of `source` -> `target` translation pairs: JSONL records {"translation": {source:
  ..., target: ...}} (Hugging Face's wmt14/wmt16) or the two languages top-level (TFDS's
  wmt14_translate, wmt16_translate), or plain-text pairs (`_plain_pairs`). The prompt is the
  harness's GPT-3 translation prompt: "{Source} phrase: {text}\\n{Target} phrase:"."""
  names = LANGUAGES[source], LANGUAGES[target]

  def read(path: str) -> list[Item]:
    if path.startswith("tfds:") or path.endswith((".jsonl", ".json")):
      rows = tasks._rows(path)
    else:
      rows = _plain_pairs(path, source, target)
    items = []
    for r in rows:
      pair = r.fields.get("translation", r.fields)
      if not isinstance(pair, dict) or source not in pair or (
          target not in pair and "references" not in pair):
        raise r.error(f"needs the {source} text and its {target} translation (a "
                      f"\"translation\" object with both, or both top-level); its fields are "
                      f"{sorted(r.fields)}.")
      text = pair[source]
      prompt = (f"{names[0]} phrase: {text.strip()}\n{names[1]} phrase:"
                if isinstance(text, str) and text.strip() else text)
      items.append(_gen_item(r, prompt, pair.get("references", pair.get(target)), target))
    return items
  return read


# -- Metrics -------------------------------------------------------------------------------------
# sacrebleu and rouge_score are imported when a metric is computed (a training process never
# needs them). `predictions[i]` is scored against `references[i]` (one or more strings).

def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """SQuAD's exact match (glue.normalize_answer), the best over each example's references,
  averaged."""
  return float(np.mean([glue.best_over_answers(glue.exact_match, p, refs)
                        for p, refs in zip(predictions, references)]))


def f1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """SQuAD's token F1, the best over each example's references, averaged."""
  return float(np.mean([glue.best_over_answers(glue.token_f1, p, refs)
                        for p, refs in zip(predictions, references)]))


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
  """sacrebleu's layout: stream k holds every example's k-th reference (None where an example
  has fewer: sacrebleu skips it)."""
  width = max(len(refs) for refs in references)
  return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, str]:
  """sacrebleu's corpus BLEU (its defaults) and its signature."""
  from sacrebleu.metrics import BLEU
  metric = BLEU()
  score = metric.corpus_score(list(predictions), _reference_streams(references))
  return float(score.score), str(metric.get_signature())


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, str]:
  """sacrebleu's corpus chrF (its defaults) and its signature."""
  from sacrebleu.metrics import CHRF
  metric = CHRF()
  score = metric.corpus_score(list(predictions), _reference_streams(references))
  return float(score.score), str(metric.get_signature())


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
  """rouge_score's ROUGE-1, -2 and -L F-measures with stemming, each example scored against
  its best reference (`score_multi`), averaged."""
  from rouge_score import rouge_scorer
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  scores = [scorer.score_multi(list(refs), p) for p, refs in zip(predictions, references)]
  return {name: float(np.mean([s[name].fmeasure for s in scores])) for name in ROUGE_TYPES}


def score_answers(names: Sequence[str], predictions: Sequence[str],
                  references: Sequence[Sequence[str]]) -> dict[str, Any]:
  """The metrics `names` (em, f1, bleu, chrf, rouge) of the predictions."""
  result: dict[str, Any] = {}
  for name in names:
    if name == "em":
      result["em"] = exact_match(predictions, references)
    elif name == "f1":
      result["f1"] = f1(predictions, references)
    elif name in ("bleu", "chrf"):
      value, signature = (bleu if name == "bleu" else chrf)(predictions, references)
      result.update({name: value, f"{name}_signature": signature})
    elif name == "rouge":
      result.update(rouge(predictions, references))
    else:
      raise ValueError(f"unknown generative metric {name!r}")
  return result


# -- Generating and scoring ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GenerativeTask:
  """How a generative task generates and what it reports: `metrics` (score_answers' names),
  `max_new_tokens` (the default budget), `stop` (strings that end an answer)."""
  metrics: tuple[str, ...]
  max_new_tokens: int
  stop: tuple[str, ...]


def new_token_budget(scorer: tasks.Scorer, task: GenerativeTask) -> int:
  """The answers' budget: scorer.max_new_tokens if set (TaskError if it leaves the prompt no
  room), else the task's, at most half the model's context."""
  context = scorer.config.model.max_seq_len
  if scorer.max_new_tokens:
    if scorer.max_new_tokens >= context:
      raise TaskError(f"--max_new_tokens={scorer.max_new_tokens} leaves no room for a prompt in "
                      f"the model's context (model.max_seq_len={context}); use at most "
                      f"{context - 1}.")
    return scorer.max_new_tokens
  return max(1, min(task.max_new_tokens, context // 2))


def generate_answers(scorer: tasks.Scorer, prompts: Sequence[str], max_new_tokens: int,
                     stop: Sequence[str]) -> list[generate_lib.Completion]:
  """Greedy completions of `prompts` (in their order), cut at the first of `stop`: batches of
  scorer.batch_size prompts of similar length (longest first; the last batch filled with
  repeats, so each batch shape compiles once per prompt-length bucket), prompts too long for
  the context keeping their end."""
  order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
  size = max(1, min(scorer.batch_size, len(prompts)))
  out: list[Any] = [None] * len(prompts)
  starts = range(0, len(order), size)
  show = scorer.progress and jax.process_index() == 0
  for start in tqdm(starts, disable=not show, unit="batch", desc="generating"):
    chosen = order[start:start + size]
    batch = [prompts[i] for i in chosen]
    batch += [batch[-1]] * (size - len(batch))
    completions = generate_lib.generate(
        scorer.config, scorer.params, scorer.tokenizer, batch, max_new_tokens=max_new_tokens,
        temperature=0.0, stop=tuple(stop), truncate=True)
    for i, completion in zip(chosen, completions):
      out[i] = completion
  return out


def score_generated(scorer: tasks.Scorer, items: Sequence[GenItem], task: GenerativeTask
                    ) -> dict[str, Any]:
  """The task's metrics over the greedy answers to the items' prompts, the generation's
  throughput (prompts and new tokens per second of generation, compiling excluded), and the
  first scorer.samples answers beside their references (`samples`)."""
  budget = new_token_budget(scorer, task)
  compiled, start = metrics.compile_seconds(), time.perf_counter()
  completions = generate_answers(scorer, [item.prompt for item in items], budget, task.stop)
  seconds = time.perf_counter() - start
  compile_seconds = metrics.compile_seconds() - compiled
  answers = [c.text.strip() for c in completions]
  references = [item.references for item in items]
  new_tokens = sum(len(c.tokens) for c in completions)
  running = max(seconds - compile_seconds, 1e-9)
  reasons = [c.finish_reason for c in completions]
  result = {**score_answers(task.metrics, answers, references), "examples": len(items),
            "max_new_tokens": budget, "stop": list(task.stop),
            "finished": {reason: reasons.count(reason) for reason in ("stop", "eos", "length")},
            "truncated_prompts": sum(c.truncated for c in completions),
            "new_tokens": new_tokens, "generation_seconds": round(seconds, 3),
            "compile_seconds": round(compile_seconds, 3),
            "prompts_per_second": len(items) / running,
            "new_tokens_per_second": new_tokens / running}
  if scorer.samples:
    result["samples"] = [{"prompt": item.prompt, "answer": answer,
                          "references": list(item.references)}
                         for item, answer in zip(items[:scorer.samples], answers)]
  return result


# -- The registry --------------------------------------------------------------------------------

QA = ("em", "f1")
SUMMARY = ("rouge",)
TRANSLATION = ("bleu", "chrf")
SHORT_ANSWER_STOP = ("\n", ".", ",")  # the harness's TriviaQA and NQ-open

# name -> (reader, task); the translation tasks are the harness's GPT-3 set plus WMT14 de-en.
GENERATIVE: dict[str, tuple[Any, GenerativeTask]] = {
    "generate": (read_prompts, GenerativeTask(QA + TRANSLATION + SUMMARY, 32, ("\n",))),
    "trivia_qa": (qa_reader("Question: {question}\nAnswer:"),
                  GenerativeTask(QA, 32, SHORT_ANSWER_STOP)),
    "nq_open": (qa_reader("Q: {question}\nA:"), GenerativeTask(QA, 32, SHORT_ANSWER_STOP)),
    "cnn_dailymail": (summary_reader("article", "highlights"),
                      GenerativeTask(SUMMARY, 100, ("\n\n",))),
    "xsum": (summary_reader("document", "summary"), GenerativeTask(SUMMARY, 64, ("\n",))),
}
WMT = {"wmt14": ("fr", "de"), "wmt16": ("de", "ro")}
for _year, _languages in WMT.items():
  for _other in _languages:
    for _source, _target in (("en", _other), (_other, "en")):
      GENERATIVE[f"{_year}_{_source}_{_target}"] = (
          translation_reader(_source, _target), GenerativeTask(TRANSLATION, 128, ("\n",)))

TFDS = {"cnn_dailymail": ("cnn_dailymail", "test"), "xsum": ("xsum", "test"),
        "trivia_qa": ("trivia_qa/rc.nocontext", "validation"),
        "nq_open": ("natural_questions_open", "validation")}
for _year, _languages in WMT.items():
  for _other in _languages:  # (TFDS names each pair once: wmt14_translate/fr-en)
    TFDS[f"{_year}_en_{_other}"] = TFDS[f"{_year}_{_other}_en"] = (
        f"{_year}_translate/{_other}-en", "test")

tasks.TASKS.update({name: TaskKind(read, functools.partial(score_generated, task=task))
                    for name, (read, task) in GENERATIVE.items()})
tasks.TFDS_DEFAULTS.update(TFDS)
