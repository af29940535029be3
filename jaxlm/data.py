"""Token arrays and rows: a corpus' documents -> one token array per split (cached), windows
-> example rows, and the row helpers fine-tuning and tasks share.

Documents of the embedded/text_files/tfds corpora are encoded once per (corpus, tokenizer,
split) into one flat token array, with EOS after every document, cached as `.npy`
(memory-mapped; no pickle); prepared token shards (`data.corpus=tokens`, jaxlm/shards.py) are
such arrays already. A window is `seq_len + 1` consecutive tokens starting at `index * stride`
(the book's sliding window: `stride == seq_len` gives non-overlapping windows, smaller strides
overlap); inputs are its first `seq_len` tokens, targets its last `seq_len`. Which windows make
each batch is the loader's business (jaxlm/loader.py).

A batch is a dict of numpy arrays, each [batch, seq_len]:
  inputs, targets (int32), weights (float32; 0 marks padding), segment_ids (int32; which
  document of the window a token belongs to, from 1), positions (int32; position within that
  document).
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Sequence

import numpy as np

from jaxlm.config import DataConfig
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


@functools.lru_cache(maxsize=16)
def _single_document(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(weights, segment_ids, positions) of windows of `shape` without a document boundary:
  built once per shape and read-only (shared by every such batch)."""
  arrays = (np.ones(shape, np.float32), np.ones(shape, np.int32),
            np.broadcast_to(np.arange(shape[-1], dtype=np.int32), shape).copy())
  for array in arrays:
    array.flags.writeable = False
  return arrays


def window_example(window: np.ndarray, eos_id: int) -> Batch:
  """[..., seq_len + 1] tokens -> example arrays [..., seq_len] (see module doc): one window,
  or a batch of them at once (the loader's, a few numpy calls for the whole batch).

  A token after an EOS starts a new document: its segment id increases and its position
  restarts at 0, so attention can stay within documents. Computed from the documents' first
  positions (few) rather than by cumulative sums over every token (numpy's accumulations run
  at ~3 ns a token: 3x slower at 16 x 1024 tokens).
  """
  tokens = np.asarray(window).astype(np.int32)
  inputs, targets = tokens[..., :-1], tokens[..., 1:]
  shape, length = inputs.shape, inputs.shape[-1]
  weights, single, index = _single_document(shape)
  ends = np.flatnonzero(inputs == eos_id)           # flat positions of EOS inputs
  ends = ends[ends % length != length - 1]          # (an EOS last in its row starts nothing)
  if not len(ends):
    return {"inputs": inputs, "targets": targets, "weights": weights, "segment_ids": single,
            "positions": index}
  size = inputs.size
  row_starts = np.arange(0, size, length)
  starts = np.sort(np.concatenate([row_starts, ends + 1]))  # [documents] first flat positions
  lengths = np.diff(np.append(starts, size))
  positions = np.arange(size, dtype=np.int32) - np.repeat(starts, lengths).astype(np.int32)
  first_in_row = np.searchsorted(starts, row_starts)        # [rows] its first document
  segment = (np.arange(len(starts)) - first_in_row[starts // length] + 1).astype(np.int32)
  return {"inputs": inputs, "targets": targets, "weights": weights,
          "segment_ids": np.repeat(segment, lengths).reshape(shape),
          "positions": positions.reshape(shape)}


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
