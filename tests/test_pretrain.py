"""End to end: the pretrain script and trainer on the embedded corpus and on users' files.

Covers the run directory contract, resume == uninterrupted, refusing incompatible workdirs,
and every bad input the issue lists (one line, nothing written). The script's SIGTERM save
and resume: tests/test_multihost.py (two processes) and tests/test_sweep.py (one).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import pretrain
from jaxlm import run as run_lib
from tests.conftest import REPO
from tests.helpers import losses, overrides, tiny_values


def run_cli(args, timeout=600, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # (conftest: one device, -O0)
  return subprocess.run([sys.executable, "-m", "experiments.pretrain", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture
def data_dir(shared_data_dir):
  return shared_data_dir


@pytest.mark.e2e
def test_cli_run_leaves_the_documented_run_directory(tmp_path, data_dir):
  workdir = tmp_path / "run"
  result = run_cli(["--workdir", str(workdir), "--progress=false",
                    *overrides(tiny_values(data_dir, train={"sample_every": 6,
                                                            "sample_max_new_tokens": 8})),
                    "--config.seed=4"])
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ("config.json", "config_diff.json", "tokenizer.model", "metrics.jsonl",
               "samples.jsonl", "loss.png", "summary.json"):
    assert (workdir / name).is_file(), name
  assert any((workdir / "tensorboard").iterdir())
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "6"]
  assert os.listdir(data_dir / "jax_cache")  # the persistent compilation cache is on
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  train_keys = {"train_loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu"}
  assert train_keys <= set(records[-3]) | set(records[-2]) | set(records[-1])
  evals = [r for r in records if "eval_bits_per_byte" in r]
  assert [r["step"] for r in evals] == [6, 12]
  assert 0 < evals[-1]["eval_bits_per_byte"] < 8
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] + 0.5
  samples = [json.loads(line) for line in open(workdir / "samples.jsonl")]
  assert {s["step"] for s in samples} == {6, 12} and all(s["prompt"] for s in samples)
  saved = json.load(open(workdir / "config.json"))
  assert saved["model"]["num_layers"] == 2 and saved["seed"] == 4
  assert json.load(open(workdir / "config_diff.json"))["model.num_layers"]["to"] == 2
  # stdout carries only the final summary line.
  assert result.stdout.strip().startswith("step=12")

  # The run evaluates on its own held-out split (documents scored with sliding windows).
  evaluation = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}", "--split=validation",
       "--max_documents=2", "--seq_len=32", "--stride=16", "--step=6"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert evaluation.returncode == 0, evaluation.stderr[-2000:]
  scores = json.loads(evaluation.stdout)
  assert scores["step"] == 6 and scores["documents"] == 2 and scores["tokens"] > 100
  assert 0 < scores["bits_per_byte"] < 8
  refused = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
  assert refused.returncode == 2
  assert refused.stderr.strip() == ("error: pass exactly one of --text_files=GLOB, "
                                    "--split=validation or --tasks=NAME:PATH,...")

  # Rerun with --workdir alone: it uses the saved config and finds nothing left to do...
  again = run_cli(["--workdir", str(workdir), "--progress=false"])
  assert again.returncode == 0, again.stderr[-2000:]
  assert "already trained to step 12" in again.stderr
  # ...and a longer num_steps continues with the saved config, here from a chosen checkpoint:
  # step 12 is moved aside and steps 7-14 are trained and logged (on the longer schedule).
  longer = run_cli(["--workdir", str(workdir), "--progress=false",
                    "--config.train.num_steps=14", "--restore_step=6"])
  assert longer.returncode == 0, longer.stderr[-2000:]
  assert f"resumed from {workdir / 'checkpoints'}/6" in longer.stderr
  assert sorted(os.listdir(workdir / "checkpoints_discarded")) == ["12"]
  assert sorted(losses(workdir)) == list(range(1, 15))
  assert json.load(open(workdir / "config.json"))["train"]["num_steps"] == 14


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_resumed_run_logs_exactly_the_uninterrupted_losses(tmp_path, data_dir):
  config = config_lib.validate(tiny_values(data_dir, model={"dropout": 0.1}))
  straight = tmp_path / "straight"
  pretrain.train(config, str(straight), show_progress=False)
  resumed = tmp_path / "resumed"
  first = pretrain.train(config, str(resumed), stop_at_step=5, show_progress=False)
  assert first["step"] == 5 and not first["finished"]
  assert max(losses(resumed)) == 5
  second = pretrain.train(config, str(resumed), show_progress=False)
  assert second["finished"]
  assert losses(resumed) == losses(straight)  # bitwise: same floats in the JSON
  assert losses(resumed, "eval_loss") == losses(straight, "eval_loss")

  # A crash that damaged the newest checkpoint (a truncated array file): the rerun warns, falls
  # back to step 6 and from there logs the uninterrupted losses again.
  from tests.helpers import damage
  damaged = tmp_path / "damaged"
  shutil.copytree(straight, damaged)
  damage(str(damaged / "checkpoints" / "12"), "truncated")
  (damaged / "summary.json").unlink()  # it died before finishing
  pretrain.train(config, str(damaged), show_progress=False)
  assert losses(damaged) == losses(straight)
  assert sorted(os.listdir(damaged / "checkpoints_discarded")) == ["12"]
  # Orbax's reads of the damaged arrays leave coroutines that raise when collected: collected
  # here, under this test's filter, not in whichever test runs next.
  import gc
  gc.collect()


def test_incompatible_workdir_is_refused_and_left_alone(tmp_path, data_dir):
  workdir = tmp_path / "run"
  workdir.mkdir()
  saved = config_lib.to_dict(config_lib.validate(tiny_values(data_dir)))
  (workdir / "config.json").write_text(json.dumps(saved))
  before = (workdir / "config.json").read_text()
  other = config_lib.validate(tiny_values(data_dir, model={"num_layers": 3}))
  with pytest.raises(run_lib.RunError, match="model.num_layers"):
    pretrain.train(other, str(workdir), show_progress=False)
  assert (workdir / "config.json").read_text() == before
  assert sorted(os.listdir(workdir)) == ["config.json"]


# -- bad input: one line on stderr, exit code 2, no run directory --------------------------------

def write_files(directory, texts, suffix=".txt"):
  directory.mkdir(parents=True, exist_ok=True)
  for i, text in enumerate(texts):
    (directory / f"doc{i}{suffix}").write_text(text)
  return str(directory / f"*{suffix}")


BAD_CLI_CASES = {
    "heads": (["--config.model.num_heads=3"], "model.num_heads=3"),
    "seq_len": (["--config.model.positional=learned", "--config.data.seq_len=128"],
                "data.seq_len=128"),
    "microbatches": (["--config.train.microbatches=3"], "train.microbatches=3"),
    "unknown_key": (["--config.model.num_layerz=2"], "num_layerz"),
    "steps": (["--config.train.num_steps=0"], "train.num_steps=0"),
    "batch": (["--config.train.global_batch_size=-8"], "train.global_batch_size=-8"),
    "learning_rate": (["--config.optim.learning_rate=0"], "optim.learning_rate=0"),
    "glob": (["--config.data.corpus=text_files", "--config.data.files=/nonexistent/*.txt"],
             "/nonexistent/*.txt"),
    "tfds_name": (["--config.data.corpus=tfds", "--config.data.tfds_name=no_such_dataset_xyz"],
                  "no_such_dataset_xyz"),
    "eval_tasks": (["--config.train.eval_tasks=hellaswag:/nonexistent/hellaswag.jsonl"],
                   "/nonexistent/hellaswag.jsonl"),
    # rope: no position table, yet a window beyond the context is refused (it used to pass and
    # die with RESOURCE_EXHAUSTED).
    "rope_seq_len": (["--config.model.positional=rope", "--config.data.seq_len=100000"],
                     "data.seq_len=100000"),
    # Valid, but the compiled step needs far more than any host has (~0.5 TB of attention
    # probabilities): refused by the preflight after compiling, before anything is written.
    "memory": (["--config.model.max_seq_len=2048", "--config.data.seq_len=2048",
                "--config.data.stride=2048", "--config.train.global_batch_size=8192"],
               "GiB per device but only"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", sorted(BAD_CLI_CASES))
def test_bad_cli_input_is_one_line_and_writes_nothing(case, tmp_path, data_dir):
  args, expected = BAD_CLI_CASES[case]
  workdir = tmp_path / "run"
  base = [a for a in overrides(tiny_values(data_dir))
          if not any(a.startswith(x.split("=")[0] + "=") for x in args)]
  result = run_cli(["--workdir", str(workdir), "--progress=false", *base, *args], timeout=300)
  assert result.returncode != 0
  error_lines = [line for line in result.stderr.splitlines() if expected in line]
  assert error_lines, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert not workdir.exists()


def expect_refused(values, workdir, match, error=ValueError):
  with pytest.raises(error, match=match) as info:
    pretrain.train(config_lib.validate(values), str(workdir), show_progress=False)
  assert "\n" not in str(info.value)
  assert not os.path.exists(workdir)


def test_a_fixed_tokenizer_must_fit_the_model_vocabulary_which_may_pad_it(tmp_path, data_dir):
  """A tokenizer of 301 ids on a model of 256 is refused; on 302 (301 padded for a 2-way tensor
  split, as GPT-2's 50,257 -> 50,304) it trains: the vocabulary and tokenizer checks used to
  demand contradictory sizes."""
  from jaxlm import tokenizer as tokenizer_lib
  files = write_files(tmp_path / "docs", [f"line {i} of some text\n" * 40 for i in range(6)])
  model_path = str(tmp_path / "tok.model")
  from jaxlm import corpora
  data = config_lib.validate(tiny_values(data_dir, data={"corpus": "text_files",
                                                         "files": files})).data
  tokenizer_lib.train_sentencepiece(corpora.load_split(data, "train"), 301, model_path)
  data = {"corpus": "text_files", "files": files, "tokenizer": model_path, "seq_len": 16,
          "stride": 0}
  expect_refused(tiny_values(data_dir, data=data, model={"vocab_size": 256}), tmp_path / "run",
                 "has vocabulary 301 but model.vocab_size=256; set --config.model.vocab_size to "
                 "at least 301", error=tokenizer_lib.TokenizerError)
  values = tiny_values(data_dir, data=data, model={"vocab_size": 302},
                       mesh={"data": -1, "tensor": 2},
                       train={"num_steps": 2, "eval_every": 0, "checkpoint_every": 0,
                              "sample_every": 2, "sample_max_new_tokens": 24})
  summary = pretrain.train(config_lib.validate(values), str(tmp_path / "run"),
                          show_progress=False)
  assert summary["finished"] and np.isfinite(summary["eval_loss"])
  with open(tmp_path / "run" / "samples.jsonl") as f:
    assert {json.loads(line)["step"] for line in f} == {2}  # (test_generate checks the mask)


def test_empty_corpus_is_refused(tmp_path, data_dir):
  files = write_files(tmp_path / "docs", ["", "   \n", ""])
  values = tiny_values(data_dir, data={"corpus": "text_files", "files": files})
  expect_refused(values, tmp_path / "run", "empty|no .*documents|text")


def test_corpus_shorter_than_one_window_is_refused(tmp_path, data_dir):
  files = write_files(tmp_path / "docs", ["a b", "c d", "e f"])
  tokenizer_values = tiny_values(data_dir, data={"corpus": "pystdlib"})
  # Reuse the stdlib tokenizer so the tiny corpus does not need its own.
  from jaxlm import tokenizer as tokenizer_lib
  _, path = tokenizer_lib.get_tokenizer(config_lib.validate(tokenizer_values).data, 512)
  values = tiny_values(data_dir, data={"corpus": "text_files", "files": files, "tokenizer": path})
  expect_refused(values, tmp_path / "run", "data.seq_len")


def test_unwritable_workdir_is_refused(tmp_path, data_dir):
  blocked = tmp_path / "blocked"
  blocked.write_text("a file where a directory should be")
  expect_refused(tiny_values(data_dir), blocked / "run", "cannot be written|not a directory|file")


def test_train_takes_a_dict_and_checks_it_first(tmp_path, monkeypatch):
  """An unchecked ConfigDict kept data_dir='~/...' unexpanded and wrote a literal './~' tree."""
  import ml_collections
  monkeypatch.chdir(tmp_path)
  for values in ({"model": {"num_layers": 0}},
                 ml_collections.ConfigDict({"model": {"num_layers": 0}})):
    with pytest.raises(config_lib.ConfigError, match=r"model\.num_layers=0: must be positive"):
      pretrain.train(values, str(tmp_path / "run"))
  assert os.listdir(tmp_path) == []
