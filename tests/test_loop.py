"""The shared training loop (jaxlm/loop.py) driven by fine-tuning: preemption and exact resume,
microbatching, the best-checkpoint policy, and a fine-tuning job across two processes."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest

from jaxlm import config as config_lib
from jaxlm import finetune, loop
from jaxlm import metrics as metrics_lib
from jaxlm import run as run_lib
from jaxlm import steps as steps_lib
from tests.conftest import REPO
from tests.helpers import launch_script

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "theta", "kappa", "lambda"]


def keyword_csv(path, count: int = 60, seed: int = 0) -> str:
  """text,label rows: label 'yes' iff the text holds the word 'seven'."""
  rng = random.Random(seed)
  lines = ["text,label"]
  for i in range(count):
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
    if i % 2:
      words[rng.randrange(len(words))] = "seven"
    lines.append(f"{' '.join(words)},{'yes' if i % 2 else 'no'}")
  path.write_text("\n".join(lines) + "\n")
  return str(path)


OVERRIDES = {"finetune.trainable": "all", "optim.learning_rate": 1e-3, "finetune.epochs": 2,
             "train.log_every": 1, "seed": 3}


@pytest.fixture(scope="module")
def keyword_data(tmp_path_factory):
  return keyword_csv(tmp_path_factory.mktemp("keyword") / "data.csv")


@pytest.fixture(scope="module")
def uninterrupted(tiny_lm_run, keyword_data, tmp_path_factory):
  """(workdir, summary) of a fine-tuning run on `keyword_data` in this process, start to end:
  the reference of the resumed and the two-process runs."""
  workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
  return workdir, finetune.finetune(prepared_run(tiny_lm_run, workdir, keyword_data),
                                    show_progress=False)


def prepared_run(tiny_lm_run, workdir, data, **overrides):
  return finetune.prepare(tiny_lm_run, str(workdir), "classifier", data,
                          dict(OVERRIDES, **overrides))


def batch_losses(workdir) -> dict[int, float]:
  return {r["step"]: r["train_batch_loss"]
          for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "train_batch_loss" in r}


def test_sigterm_saves_and_the_resumed_finetuning_equals_the_uninterrupted(
    tiny_lm_run, keyword_data, uninterrupted, tmp_path):
  data = keyword_data
  whole_dir, whole = uninterrupted
  steps_per_epoch = 42 // 8 + 1  # 60 rows: 42 train (0.7), 6 validation, 12 test; batch 8
  assert whole["finished"] and whole["steps"] == 2 * steps_per_epoch

  # SIGTERM arrives while the 4th batch is read (mid first epoch): the loop finishes that
  # step, saves it and returns unfinished.
  prepared = prepared_run(tiny_lm_run, tmp_path / "cut", data)
  task = finetune.make_job(prepared)
  make_data = task.data

  def data_with_sigterm():
    iterator = make_data()

    class Interrupting:
      def __next__(self):
        if iterator.position == 4:
          os.kill(os.getpid(), signal.SIGTERM)
        return next(iterator)
      get_state, set_state = iterator.get_state, iterator.set_state
    return Interrupting()

  task.data = data_with_sigterm
  cut = loop.fit(task, show_progress=False)
  assert not cut["finished"] and cut["stop_reason"] == "SIGTERM" and cut["step"] == 4
  assert run_lib.open_run(str(tmp_path / "cut")).steps == [4]

  # Rerunning the same command resumes and logs exactly what the uninterrupted run logged
  # (--restore_step=4 of the fine-tuning scripts: here the newest checkpoint as well).
  resumed = finetune.finetune(prepared_run(tiny_lm_run, tmp_path / "cut", data),
                              show_progress=False, restore_step=4)
  assert batch_losses(tmp_path / "cut") == batch_losses(whole_dir)
  for key in ("best_step", "validation_accuracy", "validation_loss", "test_accuracy"):
    assert resumed[key] == whole[key], key
  # The best evaluation's checkpoint is the one left (the one generate/evaluate load).
  assert run_lib.open_run(str(tmp_path / "cut")).steps == [whole["best_step"]]
  # A finished run is not trained again.
  again = finetune.finetune(prepared_run(tiny_lm_run, tmp_path / "cut", data),
                            show_progress=False)
  assert again == resumed


@pytest.mark.e2e
def test_finetuning_microbatches_give_the_same_steps(tiny_lm_run, tmp_path):
  data = keyword_csv(tmp_path / "data.csv", count=30)
  batch = {"finetune.epochs": 1, "train.global_batch_size": 16}  # 2 x (8 devices x 1 row)
  one = finetune.finetune(prepared_run(tiny_lm_run, tmp_path / "one", data, **batch),
                          show_progress=False)
  two = finetune.finetune(prepared_run(tiny_lm_run, tmp_path / "two", data,
                                       **batch, **{"train.microbatches": 2}),
                          show_progress=False)
  got, want = batch_losses(tmp_path / "two"), batch_losses(tmp_path / "one")
  assert sorted(got) == sorted(want) == list(range(1, one["steps"] + 1))
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-5), step
  assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)


def test_finetune_config_takes_every_key_seed_included(tiny_lm_run):
  init = run_lib.open_run(tiny_lm_run).config
  config = finetune.finetune_config(init, "classifier", {"seed": 7, "train.microbatches": 2,
                                                         "finetune.epochs": 3})
  assert (config.seed, config.train.microbatches, config.finetune.epochs) == (7, 2, 3)
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'train.epochs'"):
    finetune.finetune_config(init, "classifier", {"train.epochs": 3})


def test_a_run_trained_in_pipeline_stages_fine_tunes_without_them(tiny_lm_run):
  """Fine-tuning addresses blocks by index: a scanned, staged init run's stage devices join
  the data axis; asking for stages or scanning is refused in one line."""
  init = config_lib.replace(run_lib.open_run(tiny_lm_run).config, model={"scan_layers": True},
                            mesh={"stage": 2, "data": 1, "fsdp": -1})
  config = finetune.finetune_config(init, "instruct", {})
  assert not config.model.scan_layers
  assert (config.mesh.stage, config.mesh.data, config.mesh.fsdp) == (1, 1, -1)
  init = config_lib.replace(init, mesh={"data": 2, "fsdp": 1})
  assert finetune.finetune_config(init, "instruct", {}).mesh.data == -1
  for key in ("mesh.stage", "model.scan_layers"):
    with pytest.raises(finetune.FinetuneError, match=r"^fine-tuning runs with unscanned layers "
                       r"and without pipeline stages .*drop --config.model.scan_layers"):
      finetune.finetune_config(init, "instruct", {key: 2 if key == "mesh.stage" else True})


def test_a_model_unlike_the_init_run_is_refused_before_anything_is_written(tiny_lm_run,
                                                                             tmp_path):
  """Any model.* key that changes what the init run's weights compute is refused, also when
  the parameter shapes stay the same (a norm, the biases, the rotary base)."""
  data = keyword_csv(tmp_path / "data.csv", count=20)
  for key, value in [("num_layers", 3), ("mlp_dim", 32), ("norm", "rmsnorm"),
                     ("use_bias", False), ("rope_theta", 500.0), ("positional", "none")]:
    with pytest.raises(finetune.FinetuneError, match=rf"^model\.{key}=.* differs from the init "
                       rf"run's .*drop --config\.model\.{key}\.$"):
      prepared_run(tiny_lm_run, tmp_path / "w", data, **{f"model.{key}": value})
  assert not os.path.exists(tmp_path / "w")
  # How it runs may change: dropout, compute dtype, attention kernel, rematerialization.
  init = run_lib.open_run(tiny_lm_run).config
  config = finetune.finetune_config(init, "classifier", {
      "model.dropout": 0.1, "model.dtype": "bfloat16", "model.attention_impl": "reference",
      "model.remat_policy": "full"})
  assert (config.model.dropout, config.model.dtype) == (0.1, "bfloat16")
  # So may the context without a position table (rope here): the same function on the old one.
  assert finetune.finetune_config(init, "instruct", {"model.max_seq_len": 128}).model.max_seq_len \
      == 128


def test_keys_a_finetuning_task_could_only_ignore_are_refused(tiny_lm_run):
  init = run_lib.open_run(tiny_lm_run).config
  for task, key, value, message in [
      ("classifier", "train.num_steps", 5, r"train\.num_steps is set by fine-tuning .*epochs"),
      ("instruct", "finetune.balance", True, r"finetune\.balance undersamples .*drop it"),
      ("classifier", "train.sample_every", 5, r"train\.sample_every uses the language-model"),
      ("classifier", "train.eval_tasks", "lambada:x.txt", r"train\.eval_tasks uses the lang")]:
    with pytest.raises(finetune.FinetuneError, match=message):
      finetune.finetune_config(init, task, {key: value})
  assert finetune.finetune_config(init, "instruct", {"train.sample_every": 5}).train.sample_every


@pytest.mark.e2e
def test_a_finished_run_is_not_resumed_on_other_data_and_a_classifier_run_is_no_lm(
    tiny_lm_run, uninterrupted, tmp_path):
  whole_dir, _ = uninterrupted
  other = keyword_csv(tmp_path / "other.csv", count=60, seed=1)
  with pytest.raises(run_lib.RunError, match=r"holds a fine-tuning run of other data: the "
                     r"files given now \(--data\) differ .*sha256"):
    prepared_run(tiny_lm_run, whole_dir, other)
  source = json.loads((whole_dir / "source.json").read_text())
  assert set(source["data_sha256"]) == {"--data"}
  with pytest.raises(run_lib.RunError, match=r"is a classifier run: its head predicts 2 classes"):
    run_lib.open_run(str(whole_dir), language_model=True)
  result = subprocess.run(
      [sys.executable, "-m", "experiments.generate", f"--workdir={whole_dir}", "--prompt=hi"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and lines[-1].startswith("error: workdir ") and (
      "is a classifier run" in lines[-1]), result.stderr[-2000:]


def test_a_finetuning_step_that_cannot_fit_is_refused_before_anything_is_written(tiny_lm_run,
                                                                                   tmp_path):
  # The largest batch's step compiles from shapes in `prepare` (~1 TB for 2**25 rows).
  data = keyword_csv(tmp_path / "data.csv", count=20)
  with pytest.raises(steps_lib.DoesNotFit, match=r"GiB per device but only .*lower "
                     r"train\.global_batch_size=33554432 .*finetune\.max_length=64") as info:
    prepared_run(tiny_lm_run, tmp_path / "w", data, **{"train.global_batch_size": 2**25})
  assert "\n" not in str(info.value)
  assert not os.path.exists(tmp_path / "w")


def test_a_finetuning_workdir_of_another_kind_is_refused(tiny_lm_run, tmp_path):
  data = keyword_csv(tmp_path / "data.csv", count=20)
  with pytest.raises(run_lib.RunError, match="holds imported weights"):
    prepared_run(tiny_lm_run, tiny_lm_run, data)
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  with pytest.raises(run_lib.RunError, match="holds other files"):
    prepared_run(tiny_lm_run, other, data)
  assert os.listdir(other) == ["notes.txt"]


@pytest.mark.e2e
def test_two_process_finetuning_equals_one_process(tiny_lm_run, keyword_data, uninterrupted,
                                                   tmp_path):
  args = [f"--init={tiny_lm_run}", f"--data={keyword_data}", f"--workdir={tmp_path / 'two'}",
          "--progress=false", *(f"--config.{k}={v}" for k, v in OVERRIDES.items())]
  processes = launch_script("experiments.finetune_classifier", args, 2, 4)
  results = [p.communicate(timeout=600) for p in processes]
  for p, (_, err) in zip(processes, results):
    assert p.returncode == 0, err[-3000:]
  two = [out for out, _ in results]
  one_dir, summary_one = uninterrupted  # the same run in this process, on its 8 devices
  summaries = [[json.loads(line) for line in out.splitlines() if line.startswith("{")]
               for out in two]  # (gloo prints its connection lines to stdout)
  assert [len(found) for found in summaries] == [1, 0]  # process 0 alone prints the summary
  summary_two = summaries[0][0]
  got, want = batch_losses(tmp_path / "two"), batch_losses(one_dir)
  assert sorted(got) == sorted(want) and len(want) == summary_one["steps"]
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-5), step
  assert summary_two["test_loss"] == pytest.approx(summary_one["test_loss"], rel=1e-5)
  assert run_lib.saved_config(str(tmp_path / "two"))["seed"] == 3
