r"""Evaluate a run: loss, perplexity and bits per byte on text, or zero-/few-shot tasks.

  python -m experiments.evaluate --workdir=runs/x --text_files='/data/*.txt'
  python -m experiments.evaluate --workdir=runs/x --split=validation     # the run's own corpus
  python -m experiments.evaluate --workdir=runs/gpt2 --text_files=wiki.txt --seq_len=1024 \
      --stride=512
  python -m experiments.evaluate --workdir=runs/gpt2 \
      --tasks=hellaswag:/data/hellaswag_val.jsonl,lambada:/data/lambada_test.txt --num_fewshot=0
  python -m experiments.evaluate --workdir=runs/gpt2 --tasks=glue:/data/glue,superglue:tfds
  python -m experiments.evaluate --workdir=runs/gpt2 --num_fewshot=1 \
      --tasks=cnn_dailymail:/data/cnn_dm_test.jsonl,wmt14_en_fr:/data/wmt14.en-fr.src

--tasks (see jaxlm/tasks.py and jaxlm/glue.py for the names and file formats) prints one JSON
line per task and merges the results into the run's eval_results.json (keyed "TASK_Kshot");
glue:DIR and superglue:DIR score every task of the benchmark found in DIR and add a line (and
"glue_Kshot") with the benchmark's score and the tasks missing. NAME:tfds reads the
task's TFDS dataset prepared in the run's data.data_dir/tfds (or --data_dir's), e.g.
--tasks=hellaswag:tfds,arc_easy:tfds:ai2_arc/ARC-Easy:test. Generative tasks (jaxlm/generative.py:
QA, summarization, translation) generate each answer greedily and report em/f1, ROUGE or
BLEU/chrF with the generation's prompts/s and new tokens/s; --max_new_tokens overrides every
such task's budget and the first --samples answers are kept, beside their references, in
eval_results.json.

Each document (a .txt/.md file, or a line of a .jsonl file with a "text" field; or a document
of the run's corpus split) is scored on its own with sliding windows of --seq_len tokens that
advance by --stride: every token is scored exactly once, with at least seq_len - stride tokens
of context after the first window. Bits per byte divide the summed loss by the UTF-8 bytes of
the scored text, so models with different tokenizers compare. Standard output carries only the
JSON line; progress goes to standard error.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from experiments import common

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (pretrained or imported).")
_TEXT_FILES = flags.DEFINE_string(
    "text_files", None, "comma-separated globs of .txt/.md/.jsonl files to evaluate on.")
_TEXT_KEY = flags.DEFINE_string("text_key", "text", "field holding the text in .jsonl files.")
_SPLIT = flags.DEFINE_string("split", None,
                             "evaluate on this split of the run's own corpus instead "
                             "(train or validation).")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "window length (default: the run's seq_len).")
_STRIDE = flags.DEFINE_integer("stride", None, "window advance (default: seq_len // 2).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "windows per forward pass.")
_MAX_DOCUMENTS = flags.DEFINE_integer("max_documents", 0,
                                      "evaluate only the first N documents (0: all).")
_TASKS = flags.DEFINE_string("tasks", None, "comma-separated NAME:PATH task files, e.g. "
                             "hellaswag:/data/hellaswag_val.jsonl, or NAME:tfds[:DATASET[:SPLIT]] "
                             "for a prepared TFDS dataset (see jaxlm/tasks.py); glue:DIR, "
                             "superglue:DIR (or :tfds): every task of the benchmark found.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "where TFDS task datasets are prepared (in its "
                                "tfds/ folder; default: the run's data.data_dir).")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", 0, "solved examples before each task example.")
_LIMIT = flags.DEFINE_integer("limit", 0, "score only the first N examples of each task (0: all).")
_PROGRESS = flags.DEFINE_bool("progress", True, "progress bar on stderr while scoring tasks.")
_SEED = flags.DEFINE_integer("seed", 0, "draws the few-shot examples.")
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", 0, "generative tasks: new tokens per answer for every such task (0: each "
    "task's own budget; see jaxlm/generative.py).")
_SAMPLES = flags.DEFINE_integer(
    "samples", 5, "generative tasks: the first N answers, beside their prompts and references, "
    "kept in eval_results.json (not on the printed line).")


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_logs()
  from jaxlm import corpora
  from jaxlm import evaluate as evaluate_lib
  from jaxlm import run as run_lib
  EvaluationError = evaluate_lib.EvaluationError
  if not _WORKDIR.value:
    raise EvaluationError("--workdir is required: the run directory to evaluate.")
  if [bool(_TEXT_FILES.value), bool(_SPLIT.value), bool(_TASKS.value)].count(True) != 1:
    raise EvaluationError("pass exactly one of --text_files=GLOB, --split=validation or "
                          "--tasks=NAME:PATH,...")
  if _MAX_DOCUMENTS.value < 0:
    raise EvaluationError(f"--max_documents={_MAX_DOCUMENTS.value} must be >= 0.")
  for flag in (_MAX_NEW_TOKENS, _SAMPLES):
    if flag.value < 0:
      raise EvaluationError(f"--{flag.name}={flag.value} must be >= 0.")
  if _STRIDE.value is not None and _STRIDE.value < 1:
    raise EvaluationError(f"--stride={_STRIDE.value} must be >= 1 (omit it: seq_len // 2).")
  if _TASKS.value:
    evaluate_tasks()
    return
  start = time.perf_counter()
  run = run_lib.open_run(_WORKDIR.value, _STEP.value, language_model=True)
  config = run.config
  seq_len = _SEQ_LEN.value or config.data.seq_len
  stride = _STRIDE.value or max(seq_len // 2, 1)
  if _TEXT_FILES.value:
    documents = [text for _, text in corpora.read_documents(_TEXT_FILES.value, _TEXT_KEY.value)]
    source = _TEXT_FILES.value
  else:
    documents = corpora.load_split(config.data, _SPLIT.value)  # (read on demand)
    source = f"{config.data.corpus}:{_SPLIT.value}"
  documents = list(documents[:_MAX_DOCUMENTS.value] if _MAX_DOCUMENTS.value else documents)
  mesh = run_lib.default_mesh(config)
  params = run_lib.restore_params(run, mesh)
  common.log(f"loaded {_WORKDIR.value} step {run.step}; scoring {len(documents)} documents "
             f"(seq_len {seq_len}, stride {stride})")
  result = evaluate_lib.evaluate_documents(
      config, params, run.tokenizer, documents, seq_len=seq_len, stride=stride,
      batch_size=_BATCH_SIZE.value, mesh=mesh)
  result.update(step=run.step, seq_len=seq_len, stride=stride, source=source)
  common.log(f"done in {time.perf_counter() - start:.1f}s")
  print(json.dumps(result))


def evaluate_tasks() -> None:
  """Scores each --tasks file; one JSON line each; merged into the run's eval_results.json."""
  import jax

  from jaxlm import run as run_lib
  from jaxlm import tasks
  # Every task file read and checked before the run's weights are loaded (TFDS task datasets
  # come from the run's data.data_dir).
  run = run_lib.open_run(_WORKDIR.value, _STEP.value, language_model=True)
  loaded = tasks.load_tasks(_TASKS.value, num_fewshot=_NUM_FEWSHOT.value, limit=_LIMIT.value,
                            seed=_SEED.value,
                            data_dir=_DATA_DIR.value or run.config.data.data_dir)
  context = run.config.model.max_seq_len
  if _MAX_NEW_TOKENS.value >= context:
    raise tasks.TaskError(f"--max_new_tokens={_MAX_NEW_TOKENS.value} leaves no room for a prompt "
                          f"in the model's context (model.max_seq_len={context}); use at most "
                          f"{context - 1}.")
  mesh = run_lib.default_mesh(run.config)
  params = run_lib.restore_params(run, mesh)
  scorer = tasks.Scorer(run.config, params, run.tokenizer, mesh, _BATCH_SIZE.value,
                        progress=_PROGRESS.value, max_new_tokens=_MAX_NEW_TOKENS.value,
                        samples=_SAMPLES.value)
  results = {}
  for task in loaded:
    start = time.perf_counter()
    common.log(f"{task.name}: scoring {task.path} ({task.num_fewshot}-shot)")
    result = tasks.score_task(task, scorer)
    result.update(step=run.step, seconds=round(time.perf_counter() - start, 2))
    results[f"{task.name}_{task.num_fewshot}shot"] = result
    if jax.process_index() == 0:  # (a generative task's samples: in eval_results.json only)
      print(json.dumps({k: v for k, v in result.items() if k != "samples"}), flush=True)
  # glue:DIR, superglue:DIR: the benchmark's score over the tasks just scored (a line each).
  for summary in tasks.score_groups(_TASKS.value, list(results.values())):
    summary.update(num_fewshot=_NUM_FEWSHOT.value, step=run.step)
    results[f"{summary['group']}_{_NUM_FEWSHOT.value}shot"] = summary
    if summary["missing"]:
      common.log(f"{summary['group']}: the score averages {summary['tasks_scored']} of its "
                 f"{summary['tasks']} tasks; missing: {', '.join(summary['missing'])}")
    if jax.process_index() == 0:
      print(json.dumps(summary), flush=True)
  run_lib.write_eval_results(run.workdir, results)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
