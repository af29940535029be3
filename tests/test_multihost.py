"""Multi-host for real: processes on 127.0.0.1 joined by jax.distributed (gloo CPU collectives)."""

import json
import os
import shutil
import signal
import time

import pytest

from jaxlm import config as config_lib
from jaxlm import tokenizer as tokenizer_lib
from tests.helpers import launch, losses, tiny_values, wait


@pytest.fixture(scope="module")
def values(shared_data_dir):
  values = tiny_values(shared_data_dir,
                       train={"num_steps": 10, "global_batch_size": 8, "log_every": 1,
                              "eval_every": 5, "checkpoint_every": 5, "sample_every": 0,
                              "sample_max_new_tokens": 4},
                       mesh={"data": -1})
  # Train the tokenizer once here rather than racing in two processes.
  tokenizer_lib.get_tokenizer(config_lib.validate(values).data, values["model"]["vocab_size"])
  return values


@pytest.mark.e2e
def test_pipeline_stages_across_four_processes_equal_one_and_their_checkpoint_moves(tmp_path,
                                                                                    values):
  """4 processes x 2 devices as stage 2 x fsdp 2 x tensor 2: each process holds half of one
  stage (the pipeline's activations, FSDP's gathers and the gradients cross processes), and
  processes 0 and 2 (stage 0 and 1) read the same rows, as do 1 and 3: each reads half the
  token bytes one process on 8 devices reads. Equal to one process on
  8 devices (data 8), through a spike rollback decided by all processes together: a learning
  rate of 1.0 makes step 2's loss ~5x step 1's (far from the threshold 2x, in both runs
  alike), the run rolls back to its start, and goes on at 1e-3 x that rate."""
  values = dict(values, optim=dict(values["optim"], learning_rate=1.0, schedule="constant",
                                   warmup_steps=0),
                model=dict(values["model"], scan_layers=True),
                train=dict(values["train"], spike_action="rollback", spike_window=1,
                           rollback_lr_factor=1e-3, rollback_lr_steps=100,
                           sample_every=10, sample_temperature=0.0))  # greedy samples at 10
  staged = tmp_path / "staged"
  stderr = wait(launch(staged, dict(values, mesh={"stage": 2, "data": 1, "fsdp": 2, "tensor": 2}),
                       num_processes=4, devices_per_process=2))[0]
  assert "pipeline: 2 stages x 4 microbatches" in stderr
  one = tmp_path / "one"
  wait(launch(one, values, num_processes=1, devices_per_process=8))
  got, want = losses(staged), losses(one)
  assert sorted(got) == list(range(1, 11))
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-5), step
  for key in ("eval_loss", "eval_bits_per_byte"):  # bytes counted once per group of processes
    assert losses(staged, key)[10] == pytest.approx(losses(one, key)[10], rel=1e-5), key
  # The loader reads only a process's rows: each of the two groups reads half the token bytes.
  assert losses(staged, "data_bytes_read")[10] * 2 == losses(one, "data_bytes_read")[10] > 0
  # Decoding runs unpipelined on the stage-sharded params (every process takes part): the same
  # greedy continuations.
  samples = [[json.loads(line)["text"] for line in open(run / "samples.jsonl")]
             for run in (staged, one)]
  assert samples[0] == samples[1]
  assert len(samples[0]) == len(config_lib.TrainConfig.sample_prompts)
  for run in (one, staged):
    [rollback] = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r.get("rollback")]
    assert (rollback["step"], rollback["spike_step"]) == (0, 2)

  # The checkpoint written by four processes (the layers sharded over stages) restores in one
  # process on one device: every array is read back from its shards and resharded.
  copy = tmp_path / "restored"
  shutil.copytree(staged, copy)
  longer = dict(values, train=dict(values["train"], num_steps=12),
                mesh={"stage": 1, "data": -1, "fsdp": 1, "tensor": 1})  # (the run's is stored)
  stderr = wait(launch(copy, longer, num_processes=1, devices_per_process=1))[0]
  assert f"resumed from {copy / 'checkpoints'}/10" in stderr
  resumed = losses(copy)
  assert sorted(resumed) == list(range(1, 13))
  assert resumed[12] < resumed[1]


@pytest.mark.e2e
def test_sigterm_on_one_process_stops_both_at_the_same_step(tmp_path, values):
  workdir = tmp_path / "run"
  endless = dict(values, train=dict(values["train"], num_steps=100000, eval_every=100000,
                                    checkpoint_every=100000))
  processes = launch(workdir, endless, num_processes=2, devices_per_process=4)
  deadline = time.time() + 300
  while time.time() < deadline:
    if (workdir / "metrics.jsonl").exists() and len(losses(workdir)) >= 3:
      break
    time.sleep(0.5)
  processes[1].send_signal(signal.SIGTERM)  # one preempted host is enough
  wait(processes, timeout=300)
  steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints"))
  assert len(steps) == 1 and steps[0] >= 3
  meta = json.load(open(workdir / "summary.json"))
  assert meta["step"] == steps[0] and meta["stop_reason"] == "SIGTERM"

  rerun = dict(endless, train=dict(endless["train"], num_steps=steps[0] + 2))
  stderr = wait(launch(workdir, rerun, num_processes=2, devices_per_process=4))[0]
  assert f"resumed from {workdir / 'checkpoints'}/{steps[0]}" in stderr
  assert max(losses(workdir)) == steps[0] + 2
