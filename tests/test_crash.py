"""kill -9 during training and asynchronous checkpoint writes (experiments/crash_test.py):
every restart resumes from the newest complete checkpoint and the finished run logs the
uninterrupted run's losses. CI kills twice; docs/training.md reports a 20-kill run. A save that
fails (full disk) stops the run with one line and leaves the earlier checkpoints intact."""

import json
import os
import resource
import subprocess
import sys
import time

import pytest

from jaxlm import checkpoint, loop, pretrain
from jaxlm import config as config_lib
from jaxlm import metrics as metrics_lib
from tests.conftest import REPO
from tests.helpers import losses, overrides, tiny_values


@pytest.mark.e2e
def test_kill_9_at_random_moments_loses_nothing(tmp_path, shared_data_dir):
  values = tiny_values(shared_data_dir, train={
      "num_steps": 24, "eval_every": 12, "sample_every": 0, "sample_max_new_tokens": 0},
      model={"dropout": 0.1})  # dropout: the restored RNG key matters too
  result = subprocess.run(
      [sys.executable, "-m", "experiments.crash_test", f"--workdir={tmp_path / 'crash'}",
       "--kills=2", "--seed=1", *overrides(values)],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["kills"] == 2 and report["kills_during_checkpoint_write"] >= 1, report
  assert report["losses_equal"] and not report["problems"], report
  assert os.path.isdir(tmp_path / "crash" / "crashed" / "checkpoints")


class _DiskFillsUp:
  """Train data that, before batch 8, waits for checkpoint 5 to be committed and then lets this
  process write no file beyond 64 KiB (RLIMIT_FSIZE: writes past it fail with EFBIG, "File too
  large", as writes fail on a full disk, even for root). Checkpoint 10 cannot be written;
  metrics lines still can."""

  def __init__(self, iterator, checkpoints):
    self.iterator, self.checkpoints, self.count = iterator, checkpoints, 0

  def __next__(self):
    self.count += 1
    if self.count == 8:
      deadline = time.time() + 60
      while not (self.checkpoints / "5").is_dir() and time.time() < deadline:
        time.sleep(0.05)
      resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(
          resource.RLIMIT_FSIZE)[1]))
    return next(self.iterator)

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)


@pytest.mark.e2e
def test_a_failing_save_stops_with_one_line_and_keeps_the_earlier_checkpoint(
    tmp_path, shared_data_dir):
  values = tiny_values(shared_data_dir, train={
      "num_steps": 20, "log_every": 1, "eval_every": 20, "checkpoint_every": 5,
      "sample_every": 0, "sample_max_new_tokens": 0})
  config, workdir = config_lib.validate(values), tmp_path / "run"
  task = pretrain.job(pretrain.prepare(config, str(workdir)))
  make_data = task.data
  task.data = lambda: _DiskFillsUp(make_data(), workdir / "checkpoints")
  limit = resource.getrlimit(resource.RLIMIT_FSIZE)
  try:
    with pytest.raises(checkpoint.CheckpointError) as failure:
      loop.fit(task, show_progress=False)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limit)
  message = str(failure.value)
  assert "\n" not in message and message.startswith("saving checkpoint 10 in ")
  assert "File too large" in message and message.endswith("resumes from checkpoint 5.")
  steps = sorted(losses(workdir))
  assert steps == list(range(1, steps[-1] + 1)) and 10 <= steps[-1] < 20  # soon after the save
  # With space again, a rerun resumes from checkpoint 5: it restores and verifies (what the
  # loop calls at its start; the failed save is only a temporary directory).
  resumed = checkpoint.Checkpointer(str(workdir / "checkpoints")).restore_for_resume(
      task.steps.abstract_state)
  assert resumed is not None and resumed[0] == 5


def test_a_failing_metrics_write_is_one_line(tmp_path):
  (tmp_path / "metrics.jsonl").mkdir()  # not writable as a file, whoever runs the tests
  writer = metrics_lib.MetricWriter(str(tmp_path))
  with pytest.raises(metrics_lib.WriteError, match=r"^writing .*metrics.jsonl failed \(Is a "
                     r"directory\); free disk space or make the workdir writable"):
    writer.write(1, {"train_loss": 1.0})
  writer.close()
