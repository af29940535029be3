"""Token arrays and rows: document fields of windows, id checks, too-short corpora."""

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import data


def make_config(**data_overrides):
  values = {"data": {"seq_len": 8, "stride": 8, **data_overrides},
            "model": {"max_seq_len": 8, "vocab_size": 100},
            "train": {"global_batch_size": 4}}
  return config_lib.validate(values)


TOKENS = np.arange(1, 200, dtype=np.uint16) % 96 + 4   # ids 4..99: no EOS (3), one document


def test_documents_get_segments_and_positions():
  example = data.window_example(np.array([5, 6, 3, 7, 8, 3, 9, 10]), eos_id=3)
  np.testing.assert_array_equal(example["segment_ids"], [1, 1, 1, 2, 2, 2, 3])
  np.testing.assert_array_equal(example["positions"], [0, 1, 2, 0, 1, 2, 0])


def test_ids_outside_the_vocabulary_are_refused():
  with pytest.raises(data.DataError, match="model.vocab_size=50"):
    data.check_ids(np.array([1, 2, 60]), 50, "train split")


def test_too_short_corpus_is_refused():
  config = make_config()
  with pytest.raises(data.DataError, match="data.seq_len"):
    data.check_enough_tokens(TOKENS[:5], config.data, "train", 1)


def test_a_batch_of_windows_gets_the_fields_of_each_window():
  """The loader builds the fields of a whole batch at once: documents (EOS) inside the windows
  restart segment ids and positions row by row, as window by window."""
  rng = np.random.default_rng(0)
  windows = rng.integers(3, 7, size=(6, 17)).astype(np.int32)  # EOS (3) about every 4 tokens
  batch = data.window_example(windows, eos_id=3)
  for key, value in batch.items():
    expected = np.stack([data.window_example(w, eos_id=3)[key] for w in windows])
    assert value.dtype == expected.dtype and np.array_equal(value, expected), key
  assert batch["segment_ids"].max() > 2 and (batch["positions"] == 0).sum() > 6


def reference_example(window, eos_id):
  """The fields of one window the plain way (cumulative sums), to check the loader's."""
  inputs = np.asarray(window[:-1], np.int32)
  starts = np.zeros(len(inputs), bool)
  starts[1:] = inputs[:-1] == eos_id
  segment_ids = np.cumsum(starts) + 1
  positions = np.arange(len(inputs)) - np.maximum.accumulate(np.where(starts,
                                                                     np.arange(len(inputs)), 0))
  return segment_ids, positions


@pytest.mark.parametrize("eos_every", [3, 17, 1000])
def test_batch_fields_equal_the_plain_cumulative_sums(eos_every):
  """Documents shorter than, about as long as and longer than a window; an EOS first and last
  in a row; both the shared read-only arrays (no boundary) and the computed ones."""
  rng = np.random.default_rng(eos_every)
  windows = rng.integers(4, 50, size=(7, 33))
  windows[rng.random(windows.shape) < 1 / eos_every] = 3
  windows[0, 0] = windows[1, 31] = windows[2, 32] = 3
  batch = data.window_example(windows.astype(np.uint16), eos_id=3)
  for row, window in enumerate(windows):
    segment_ids, positions = reference_example(window, 3)
    np.testing.assert_array_equal(batch["segment_ids"][row], segment_ids)
    np.testing.assert_array_equal(batch["positions"][row], positions)
    np.testing.assert_array_equal(batch["inputs"][row], window[:-1])
    np.testing.assert_array_equal(batch["targets"][row], window[1:])
  assert batch["inputs"].dtype == np.int32 and batch["weights"].dtype == np.float32
  plain = data.window_example(np.full((2, 9), 7), eos_id=3)
  assert (plain["segment_ids"] == 1).all() and not plain["positions"].flags.writeable
