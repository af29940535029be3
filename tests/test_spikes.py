"""Loss spikes: detected on finite steps, logged with their batch's data position, and skipped,
rolled back, halted on or only logged, by train.spike_action; a run poisoned with bad batches
recovers with `skip` and `rollback` and visibly does not without them."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import loop, pretrain, sharding
from jaxlm import steps as steps_lib
from tests.helpers import losses, pattern_batch, step_config, tiny_values

POISON_STEPS = tuple(range(16, 24))   # the batches of these steps are replaced by poison
POISON_TOKEN = 3 + 0xC8       # a byte-fallback token: never seen in ASCII Python source


# -- the step ---------------------------------------------------------------------------------

@pytest.mark.parametrize("action", ["log", "skip"])  # halt is skip in the step (see below)
def test_the_step_flags_a_spike_and_applies_it_only_when_told(action):
  config = step_config(action)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  steps = steps_lib.make_steps(config, mesh)
  state = steps.init(jax.random.PRNGKey(0))
  clean = sharding.global_batch(pattern_batch(-1), mesh)
  flags = []
  for _ in range(16):  # a learnable pattern: the loss falls, nothing is a spike
    state, metrics = steps.train(state, clean)
    flags.append(int(metrics["spike"]))
  assert flags == [0] * 16
  before = jax.device_get(state)
  state, metrics = steps.train(state, sharding.global_batch(pattern_batch(60), mesh))
  after = jax.device_get(state)
  ratio = float(metrics["train_loss"]) / float(metrics["loss_mean"])
  assert ratio > 2 * 1.5  # the poison is far past the threshold, not near it
  assert int(metrics["spike"]) == 1
  assert int(after.step) == int(before.step) + 1
  unchanged = jax.tree.leaves(jax.tree.map(np.array_equal, before.params, after.params))
  if action == "skip":  # not applied: params, optimizer state and means kept
    assert all(unchanged)
    np.testing.assert_array_equal(after.spike_stats, before.spike_stats)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before.opt_state,
                                            after.opt_state)))
  else:
    assert not all(unchanged)
    assert after.spike_stats[2] == before.spike_stats[2] + 1


def test_spike_settings_are_checked():
  for field, value, match in [("spike_action", "rewind", "train.spike_action"),
                              ("spike_loss_ratio", 1.0, "must be > 1"),
                              ("spike_window", 0, "train.spike_window"),
                              ("rollback_lr_factor", 0.0, "train.rollback_lr_factor"),
                              ("max_rollbacks", -1, "train.max_rollbacks")]:
    with pytest.raises(config_lib.ConfigError, match=match):
      step_config("skip", **{field: value})


# -- the loop, on a poisoned pretraining run ---------------------------------------------------

class Poisoned:
  """A train iterator whose batches at POISON_STEPS have every target replaced by one token
  the model has never seen: a stand-in for a corrupt shard."""

  def __init__(self, iterator):
    self.iterator, self.position = iterator, 0

  def __next__(self):
    batch = dict(next(self.iterator))
    self.position += 1
    if self.position in POISON_STEPS:
      batch["targets"] = np.full_like(batch["targets"], POISON_TOKEN)
    return batch

  def get_state(self):
    return {"inner": self.iterator.get_state(), "position": self.position}

  def set_state(self, state):
    self.iterator.set_state(state["inner"])
    self.position = state["position"]


def poisoned_run(data_dir, workdir, action: str, stop_at_step=None, poison=True, **train):
  values = tiny_values(data_dir, train={
      "num_steps": 30, "log_every": 1, "eval_every": 30, "checkpoint_every": 10,
      "sample_every": 0, "sample_max_new_tokens": 0, "spike_window": 8,
      # A loss 30% above its running mean: this tiny model's clean steps stay within 10%.
      "spike_loss_ratio": 1.3,
      "spike_action": action, **train},
      optim={"learning_rate": 3e-3, "warmup_steps": 2, "schedule": "constant"})
  task = pretrain.job(pretrain.prepare(config_lib.validate(values), str(workdir)))
  if poison:
    make_data = task.data
    task.data = lambda: Poisoned(make_data())
  return loop.fit(task, stop_at_step=stop_at_step, show_progress=False)


# Back to checkpoint 10, on after the spike's batch and 8 more (past all the poison), at half
# the learning rate for 5 steps.
ROLLBACK = {"rollback_skip_batches": 8, "rollback_lr_factor": 0.5, "rollback_lr_steps": 5}
RUNS = {"clean": ("log", {}), "log": ("log", {}),
        "skip": ("skip", {"layer_stats_every": 10}), "rollback": ("rollback", ROLLBACK)}


@pytest.fixture(scope="module")
def clean_and_poisoned(shared_data_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("spikes")
  for name, (action, train) in RUNS.items():
    poisoned_run(shared_data_dir, root / name, action, poison=name != "clean", **train)
  return {name: root / name for name in RUNS}


@pytest.mark.e2e
def test_skip_recovers_from_poisoned_batches_and_without_it_the_loss_jumps(clean_and_poisoned):
  clean, applied, skipped = (losses(clean_and_poisoned[n]) for n in ("clean", "log", "skip"))
  after = range(POISON_STEPS[-1] + 1, POISON_STEPS[-1] + 4)  # the 3 clean steps after it
  gap = lambda run: float(np.mean([run[s] - clean[s] for s in after]))
  # Measured: applied 0.73 nats above the clean run, skipped 0.09 (it lacks 8 batches of
  # learning, not more).
  assert gap(applied) > 0.4, gap(applied)        # the poison went into the weights
  assert abs(gap(skipped)) < 0.25, gap(skipped)  # skipped: the run carried on as if clean
  # Logged with the data position of each batch: under skip every poisoned step (the running
  # means stay clean); under log the first ones, before the applied poison moves the means.
  for name in ("log", "skip"):
    records = [json.loads(line) for line in open(clean_and_poisoned[name] / "metrics.jsonl")]
    spikes = [r for r in records if r.get("spike")]
    steps = [r["step"] for r in spikes]
    assert steps[0] == POISON_STEPS[0] and set(steps) <= set(POISON_STEPS), (name, steps)
    assert name == "log" or steps == list(POISON_STEPS), steps
    assert [r["spike_batch_position"]["position"] for r in spikes] == [s - 1 for s in steps]
    assert all(r["spike_loss_ratio"] > 1.3 and r["spike_action"] == name for r in spikes)
  # Per-layer statistics (train.layer_stats_every=10 in the skip run) at steps 10, 20, 30 and
  # at every spike show where it hit: the gradient of the (tied) embeddings and of the final
  # norm. Measured: 12x and 5.6x step 10's; the blocks' 5-7x.
  records = [json.loads(line) for line in open(clean_and_poisoned["skip"] / "metrics.jsonl")]
  with_stats = [r for r in records if "grad_rms/token_embed" in r]
  assert [r["step"] for r in with_stats if not r.get("spike")] == [10, 20, 30]
  assert [r["step"] for r in with_stats if r.get("spike")] == list(POISON_STEPS)
  before = with_stats[0]
  for spike in (r for r in with_stats if r.get("spike")):
    assert spike["grad_rms/token_embed"] > 5 * before["grad_rms/token_embed"]
    assert spike["grad_rms/final_norm"] > 2.5 * before["grad_rms/final_norm"]
    assert {"attention_logit_max/layer_1", "max_logit", "update_rms/layer_0"} <= set(spike)
  # The clean run, watched at the same threshold (spike_action=log), had no false alarm.
  assert not [r for r in map(json.loads, open(clean_and_poisoned["clean"] / "metrics.jsonl"))
              if r.get("spike")]


@pytest.mark.e2e
def test_rollback_recovers_and_logs_what_it_did(clean_and_poisoned):
  clean, applied, rolled = (losses(clean_and_poisoned[n]) for n in ("clean", "log", "rollback"))
  after = range(POISON_STEPS[-1] + 1, POISON_STEPS[-1] + 4)
  gap = lambda run: float(np.mean([run[s] - clean[s] for s in after]))
  # Measured: 0.01 nats from the clean run (applied: 0.73). Its steps 11-30 trained on batches
  # 25-44, so every step's loss exists once, on the path the weights took.
  assert gap(applied) > 0.4 and abs(gap(rolled)) < 0.25, (gap(applied), gap(rolled))
  records = [json.loads(line) for line in open(clean_and_poisoned["rollback"] / "metrics.jsonl")]
  [rollback] = [r for r in records if r.get("spike")]
  assert rollback["step"] == 10 and rollback["spike_step"] == POISON_STEPS[0]
  assert rollback["rollback_skipped_batches"] == 6 + 8 and rollback["rollbacks"] == 1
  assert rollback["spike_batch_position"]["position"] == POISON_STEPS[0] - 1
  assert [r["step"] for r in records if "train_loss" in r] == list(range(1, 31))
  rates = {r["step"]: r["learning_rate"] for r in records if "learning_rate" in r}
  assert all(rates[s] == pytest.approx(1.5e-3) for s in range(11, 16))  # half, 5 steps
  assert all(rates[s] == pytest.approx(3e-3) for s in (10, 16, 30))


@pytest.mark.e2e
def test_a_resumed_run_rolls_back_as_an_uninterrupted_one(clean_and_poisoned, shared_data_dir,
                                                          tmp_path):
  """Stopped after the rollback (step 25 of the path after it) and resumed: the same losses,
  step for step, as the uninterrupted run with the same rollback."""
  for stop in (25, None):
    summary = poisoned_run(shared_data_dir, tmp_path / "cut", "rollback", stop_at_step=stop,
                           **ROLLBACK)
    assert summary["finished"] == (stop is None)
  assert losses(tmp_path / "cut") == losses(clean_and_poisoned["rollback"])


@pytest.mark.e2e
def test_halt_stops_at_the_first_spike_and_skips_have_a_limit(shared_data_dir, tmp_path):
  with pytest.raises(loop.TrainingDiverged, match=r"loss spike at step 16 .*spike_action=halt"
                     r".*the last checkpoint \(step 10\)"):
    poisoned_run(shared_data_dir, tmp_path / "halt", "halt")
  with pytest.raises(loop.TrainingDiverged, match=r"3 spikes in a row at step 18 "
                     r"\(train.max_spike_steps=2\)"):
    poisoned_run(shared_data_dir, tmp_path / "limit", "skip", max_spike_steps=2)
  # Rolled back to step 10 and on without skipping more: the next poisoned batch spikes at
  # step 11, twice, then the limit (gradient-norm ratio 8.5 there: the loss mean is higher).
  with pytest.raises(loop.TrainingDiverged, match=r"loss spike at step 11 after 2 rollbacks "
                     r"\(train.max_rollbacks=2\)"):
    poisoned_run(shared_data_dir, tmp_path / "rollbacks", "rollback", max_rollbacks=2,
                 spike_grad_ratio=5.0)
