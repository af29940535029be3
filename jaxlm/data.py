"""Grain pipelines: documents -> token ids -> windows -> shuffled global batches -> this process.

Documents are encoded once per (corpus, tokenizer, split) into one flat token array, with EOS
after every document, cached as `.npy` (memory-mapped; no pickle). A window is `seq_len + 1`
consecutive tokens starting at `index * stride` (the book's sliding window: `stride == seq_len`
gives non-overlapping windows, smaller strides overlap). Inputs are the first `seq_len` tokens,
targets the last `seq_len`. The order of windows is a pure function of (seed, epoch), so the
iterator state is just an index and resuming needs no replay.

A batch is a dict of numpy arrays, each [batch, seq_len]:
  inputs, targets (int32), weights (float32; 0 marks padding), segment_ids (int32; which
  document of the window a token belongs to, from 1), positions (int32; position within that
  document).
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import grain
import numpy as np

from jaxlm.config import Config, DataConfig
from jaxlm.errors import UserError

Batch = dict[str, np.ndarray]


class DataError(UserError):
  """The data cannot feed the model as configured; the message says what to change."""


def token_cache_path(data: DataConfig, corpus_name: str, tokenizer, split: str) -> str:
  """Cache file of a split's tokens: keyed by the corpus and the tokenizer's exact content."""
  tokenizer_hash = hashlib.sha256(tokenizer.serialize()).hexdigest()[:12]
  return os.path.join(data.data_dir, "tokens", f"{corpus_name}-{tokenizer_hash}-{split}.npy")


def encode_documents(documents: Sequence[str], tokenizer, chunk: int = 256) -> np.ndarray:
  """[num_tokens] ids of all documents, each followed by EOS."""
  dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
  pieces = []
  for start in range(0, len(documents), chunk):
    texts = [documents[i] for i in range(start, min(start + chunk, len(documents)))]
    for ids in tokenizer.encode_batch(texts):
      pieces.append(np.asarray(ids, dtype=dtype))
      pieces.append(np.asarray([tokenizer.eos_id], dtype=dtype))
  return np.concatenate(pieces) if pieces else np.zeros([0], dtype)


def load_tokens(data: DataConfig, split: str, tokenizer) -> np.ndarray:
  """The split's flat token array, encoded on first use and memory-mapped afterwards."""
  from jaxlm import corpora  # documents only when the cache is cold

  path = token_cache_path(data, corpora.corpus_id(data), tokenizer, split)
  if not os.path.exists(path):
    tokens = encode_documents(corpora.load_split(data, split), tokenizer)
    check_ids(tokens, tokenizer.vocab_size, f"{split} split of corpus '{data.corpus}'")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      np.save(f, tokens, allow_pickle=False)
    os.replace(tmp, path)  # atomic: a killed run never leaves half a cache
  return np.load(path, mmap_mode="r", allow_pickle=False)


def check_ids(ids: np.ndarray, vocab_size: int, where: str) -> None:
  """An id >= vocab_size would silently read garbage in the embedding lookup: refuse it."""
  if ids.size and int(ids.max()) >= vocab_size:
    raise DataError(f"{where}: token id {int(ids.max())} >= model.vocab_size={vocab_size}; "
                    f"the tokenizer and model.vocab_size disagree.")


def num_windows(num_tokens: int, seq_len: int, stride: int) -> int:
  return max(0, (num_tokens - (seq_len + 1)) // stride + 1)


def check_enough_tokens(tokens: np.ndarray, data: DataConfig, split: str, min_windows: int) -> None:
  have = num_windows(len(tokens), data.seq_len, data.window_stride)
  if have < min_windows:
    raise DataError(
        f"the {split} split of corpus '{data.corpus}' has {len(tokens)} tokens = {have} windows "
        f"of data.seq_len+1={data.seq_len + 1} every {data.window_stride} tokens; at least "
        f"{min_windows} needed: add text or lower data.seq_len.")


class WindowSource:
  """Random-access windows of `seq_len + 1` tokens (grain's data-source protocol)."""

  def __init__(self, tokens: np.ndarray, seq_len: int, stride: int = 0):
    """stride: tokens between window starts (0: seq_len, as data.stride)."""
    self.tokens, self.seq_len, self.stride = tokens, seq_len, stride or seq_len
    self.length = num_windows(len(tokens), seq_len, self.stride)

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < self.length:  # (a short or empty window otherwise)
      raise IndexError(f"window {index} of {self.length}")
    start = index * self.stride
    return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)


def window_example(window: np.ndarray, eos_id: int) -> Batch:
  """[..., seq_len + 1] tokens -> example arrays [..., seq_len] (see module doc): one window,
  or a batch of them at once (the loader's, one numpy call per field for the whole batch).

  A token after an EOS starts a new document: its segment id increases and its position
  restarts at 0, so attention can stay within documents.
  """
  inputs, targets = window[..., :-1], window[..., 1:]
  starts = np.zeros(inputs.shape, bool)                                # [..., seq_len]
  starts[..., 1:] = inputs[..., :-1] == eos_id
  segment_ids = np.cumsum(starts, axis=-1, dtype=np.int32) + 1
  index = np.broadcast_to(np.arange(inputs.shape[-1], dtype=np.int32), inputs.shape)
  start_index = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
  return {"inputs": inputs, "targets": targets, "weights": np.ones(inputs.shape, np.float32),
          "segment_ids": segment_ids, "positions": index - start_index}


def padded_row(inputs: Sequence[int], length: int, pad_id: int) -> Batch:
  """One [length] row: `inputs` right-padded with pad_id, segment_ids 1 on them (0 on padding,
  which real tokens never attend to) and positions 0..length-1."""
  row = {"inputs": np.full(length, pad_id, np.int32), "segment_ids": np.zeros(length, np.int32),
         "positions": np.arange(length, dtype=np.int32)}
  row["inputs"][:len(inputs)] = inputs
  row["segment_ids"][:len(inputs)] = 1
  return row


def lm_row(tokens: Sequence[int], length: int, pad_id: int, scored: int) -> Batch:
  """One [length] row predicting `tokens`: inputs tokens[:-1], targets tokens[1:], weight 1 on
  the last `scored` targets and 0 on the others and on the padding."""
  n = len(tokens) - 1
  row = padded_row(tokens[:-1], length, pad_id)
  row["targets"] = np.full(length, pad_id, np.int32)
  row["targets"][:n] = tokens[1:]
  row["weights"] = np.zeros(length, np.float32)
  row["weights"][n - min(scored, n):n] = 1.0
  return row


def stack_rows(rows: Sequence[Batch], batch_size: int) -> list[Batch]:
  """Rows -> batches of exactly `batch_size` (the last one padded with all-zero rows: weight 0,
  segment id 0), so a step compiles once per row length."""
  batches = []
  for start in range(0, len(rows), batch_size):
    chunk = list(rows[start:start + batch_size])
    filler = {k: np.zeros_like(v) for k, v in rows[0].items()}
    chunk += [filler] * (batch_size - len(chunk))
    batches.append({k: np.stack([r[k] for r in chunk]) for k in rows[0]})
  return batches


def bucketed_length(longest: int, bucket: int, max_length: int) -> int:
  """`longest` rounded up to a multiple of `bucket`, at most `max_length`: few padded lengths,
  so few compiled shapes."""
  return min(-(-longest // bucket) * bucket, max_length)


def round_to_devices(batch_size: int, mesh) -> int:
  """`batch_size` rounded up to a multiple of the data-parallel devices (data x fsdp), so every
  device gets whole rows."""
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  return -(-batch_size // ways) * ways


def group_batch_size(global_batch_size: int, groups: int) -> int:
  if global_batch_size % groups:
    raise DataError(f"train.global_batch_size={global_batch_size} is not divisible by the "
                    f"{groups} groups of processes that read different rows.")
  return global_batch_size // groups


def train_dataset(tokens: np.ndarray, config: Config, eos_id: int,
                  group: int = 0, groups: int = 1) -> grain.MapDataset:
  """Infinite dataset of one process group's share of each global batch
  (`sharding.batch_group`: a group is a process, or the processes holding the same rows).

  Global batch b is the shuffled windows [b*G, (b+1)*G); group g takes every `groups`-th of
  them, so the groups together cover exactly the global batch and each reads only its own
  windows.
  """
  data = config.data
  ds = grain.MapDataset.source(WindowSource(tokens, data.seq_len, data.window_stride))
  ds = ds.shuffle(seed=config.seed).repeat()  # reshuffled (deterministically) every epoch
  ds = ds[group::groups]
  ds = ds.batch(group_batch_size(config.train.global_batch_size, groups), drop_remainder=True)
  return ds.map(lambda windows: window_example(windows, eos_id))  # (per batch: 1.7x faster)


def train_iterator(dataset: grain.MapDataset) -> grain.DatasetIterator:
  """Prefetching iterator whose `get_state()`/`set_state()` go into checkpoints."""
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)))


def eval_batches(tokens: np.ndarray, config: Config, eos_id: int, num_batches: int,
                 group: int = 0, groups: int = 1) -> list[Batch]:
  """`num_batches` global batches of non-overlapping validation windows spread evenly over the
  whole split (all windows if there are fewer), one process group's share (as in
  `train_dataset`); a short last batch is padded with zero-weight rows."""
  data = config.data
  source = WindowSource(tokens, data.seq_len, data.seq_len)
  global_size = config.train.global_batch_size
  local_size = group_batch_size(global_size, groups)
  total = min(len(source), num_batches * global_size)
  # Evenly spaced windows, so a partial evaluation samples every part of the held-out text.
  chosen = np.unique(np.linspace(0, len(source) - 1, total).round().astype(np.int64))
  padding = window_example(source[0], eos_id)  # weight 0: never enters loss or byte counts
  padding["weights"] = np.zeros_like(padding["weights"])
  batches = []
  for start in range(0, total, global_size):
    rows = [window_example(source[int(chosen[i])], eos_id)
            for i in range(start + group, min(start + global_size, total), groups)]
    rows += [padding] * (local_size - len(rows))
    batches.append({k: np.stack([r[k] for r in rows]) for k in padding})
  return batches
