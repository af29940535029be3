"""The pretraining loader: windows over shards, shuffling without replacement by seed and epoch,
process shares, exact resume, mixtures (grain's selection), evaluation batches."""

import numpy as np
import pytest

from jaxlm import loader
from jaxlm.data import DataError, window_example

TOKENS = np.arange(1, 200, dtype=np.uint16) % 96 + 4   # ids 4..99: no EOS (3), one document


def single(tokens=TOKENS, seq_len=8, stride=0, batch=4, seed=0, group=0, groups=1):
  windows = loader.Windows([tokens], seq_len, stride)
  return loader.Loader([loader.Source("only", windows)], seed, batch, eos_id=3, group=group,
                       groups=groups)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def rows(batches):
  return [tuple(r) for b in batches for r in b["inputs"]]


@pytest.mark.parametrize("stride", [8, 4, 1])
def test_windows_follow_the_stride_and_targets_shift_by_one(stride):
  windows = loader.Windows([TOKENS], 8, stride)
  assert len(windows) == (len(TOKENS) - 9) // stride + 1
  for i in (0, 1, len(windows) - 1):
    np.testing.assert_array_equal(windows.gather(np.array([i]))[0],
                                  TOKENS[i * stride:i * stride + 9])
  example = window_example(windows.gather(np.arange(3)), eos_id=3)
  np.testing.assert_array_equal(example["targets"][:, :-1], example["inputs"][:, 1:])


def test_windows_never_cross_shards_and_number_them_in_order():
  shards = [np.arange(0, 20, dtype=np.uint16), np.arange(100, 113, dtype=np.uint16),
            np.arange(200, 203, dtype=np.uint16)]  # 2 + 1 + 0 windows of 9 tokens
  windows = loader.Windows(shards, 8)
  assert len(windows) == 3
  got = windows.gather(np.array([2, 0, 1]))
  np.testing.assert_array_equal(got, [np.arange(100, 109), np.arange(0, 9), np.arange(8, 17)])
  assert windows.bytes_read == 3 * 9 * 2


def test_same_seed_same_batches_other_seed_other_order():
  first, again = take(single(), 6), take(single(), 6)
  other = take(single(seed=1), 6)
  assert rows(first) == rows(again)
  assert rows(first) != rows(other)


def test_every_window_once_per_epoch_then_reshuffled():
  windows = loader.Windows([TOKENS], 8)
  assert len(windows) % 4 == 0
  per_epoch = len(windows) // 4
  batches = take(single(), 2 * per_epoch)
  every_window = sorted(tuple(w[:-1]) for w in windows.gather(np.arange(len(windows))))
  assert sorted(rows(batches[:per_epoch])) == every_window
  assert sorted(rows(batches[per_epoch:])) == every_window
  assert rows(batches[:per_epoch]) != rows(batches[per_epoch:])


def test_an_epoch_boundary_inside_a_batch():
  """23 windows, batches of 4: batch 5 holds the last 3 windows of epoch 0 and the first of
  epoch 1; every epoch still gives each window once."""
  tokens = np.arange(4, 4 + 23 * 8 + 1, dtype=np.uint16) % 90 + 4
  windows = loader.Windows([tokens], 8)
  assert len(windows) == 23
  got = rows(take(single(tokens), 23))  # 92 windows = 4 epochs
  every_window = sorted(tuple(w[:-1]) for w in windows.gather(np.arange(23)))
  for epoch in range(4):
    assert sorted(got[epoch * 23:(epoch + 1) * 23]) == every_window


def test_process_groups_split_each_global_batch_and_read_only_their_rows():
  whole = single()
  halves = [single(group=g, groups=2) for g in range(2)]
  for _ in range(3):
    want, parts = next(whole), [next(h) for h in halves]
    assert all(p["inputs"].shape[0] == 2 for p in parts)
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]),
                                  want["inputs"][[0, 2, 1, 3]])
  assert halves[0].bytes_read == halves[1].bytes_read == whole.bytes_read // 2
  with pytest.raises(DataError, match="not divisible by the 3 groups"):
    single(groups=3)


def test_state_is_the_batch_number_and_resumes_exactly():
  iterator = single()
  take(iterator, 5)
  state = iterator.get_state()
  assert state == {"batch": 5}
  expected = take(iterator, 9)  # (across an epoch boundary)
  resumed = single()
  resumed.set_state(state)
  assert rows(take(resumed, 9)) == rows(expected)
  # A grain iterator's state (runs checkpointed before this loader) is its batch count.
  old = single()
  old.set_state({"next_index": 5})
  assert old.get_state() == {"batch": 5}


def test_mixture_selection_is_grains_and_exact_at_every_step():
  grain_mix = pytest.importorskip("grain._src.python.dataset.transformations.mix")
  import grain
  proportions = loader.integer_proportions([0.7, 0.2, 0.1])
  assert proportions == [7, 2, 1]
  parents = [grain.MapDataset.range(10**6) for _ in proportions]
  reference = grain_mix.SelectionWithProportionsMap(parents, [0.7, 0.2, 0.1])
  positions = np.arange(500)
  source, index = loader.mixture_select(positions, proportions)
  assert [reference[int(p)] for p in positions] == list(zip(source.tolist(), index.tolist()))
  for total in (1, 10, 37, 500):
    counts = loader.mixture_counts(total, proportions)
    assert counts == [int((source[:total] == k).sum()) for k in range(3)]
    assert all(abs(c - total * p / 10) <= 1 for c, p in zip(counts, proportions))


def test_a_mixture_draws_each_source_by_weight_without_replacement():
  a = np.arange(4, 4 + 8 * 60 + 1, dtype=np.uint16)            # 60 distinct windows, ids < 500
  b = np.arange(1000, 1000 + 8 * 20 + 1, dtype=np.uint16)       # 20 of them, ids >= 1000
  sources = [loader.Source("a", loader.Windows([a], 8), 0.75),
             loader.Source("b", loader.Windows([b], 8), 0.25)]
  mixed = loader.Loader(sources, seed=0, global_batch_size=8, eos_id=3)
  batches = take(mixed, 10)  # 80 windows: 60 of a (one epoch) and 20 of b (one epoch)
  got = rows(batches)
  from_b = [r for r in got if r[0] >= 1000]
  assert len(from_b) == 20 and len(set(from_b)) == 20
  assert len(set(got) - set(from_b)) == 60
  assert mixed.tokens_per_source() == {"a": 60 * 8, "b": 20 * 8}
  assert mixed.tokens_per_source(batches=2) == {"a": 12 * 8, "b": 4 * 8}
  resumed = loader.Loader(sources, seed=0, global_batch_size=8, eos_id=3)
  resumed.set_state({"batch": 7})
  assert rows(take(resumed, 3)) == rows(batches[7:])


def test_eval_batches_pad_with_zero_weight_and_sample_the_whole_split():
  windows = loader.Windows([TOKENS], 8)
  source = [loader.Source("only", windows)]
  batches = loader.eval_batches(source, 4, eos_id=3, num_batches=100)
  assert sum(b["weights"][:, 0].sum() for b in batches) == len(windows)
  assert len(batches) == -(-len(windows) // 4)
  partial = loader.eval_batches(source, 4, eos_id=3, num_batches=2)
  got = rows(partial)
  assert len(set(got)) == 8
  every = windows.gather(np.arange(len(windows)))
  assert got[0] == tuple(every[0][:-1]) and got[-1] == tuple(every[-1][:-1])
  halves = [loader.eval_batches(source, 4, 3, 2, group=g, groups=2) for g in range(2)]
  assert sorted(rows(halves[0]) + rows(halves[1])) == sorted(got)


def test_an_empty_source_is_refused():
  with pytest.raises(DataError, match="no window"):
    single(tokens=TOKENS[:5])
