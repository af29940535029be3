"""Data pipeline: windows, strides, shuffling by seed, process shares, iterator state, id checks."""

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


@pytest.mark.parametrize("stride", [8, 4, 1])
def test_windows_follow_the_stride_and_targets_shift_by_one(stride):
  config = make_config(stride=stride)
  source = data.WindowSource(TOKENS, config.data.seq_len, stride)
  assert len(source) == (len(TOKENS) - 9) // stride + 1
  for i in (0, 1, len(source) - 1):
    window = source[i]
    np.testing.assert_array_equal(window, TOKENS[i * stride:i * stride + 9])
    example = data.window_example(window, eos_id=3)
    np.testing.assert_array_equal(example["targets"][:-1], example["inputs"][1:])


def test_documents_get_segments_and_positions():
  example = data.window_example(np.array([5, 6, 3, 7, 8, 3, 9, 10]), eos_id=3)
  np.testing.assert_array_equal(example["segment_ids"], [1, 1, 1, 2, 2, 2, 3])
  np.testing.assert_array_equal(example["positions"], [0, 1, 2, 0, 1, 2, 0])


def take(dataset, n):
  iterator = data.train_iterator(dataset)
  return [next(iterator) for _ in range(n)]


def test_same_seed_same_batches_other_seed_other_order():
  config = make_config()
  first = take(data.train_dataset(TOKENS, config, eos_id=3), 6)
  again = take(data.train_dataset(TOKENS, config, eos_id=3), 6)
  other = take(data.train_dataset(TOKENS, config_lib.replace(config, seed=1), eos_id=3), 6)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert any(not np.array_equal(a["inputs"], c["inputs"]) for a, c in zip(first, other))


def test_every_window_once_per_epoch_then_reshuffled():
  config = make_config()
  source = data.WindowSource(TOKENS, 8, 8)
  assert len(source) % 4 == 0
  per_epoch = len(source) // 4
  batches = take(data.train_dataset(TOKENS, config, eos_id=3), 2 * per_epoch)
  rows = lambda bs: sorted(tuple(r) for b in bs for r in b["inputs"])
  every_window = sorted(tuple(source[i][:-1]) for i in range(len(source)))
  assert rows(batches[:per_epoch]) == every_window
  assert rows(batches[per_epoch:]) == every_window
  first_epoch = [b["inputs"] for b in batches[:per_epoch]]
  second_epoch = [b["inputs"] for b in batches[per_epoch:]]
  assert not all(np.array_equal(a, b) for a, b in zip(first_epoch, second_epoch))


def test_processes_split_each_global_batch():
  config = make_config()
  whole = take(data.train_dataset(TOKENS, config, eos_id=3), 3)
  halves = [take(data.train_dataset(TOKENS, config, 3, group=p, groups=2), 3)
            for p in range(2)]
  for step in range(3):
    assert halves[0][step]["inputs"].shape[0] == 2
    rows = lambda b: {tuple(r) for r in b["inputs"]}
    assert rows(halves[0][step]) | rows(halves[1][step]) == rows(whole[step])
    assert not rows(halves[0][step]) & rows(halves[1][step])


def test_iterator_state_resumes_exactly():
  config = make_config()
  iterator = data.train_iterator(data.train_dataset(TOKENS, config, eos_id=3))
  for _ in range(5):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator)["inputs"] for _ in range(4)]
  resumed = data.train_iterator(data.train_dataset(TOKENS, config, eos_id=3))
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["inputs"], want)


def test_eval_batches_pad_with_zero_weight():
  config = make_config()
  batches = data.eval_batches(TOKENS, config, eos_id=3, num_batches=100)
  windows = data.num_windows(len(TOKENS), 8, 8)
  assert sum(b["weights"][:, 0].sum() for b in batches) == windows
  assert len(batches) == -(-windows // 4)


def test_ids_outside_the_vocabulary_are_refused():
  with pytest.raises(data.DataError, match="model.vocab_size=50"):
    data.check_ids(np.array([1, 2, 60]), 50, "train split")


def test_too_short_corpus_is_refused():
  config = make_config()
  with pytest.raises(data.DataError, match="data.seq_len"):
    data.check_enough_tokens(TOKENS[:5], config.data, "train", 1)


def test_partial_evaluation_samples_the_whole_split():
  config = make_config()
  source = data.WindowSource(TOKENS, 8, 8)
  batches = data.eval_batches(TOKENS, config, eos_id=3, num_batches=2)
  rows = [tuple(r) for b in batches for r in b["inputs"]]
  assert len(set(rows)) == 8
  assert rows[0] == tuple(source[0][:-1]) and rows[-1] == tuple(source[len(source) - 1][:-1])


def test_window_source_stride_zero_is_seq_len_and_its_indices_are_checked():
  source = data.WindowSource(TOKENS, 8)
  assert source.stride == 8 and len(source) == (len(TOKENS) - 9) // 8 + 1
  for index in (len(source), -1):
    with pytest.raises(IndexError):
      source[index]


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
