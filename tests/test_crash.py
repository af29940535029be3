"""kill -9 during training and asynchronous checkpoint writes (experiments/crash_test.py):
every restart resumes from the newest complete checkpoint and the finished run logs the
uninterrupted run's losses. CI kills twice; the README reports a 20-kill run."""

import json
import os
import subprocess
import sys

import pytest

from tests.test_pretrain import REPO, overrides, tiny_values


@pytest.mark.slow
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
