"""The lm-evaluation-harness adapter: lm-eval itself, on custom tasks over files the tests write,
scores a jaxlm run exactly as jaxlm's own task scorer does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402  (after the importorskip)
from lm_eval.tasks import TaskManager  # noqa: E402

from jaxlm import generate as generate_lib  # noqa: E402
from jaxlm import harness, tasks  # noqa: E402
from tests.conftest import REPO  # noqa: E402

WORDS = ["import", "def", "return", "class", "self", "value", "print", "list", "open", "file"]

# A local jsonl file as an lm-eval dataset (Hugging Face datasets' json loader, offline).
LOCAL_JSONL = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
  cache_dir: {cache}
test_split: test
"""

# The harness's own ARC recipe, pointed at a local AI2-format jsonl file.
ARC_TASK = "task: jaxlm_arc_local\n" + LOCAL_JSONL + """output_type: multiple_choice
doc_to_text: "Question: {{{{question.stem}}}}\\nAnswer:"
doc_to_choice: "{{{{question.choices | map(attribute='text') | list}}}}"
doc_to_target: "{{{{(question.choices | map(attribute='label') | list).index(answerKey)}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

# The harness's WikiText recipe (rolling log-likelihood), on local text documents.
ROLLING_TASK = "task: jaxlm_rolling_local\n" + LOCAL_JSONL + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def arc_file(path, count: int, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for i in range(count):
      choices = [{"text": " ".join(rng.choice(WORDS, rng.integers(1, 4))), "label": key}
                 for key in "ABCD"[:rng.integers(2, 5)]]
      record = {"id": str(i), "question": {"stem": f"what does {rng.choice(WORDS)} do",
                                           "choices": choices},
                "answerKey": choices[rng.integers(len(choices))]["label"]}
      f.write(json.dumps(record) + "\n")
  return str(path)


def task_dir(tmp_path, template: str, path) -> str:
  """A folder holding one lm-eval task YAML over the local file `path` (for --include_path)."""
  folder = tmp_path / "tasks"
  folder.mkdir()
  (folder / "task.yaml").write_text(template.format(path=path, cache=tmp_path / "hf"))
  return str(folder)


def local_evaluate(model, task: str, folder: str, **kwargs) -> dict:
  return lm_eval.simple_evaluate(
      model=model, tasks=[task],
      task_manager=TaskManager(include_path=folder, include_defaults=False), **kwargs)


@pytest.fixture(scope="module")
def model(tiny_lm_run):
  return harness.JaxLM(workdir=tiny_lm_run, batch_size=8)


@pytest.mark.e2e
def scorer_of(model, batch_size=8):
  """A tasks.Scorer over the harness model's run (its own batch size)."""
  return tasks.Scorer(model.config, model.params, model.tokenizer, model.mesh, batch_size)


def test_lm_eval_scores_a_multiple_choice_task_as_jaxlm_does(model, tmp_path):
  path = arc_file(tmp_path / "arc.jsonl", 24)
  results = local_evaluate(model, "jaxlm_arc_local", task_dir(tmp_path, ARC_TASK, path),
                           log_samples=True)
  harness_metrics = results["results"]["jaxlm_arc_local"]
  samples = sorted(results["samples"]["jaxlm_arc_local"], key=lambda s: s["doc_id"])

  items = tasks.read_arc(path)
  ours = tasks.score_items(scorer_of(model), items)
  pairs = [(c, x) for item in items for c, x in zip(item.contexts, item.choices)]
  ll, _ = tasks.loglikelihoods(scorer_of(model, 3), pairs)
  theirs = [float(r[0][0]) for s in samples for r in s["resps"]]
  # The harness formed the same requests from the same file: the same log-likelihoods...
  np.testing.assert_allclose(theirs, ll, rtol=0, atol=1e-4)
  # ...and the same accuracies (harness: acc,none and acc_norm,none).
  assert harness_metrics["acc,none"] == ours["acc"]
  assert harness_metrics["acc_norm,none"] == ours["acc_norm"]
  assert 0 < ours["acc"] < 1  # a random model: the test can tell right from wrong answers


@pytest.mark.e2e
def test_lm_eval_rolling_perplexity_equals_jaxlm_wikitext_scoring(model, tmp_path):
  documents = ["import os\n\nprint(os.getcwd())\n",
               " ".join(WORDS * 30),  # longer than the 64-token context: several windows
               "a"]
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
  results = local_evaluate(model, "jaxlm_rolling_local",
                           task_dir(tmp_path, ROLLING_TASK, path))
  theirs = results["results"]["jaxlm_rolling_local"]
  ours = tasks.score_documents(scorer_of(model), documents)
  for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
    assert theirs[f"{key},none"] == pytest.approx(ours[key], rel=1e-5), key


def test_request_types_match_jaxlm_scoring_and_generation(model):
  pairs = [("def f(x):", " return x"), ("", "import os"), ("print(", "value)")]
  requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
  ll, greedy = tasks.loglikelihoods(scorer_of(model, 2), pairs)
  assert model.loglikelihood(requests, disable_tqdm=True) == [
      (float(a), bool(b)) for a, b in zip(ll, greedy)]

  text = " ".join(WORDS * 20)
  rolling = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)],
                                        disable_tqdm=True)
  whole, _ = tasks.document_loglikelihoods(scorer_of(model, 1), [text])
  assert rolling[0] == pytest.approx(float(whole[0]), abs=1e-4) and rolling[0] < 0

  prompts = ["def f(x):", "import os"]
  kwargs = {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}
  texts = model.generate_until([Instance("generate_until", {}, (p, kwargs), i)
                                for i, p in enumerate(prompts)])
  expected = generate_lib.generate_texts(model.config.model, model.params, model.tokenizer,
                                         prompts, max_new_tokens=12, temperature=0.0,
                                         stop=["\n"])
  assert texts == expected and all("\n" not in t for t in texts)


@pytest.mark.e2e
def test_bad_model_args_are_one_line_errors(tiny_lm_run, tmp_path):
  with pytest.raises(harness.HarnessError, match="batch_size='auto'"):
    harness.JaxLM(workdir=tiny_lm_run, batch_size="auto")
  with pytest.raises(harness.HarnessError, match=r"unknown model_args \['pretrained'\]"):
    harness.JaxLM(workdir=tiny_lm_run, pretrained="gpt2")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.harness", "--model", "jaxlm", "--model_args",
       f"workdir={tmp_path / 'missing'}", "--tasks", "lambada_openai", "--limit", "1"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: workdir") and "does not exist" in last, result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_registered_under_the_name_jaxlm():
  from lm_eval.api.registry import get_model
  assert get_model("jaxlm") is harness.JaxLM


@pytest.mark.e2e
def test_the_launcher_runs_lm_evals_command_line(tiny_lm_run, tmp_path):
  path = arc_file(tmp_path / "arc.jsonl", 6)
  folder = task_dir(tmp_path, ARC_TASK, path)
  result = subprocess.run(
      [sys.executable, "-m", "experiments.harness", "--model", "jaxlm",
       "--model_args", f"workdir={tiny_lm_run}", "--tasks", "jaxlm_arc_local",
       "--include_path", folder, "--batch_size", "4",
       "--output_path", str(tmp_path / "out")],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "jaxlm_arc_local" in result.stdout and "acc_norm" in result.stdout
  written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "out") for f in files
             if f.startswith("results")]
  assert len(written) == 1
  results = json.load(open(written[0]))["results"]["jaxlm_arc_local"]
  model = harness.JaxLM(workdir=tiny_lm_run)
  ours = tasks.score_items(scorer_of(model), tasks.read_arc(path))
  assert results["acc,none"] == ours["acc"] and results["acc_norm,none"] == ours["acc_norm"]
