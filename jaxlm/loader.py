"""The pretraining loader: shuffled windows of token arrays (one corpus or a mixture) -> this
process's rows of each global batch, as a pure function of the batch number.

  windows   `Windows`: every `stride` tokens of each token array (a shard, or the one array of
            an embedded corpus) a window of `seq_len + 1` tokens starts; windows never cross
            arrays. Random access, gathered for a whole batch in one numpy call per array.
  order     global window i of batch b is row i - b*G of it (G = train.global_batch_size, rows
            numbered across all processes). A mixture maps i to (source k, its j-th window) by
            the weights (`mixture_select`: grain's `MapDataset.mix` selection, vectorised), so
            every source's share is exact at every step. In source k, window j is
            `permutation(seed, k, epoch)[j mod N_k]` with epoch = j // N_k: every window once
            per epoch (shuffled without replacement, reshuffled each epoch).
  rows      a process group (`sharding.batch_group`) takes rows group, group+groups, ...: it
            reads only its share of each global batch.
  state     `{"batch": b}`: the next batch's number. A resumed run continues exactly, and a
            rollback past a spike is a new number, not a replay.

Batches are numpy dicts as `data.window_example` makes them: inputs, targets, weights,
segment_ids, positions, each [rows, seq_len].

Why not grain's `MapDataset`: its per-element machinery costs ~100 us per batch here (measured:
110 us per element through `to_iter_dataset`, 160 us through a plain iterator), more than the
whole of nanoGPT's `get_batch` at the default batch of 8 x 256 tokens (24 us); the vectorised
gather below is what makes this loader at least as fast (`experiments.benchmark data`).
"""

from __future__ import annotations

import collections
import dataclasses
import fractions as fractions_lib
import math
from typing import Any, Mapping, Sequence

import numpy as np

from jaxlm.data import Batch, DataError, group_batch_size, num_windows, window_example


class Windows:
  """Windows of `seq_len + 1` tokens starting every `stride` tokens of each array, in array
  order; arrays are 1-D token arrays (numpy memmaps, or anything with `windows(starts, length)`
  such as `shards.RemoteTokens`)."""

  def __init__(self, arrays: Sequence[Any], seq_len: int, stride: int = 0):
    self.arrays, self.seq_len, self.stride = list(arrays), seq_len, stride or seq_len
    counts = [num_windows(len(a), seq_len, self.stride) for a in self.arrays]
    self.first = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # [arrays + 1]
    self.dtype = np.result_type(*[a.dtype for a in self.arrays]) if self.arrays else np.int32
    self.bytes_read = 0  # token bytes gathered so far (a process reads only its rows)
    # [windows of the array, seq_len + 1] views (no copy; the page cache does the reading), or
    # the remote array itself (ranged reads).
    self._views = [a if hasattr(a, "windows") or len(a) <= seq_len else
                   np.lib.stride_tricks.sliding_window_view(a, seq_len + 1)[::self.stride]
                   for a in self.arrays]

  def __len__(self) -> int:
    return int(self.first[-1])

  def gather(self, ids: np.ndarray) -> np.ndarray:
    """[len(ids), seq_len + 1] tokens of windows `ids` (integers in [0, len)), in the arrays'
    dtype: one gather per array that holds some of them."""
    if len(self.arrays) == 1:
      out = self._take(0, ids)
    else:
      array = np.searchsorted(self.first, ids, side="right") - 1
      out = np.empty((len(ids), self.seq_len + 1), self.dtype)
      for a in np.unique(array):
        rows = np.flatnonzero(array == a)
        out[rows] = self._take(a, ids[rows] - self.first[a])
    self.bytes_read += out.nbytes
    return out

  def _take(self, a: int, local: np.ndarray) -> np.ndarray:
    view = self._views[a]
    if hasattr(view, "windows"):  # remote shards: ranged reads
      return view.windows(np.asarray(local, np.int64) * self.stride, self.seq_len + 1)
    return view[local]


def mixture_select(positions: np.ndarray, proportions: Sequence[int]
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(source, index in that source) of each position of an interleaving of sources in integer
  `proportions`: grain's `MapDataset.mix` selection (`_dataset_and_key_of_next_element`),
  vectorised. Source k's count among the first T positions is within one of
  T * p_k / sum(p), at every T, and position -> (source, index) is a bijection."""
  remaining = sum(proportions)
  current, following = positions.astype(np.int64), positions.astype(np.int64) + 1
  source = np.full(positions.shape, -1, np.int64)
  index = np.zeros(positions.shape, np.int64)
  for k, p in enumerate(proportions):
    current_next = current * (remaining - p) // remaining
    following_next = following * (remaining - p) // remaining
    count = following - following_next
    hit = (source < 0) & (current - current_next != count)
    source[hit], index[hit] = k, count[hit] - 1
    remaining -= p
    current, following = current_next, following_next
  return source, index


def mixture_counts(total: int, proportions: Sequence[int]) -> list[int]:
  """How many of the first `total` positions `mixture_select` gives each source."""
  remaining, counts = sum(proportions), []
  for p in proportions:
    rest = total * (remaining - p) // remaining
    counts.append(total - rest)
    total, remaining = rest, remaining - p
  return counts


def integer_proportions(weights: Sequence[float]) -> list[int]:
  """The smallest integers in the ratios of `weights` (each read as a fraction with a
  denominator up to 10**6: 0.7, 0.2, 0.1 -> 7, 2, 1), as the selection takes them."""
  fractions = [fractions_lib.Fraction(w).limit_denominator(10**6) for w in weights]
  common = math.lcm(*[f.denominator for f in fractions])
  scaled = [int(f * common) for f in fractions]
  divisor = math.gcd(*scaled)
  return [s // divisor for s in scaled]


@dataclasses.dataclass
class Source:
  """One corpus of a mixture (or the only one)."""
  name: str
  windows: Windows
  weight: float = 1.0


class Loader:
  """The iterator the training loop draws from: `next()`, `get_state()`, `set_state()`; see the
  module docstring. `group`/`groups`: this process's block of rows (`sharding.batch_group`)."""

  def __init__(self, sources: Sequence[Source], seed: int, global_batch_size: int, eos_id: int,
               group: int = 0, groups: int = 1):
    for source in sources:
      if not len(source.windows):
        raise DataError(f"data source {source.name} has no window of data.seq_len+1="
                        f"{source.windows.seq_len + 1} tokens; add text or lower data.seq_len.")
    self.sources, self.seed, self.eos_id = list(sources), seed, eos_id
    self.global_batch_size = global_batch_size
    self.rows = np.arange(group, global_batch_size, groups, dtype=np.int64)  # [local rows]
    group_batch_size(global_batch_size, groups)  # (DataError unless it divides)
    self.proportions = integer_proportions([s.weight for s in sources])
    self.batch = 0
    self._permutations: dict[tuple[int, int], np.ndarray] = collections.OrderedDict()

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    positions = self.batch * self.global_batch_size + self.rows   # [local rows] global windows
    self.batch += 1
    if len(self.sources) == 1:
      return window_example(self._gather(0, positions), self.eos_id)
    source, index = mixture_select(positions, self.proportions)
    windows = np.empty((len(positions), self.sources[0].windows.seq_len + 1),
                       np.result_type(*[s.windows.dtype for s in self.sources]))
    for k in np.unique(source):
      rows = np.flatnonzero(source == k)
      windows[rows] = self._gather(int(k), index[rows])
    return window_example(windows, self.eos_id)

  def _gather(self, k: int, index: np.ndarray) -> np.ndarray:
    """[len(index), seq_len + 1] tokens of source k's windows number `index` (any epoch)."""
    count = len(self.sources[k].windows)
    epoch, offset = np.divmod(index, count)
    if epoch[0] == epoch[-1]:  # (indices increase: one epoch unless the batch crosses one)
      ids = self._permutation(k, int(epoch[0]))[offset]
    else:
      ids = np.empty_like(offset)
      for e in np.unique(epoch):
        ids[epoch == e] = self._permutation(k, int(e))[offset[epoch == e]]
    return self.sources[k].windows.gather(ids)

  def _permutation(self, k: int, epoch: int) -> np.ndarray:
    """Source k's window order in `epoch`: a permutation seeded by (seed, source, epoch), 4
    bytes per window (8 beyond 2**32 windows); the last two are kept."""
    key = (k, epoch)
    if key not in self._permutations:
      count = len(self.sources[k].windows)
      order = np.random.default_rng([self.seed, k, epoch]).permutation(count)
      self._permutations[key] = order.astype(np.uint32 if count <= 2**32 else np.int64)
      while len(self._permutations) > 2 * len(self.sources):
        self._permutations.popitem(last=False)
    return self._permutations[key]

  def get_state(self) -> dict[str, int]:
    return {"batch": self.batch}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Also takes the state a grain iterator saved ({"next_index": batches drawn}), so runs
    checkpointed before this loader resume at the same batch number (in this loader's order)."""
    self.batch = int(state["batch"] if "batch" in state else state["next_index"])

  def tokens_per_source(self, batches: int | None = None) -> dict[str, int]:
    """Training tokens (inputs) each source gave the first `batches` global batches (default:
    those drawn so far)."""
    seq_len = self.sources[0].windows.seq_len
    windows = (self.batch if batches is None else batches) * self.global_batch_size
    counts = ([windows] if len(self.sources) == 1
              else mixture_counts(windows, self.proportions))
    return {s.name: c * seq_len for s, c in zip(self.sources, counts)}

  @property
  def bytes_read(self) -> int:
    return sum(s.windows.bytes_read for s in self.sources)


def eval_batches(sources: Sequence[Source], global_batch_size: int, eos_id: int,
                 num_batches: int, group: int = 0, groups: int = 1) -> list[Batch]:
  """`num_batches` global batches of held-out windows spread evenly over each source's whole
  split (all windows if there are fewer), sources in proportion to their weights, one process
  group's share of each (as the loader's); a short last batch is padded with zero-weight rows.
  Pass windows without overlap (stride = seq_len)."""
  local_size = group_batch_size(global_batch_size, groups)
  lengths = [len(s.windows) for s in sources]
  total = min(sum(lengths), num_batches * global_batch_size)
  shares = ([total] if len(sources) == 1 else
            mixture_counts(total, integer_proportions([s.weight for s in sources])))
  windows = []
  for source, length, share in zip(sources, lengths, shares):
    share = min(share, length)
    # Evenly spaced windows, so a partial evaluation samples every part of the held-out text.
    chosen = np.unique(np.linspace(0, length - 1, share).round().astype(np.int64))
    windows.append(source.windows.gather(chosen) if share else None)
  windows = np.concatenate([w for w in windows if w is not None])
  padding = window_example(windows[0], eos_id)  # weight 0: never enters loss or byte counts
  padding["weights"] = np.zeros_like(padding["weights"])
  batches = []
  for start in range(0, len(windows), global_batch_size):
    rows = window_example(windows[start + group:start + global_batch_size:groups], eos_id)
    missing = local_size - len(rows["inputs"])
    batches.append({k: np.concatenate([v, np.stack([padding[k]] * missing)]) if missing else
                    np.array(v) for k, v in rows.items()})
  return batches


def token_sources(data, split: str, stride: int = 0, verify: bool = True) -> list[Source]:
  """The windows of `split` of each prepared folder of data.tokens / data.mixture (shards
  checked against their manifests first)."""
  from jaxlm import shards  # pylint: disable=import-outside-toplevel
  out = []
  for name, folder, weight, key in shards.token_folders(data):
    manifest = shards.load_manifest(folder, key)
    arrays = shards.open_split(folder, manifest, split, verify, key)
    out.append(Source(name, Windows(arrays, data.seq_len, stride), weight))
  return out
