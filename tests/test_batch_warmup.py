"""train.batch_warmup_tokens (GPT-3's batch-size warmup, jaxlm/batch_warmup.py): the step size
doubles along a linear ramp in tokens; every drawn row is trained on exactly once, in the order
the loader draws them; a run stopped in the middle of a split batch resumes to the
uninterrupted run's losses; bad settings are one line."""

import numpy as np
import pytest

from jaxlm import batch_warmup, pretrain
from jaxlm import config as config_lib
from tests.helpers import losses, tiny_values


def train_config(**train):
  return config_lib.validate({"data": {"seq_len": 8}, "model": {"max_seq_len": 8},
                              "train": {"global_batch_size": 16, **train}}).train


def test_the_batch_doubles_along_a_linear_ramp_in_tokens():
  # 16 x 8 = 128 tokens per drawn batch; a ramp over 10 drawn batches from 2 rows to 16.
  train = train_config(batch_warmup_tokens=1280, batch_warmup_start=2)
  assert batch_warmup.ladder(train) == [2, 4, 8, 16]
  rows = [batch_warmup.rows_for_batch(train, 8, b) for b in range(12)]
  # ramp(b) = 2 + 14 b / 10: 2, 3.4, 4.8, 6.2, 7.6, 9, ... 15.8, then full
  assert rows == [2, 2, 4, 4, 4, 8, 8, 8, 8, 8, 16, 16]
  assert batch_warmup.rows_for_batch(train_config(), 8, 0) == 16  # off


class CountingBatches:
  """A loader stand-in: batch b holds rows b * 16 .. b * 16 + 15 (and their negatives)."""

  def __init__(self):
    self.batch = 0

  def __next__(self):
    rows = np.arange(self.batch * 16, self.batch * 16 + 16)
    self.batch += 1
    return {"inputs": rows[:, None], "targets": -rows[:, None]}

  def get_state(self):
    return {"batch": self.batch}

  def set_state(self, state):
    self.batch = state["batch"]


def test_every_drawn_row_is_used_once_in_order_and_the_state_resumes_mid_batch():
  train = train_config(batch_warmup_tokens=1280, batch_warmup_start=2)
  batches = batch_warmup.WarmupBatches(CountingBatches(), train, 8)
  steps = [next(batches) for _ in range(40)]
  # Drawn batches 0-1 in 8 steps of 2 rows each, 2-4 in 4 of 4, 5-9 in 2 of 8, then whole.
  sizes = [len(s["inputs"]) for s in steps]
  assert sizes == [2] * 16 + [4] * 12 + [8] * 10 + [16] * 2
  seen = np.concatenate([s["inputs"][:, 0] for s in steps])
  assert sorted(seen) == list(range(len(seen)))  # each row once, no row skipped
  assert all(np.array_equal(s["targets"], -s["inputs"]) for s in steps)  # keys stay aligned
  # Strided parts: the first step of the first batch takes rows 0 and 8 (of 0..15).
  assert list(steps[0]["inputs"][:, 0]) == [0, 8]

  # Stop after 11 steps (in the middle of drawn batch 1's 8 parts), resume in a new iterator.
  again = batch_warmup.WarmupBatches(CountingBatches(), train, 8)
  for _ in range(11):
    next(again)
  state = again.get_state()
  assert state == {"batch": 1, "warmup_drawn": 1, "warmup_part": 3}
  assert batch_warmup.rows_of_last_step(train, 8, state) == 2
  resumed = batch_warmup.WarmupBatches(CountingBatches(), train, 8)
  resumed.set_state(state)
  for want in steps[11:]:
    assert np.array_equal(next(resumed)["inputs"], want["inputs"])


@pytest.mark.e2e
def test_a_run_stopped_inside_a_split_batch_resumes_to_the_uninterrupted_losses(
    tmp_path, shared_data_dir):
  # 32 rows x 64 tokens per drawn batch (8 rows at least: the 8 test devices' data axis); the
  # ramp from 8 rows spans 4 drawn batches: 0-1 in 4 steps of 8 rows, 2-3 in 2 steps of 16.
  config = config_lib.validate(tiny_values(shared_data_dir, train={
      "global_batch_size": 32, "batch_warmup_tokens": 4 * 32 * 64, "batch_warmup_start": 8,
      "checkpoint_every": 3, "eval_every": 12}))
  straight = tmp_path / "straight"
  pretrain.train(config, str(straight), show_progress=False)
  rows = losses(straight, "batch_rows")
  assert [rows[s] for s in range(1, 13)] == [8] * 8 + [16] * 4
  assert losses(straight, "tokens_seen")[12] == (8 * 8 + 4 * 16) * 64
  resumed = tmp_path / "resumed"
  pretrain.train(config, str(resumed), stop_at_step=6, show_progress=False)  # (batch 1: 2 of 4)
  pretrain.train(config, str(resumed), show_progress=False)
  assert losses(resumed) == losses(straight)
  # Another ramp would replay or skip rows: refused on resume.
  from jaxlm import run as run_lib
  other = config_lib.replace(config, train={"batch_warmup_start": 4})
  assert run_lib.incompatible_keys(config_lib.to_dict(config), config_lib.to_dict(other)) == [
      "train.batch_warmup_start"]


@pytest.mark.parametrize("train, message", [
    ({"batch_warmup_tokens": 100, "batch_warmup_start": 3},
     r"train.batch_warmup_start=3 must divide train.global_batch_size=16 by a power of two"),
    ({"batch_warmup_tokens": 100, "batch_warmup_start": 0},
     r"train.batch_warmup_start=0 must divide"),
    ({"batch_warmup_tokens": 100, "batch_warmup_start": 2, "microbatches": 4},
     r"train.batch_warmup_start=2 is not divisible by train.microbatches=4"),
    ({"batch_warmup_tokens": -1}, r"train.batch_warmup_tokens=-1 must be >= 0"),
])
def test_bad_warmup_settings_are_one_line(train, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    train_config(**train)


def test_a_warmup_start_the_mesh_cannot_split_is_refused_before_anything_is_written(
    tmp_path, shared_data_dir):
  config = config_lib.validate(tiny_values(shared_data_dir, train={
      "batch_warmup_tokens": 1000, "batch_warmup_start": 1}, mesh={"data": -1}))
  with pytest.raises(config_lib.ConfigError, match=r"train.batch_warmup_start=1 \(the warmup's "
                                                   r"first steps\).*not divisible by mesh"):
    pretrain.prepare(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
