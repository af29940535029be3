"""Token shards: the format `experiments.prepare_data` writes and `data.corpus=tokens` trains on.

  DIR/manifest.json                 written last: a folder without it is an unfinished
                                    preparation (rerunning the same command resumes it)
  DIR/tokenizer.model | .json       the tokenizer the shards were encoded with
  DIR/{split}-{i:05d}.npy           [tokens] uint16 (vocabulary <= 65,536) or uint32: the
                                    split's documents, each followed by end-of-text, cut every
                                    `shard_tokens` tokens (a document may continue in the next
                                    shard, as in nanoGPT's and llm.c's FineWeb shards)
  DIR/{split}-{i:05d}.docs.npy      [documents starting in the shard] uint32: where each starts

manifest.json (FORMAT, VERSION):
  tokens, documents, bytes          totals over both splits (bytes: UTF-8 bytes of the text)
  tokenizer                         "sha256:<hex>" of the tokenizer file's content
  tokenizer_file, vocab_size, eos_id, dtype, shard_tokens, validation_fraction
  splits {train, validation}        {tokens, documents, bytes, shards} each
  shards [{file, docs, split, tokens, documents, bytes, sha256, docs_sha256}]
  inputs                            what was prepared (globs, files, text/id fields)

Reading: `open_split` memory-maps each local shard (the page cache reads what the windows
touch) after checking its size and sha256 (threads, ~1 GB/s each); shards on an object store
are read by ranges (`RemoteTokens`), their sizes checked.
"""

from __future__ import annotations

import collections.abc
import concurrent.futures
import hashlib
import io
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from jaxlm import storage
from jaxlm.errors import UserError

FORMAT = "jaxlm-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")


class ShardError(UserError):
  """Token shards that are missing, unfinished, damaged or do not fit the run."""


def shard_name(split: str, index: int) -> str:
  return f"{split}-{index:05d}.npy"


def docs_name(split: str, index: int) -> str:
  return f"{split}-{index:05d}.docs.npy"


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def fingerprint(tokenizer) -> str:
  """The tokenizer's identity in manifests: the sha256 of its file's content."""
  return "sha256:" + hashlib.sha256(tokenizer.serialize()).hexdigest()


def npy_header(dtype: np.dtype, length: int) -> bytes:
  """The .npy header of a [length] array of `dtype` (what np.save writes before the data)."""
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype).newbyteorder("<")),
               "fortran_order": False, "shape": (length,)})
  return buffer.getvalue()


def load_manifest(directory: str, key: str = "data.tokens") -> dict[str, Any]:
  """The manifest of prepared shards in `directory`; ShardError naming `key` (the option that
  gave the folder) and the fix when it is missing, unfinished or not a shard folder."""
  if not storage.isdir(directory) and not storage.isfile(storage.join(directory, MANIFEST)):
    raise ShardError(f"{key}={directory} does not exist; prepare shards there with "
                     f"`python -m experiments.prepare_data --input=... --output={directory}`.")
  path = storage.join(directory, MANIFEST)
  if not storage.exists(path):
    unfinished = storage.exists(storage.join(directory, ".work"))
    raise ShardError(
        f"{key}={directory} has no {MANIFEST}: "
        + ("its preparation did not finish; rerun the same prepare_data command to resume it."
           if unfinished else "not a folder of token shards; prepare one with "
           "`python -m experiments.prepare_data --input=... --output=DIR`."))
  try:
    manifest = json.loads(storage.read_bytes(path))
  except (ValueError, UnicodeDecodeError) as e:
    raise ShardError(f"{path} is not valid JSON ({e}); prepare the shards again.") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ShardError(f"{path} is not a token-shard manifest (format "
                     f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                     f"expected {FORMAT!r}); point {key} at a prepare_data output folder.")
  if manifest.get("version", 0) > VERSION:
    raise ShardError(f"{path} has format version {manifest['version']}, newer than this jaxlm "
                     f"reads ({VERSION}); update jaxlm.")
  return manifest


def load_tokenizer(directory: str, manifest: Mapping[str, Any], key: str = "data.tokens"):
  """The shards' tokenizer (DIR/tokenizer_file), checked against the manifest's fingerprint."""
  from jaxlm import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  path = storage.join(directory, manifest["tokenizer_file"])
  if not storage.exists(path):
    raise ShardError(f"{key}={directory}: its tokenizer {manifest['tokenizer_file']} is missing; "
                     f"copy the whole folder, or prepare the shards again.")
  tokenizer = tokenizer_lib.from_bytes(storage.read_bytes(path), manifest["tokenizer_file"], path)
  if fingerprint(tokenizer) != manifest["tokenizer"]:
    raise ShardError(f"{path} is not the tokenizer the shards were encoded with (its sha256 "
                     f"differs from {MANIFEST}'s); restore it or prepare the shards again.")
  return tokenizer


def split_entries(manifest: Mapping[str, Any], split: str) -> list[dict[str, Any]]:
  return [s for s in manifest["shards"] if s["split"] == split]


def open_split(directory: str, manifest: Mapping[str, Any], split: str, verify: bool = True,
               key: str = "data.tokens") -> list[Any]:
  """The split's token arrays in order: local shards memory-mapped (sizes and, with `verify`,
  sha256 checked first), remote ones as `RemoteTokens` (sizes checked). ShardError naming the
  first shard that is missing or damaged."""
  entries = split_entries(manifest, split)
  dtype = np.dtype(manifest["dtype"])
  paths = [storage.join(directory, e["file"]) for e in entries]
  for entry, path in zip(entries, paths):
    expected = len(npy_header(dtype, entry["tokens"])) + entry["tokens"] * dtype.itemsize
    if not storage.exists(path):
      raise ShardError(f"{key}: shard {path} is missing; copy the whole folder, or prepare the "
                       f"shards again.")
    if storage.getsize(path) != expected:
      raise ShardError(f"{key}: shard {path} has {storage.getsize(path)} bytes, {expected} "
                       f"expected ({MANIFEST}); it is truncated or damaged: prepare the shards "
                       f"again.")
  docs = [(storage.join(directory, e["docs"]), e.get("docs_sha256")) for e in entries]
  for path, _ in docs:
    if not storage.exists(path):
      raise ShardError(f"{key}: {path} (where the shard's documents start) is missing; copy the "
                       f"whole folder, or prepare the shards again.")
  if storage.is_url(directory):
    return [RemoteTokens(path, dtype, e["tokens"]) for e, path in zip(entries, paths)]
  if verify:
    check_sha256(list(zip(paths, [e["sha256"] for e in entries]))
                 + [(path, sha) for path, sha in docs if sha], key)
  return [np.load(path, mmap_mode="r", allow_pickle=False) for path in paths]


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with storage.open_read(path) as f:
    while chunk := f.read(1 << 24):
      digest.update(chunk)
  return digest.hexdigest()


def check_sha256(expected: Sequence[tuple[str, str]], key: str = "data.tokens") -> None:
  """ShardError naming the first file whose sha256 is not the manifest's (hashed in threads:
  hashlib releases the GIL)."""
  workers = min(8, os.cpu_count() or 1, max(1, len(expected)))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    found = list(pool.map(file_sha256, [path for path, _ in expected]))
  for (path, sha256), actual in zip(expected, found):
    if actual != sha256:
      raise ShardError(f"{key}: {'shard ' if not path.endswith('.docs.npy') else ''}{path} is "
                       f"corrupted (its sha256 differs from {MANIFEST}'s); restore it or prepare "
                       f"the shards again.")


class RemoteTokens:
  """A shard on an object store, read by ranges: `windows(starts, length)` fetches every
  window of a batch concurrently (fsspec `cat_ranges`)."""

  def __init__(self, path: str, dtype: np.dtype, length: int):
    self.path, self.dtype, self.length = path, np.dtype(dtype), length
    self.offset = len(npy_header(self.dtype, length))

  def __len__(self) -> int:
    return self.length

  def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
    size = self.dtype.itemsize
    begins = [self.offset + int(s) * size for s in starts]
    chunks = storage.read_ranges(self.path, begins, [b + length * size for b in begins])
    return np.frombuffer(b"".join(chunks), self.dtype).reshape(len(starts), length)


def token_folders(data) -> list[tuple[str, str, float, str]]:
  """(name, folder, weight, config key) of data.tokens (weight 1) or each source of
  data.mixture; names are the folders' base names, made unique."""
  from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
  if data.tokens:
    pairs, key = [(data.tokens, 1.0)], "data.tokens"
  else:
    pairs, key = config_lib.mixture_sources(data.mixture), "data.mixture"
  names: list[str] = []
  for folder, _ in pairs:
    name = storage.basename(folder) or folder
    names.append(name if name not in names else f"{name}_{len(names)}")
  return [(name, folder, weight, key) for name, (folder, weight) in zip(names, pairs)]


def corpus_tokenizer(data):
  """The tokenizer the folders of data.tokens / data.mixture were encoded with: one for all of
  them, and data.tokenizer's if that is set; ShardError naming the folder otherwise."""
  from jaxlm import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  tokenizer, first = None, None
  for _, folder, _, key in token_folders(data):
    manifest = load_manifest(folder, key)
    if tokenizer is None:
      tokenizer, first = load_tokenizer(folder, manifest, key), (folder, manifest["tokenizer"])
    elif manifest["tokenizer"] != first[1]:
      raise ShardError(f"{key}: {folder} was encoded with another tokenizer than {first[0]}; "
                       f"a mixture needs one tokenizer: prepare its folders with the same "
                       f"--tokenizer.")
  if data.tokenizer:
    wanted = tokenizer_lib.load_tokenizer(data.tokenizer)
    if fingerprint(wanted) != first[1]:
      raise ShardError(f"{key}={first[0]} was encoded with another tokenizer than "
                       f"data.tokenizer={data.tokenizer}; prepare the shards with "
                       f"--tokenizer={data.tokenizer}, or leave data.tokenizer empty (the "
                       f"shards' own is used).")
  return tokenizer, storage.join(first[0], load_manifest(first[0], key)["tokenizer_file"])


class Documents(collections.abc.Sequence):
  """A split's documents decoded from its shards on demand (`docs[i] -> str`): what
  `experiments.evaluate --split` scores on a run trained on shards. A document continues across
  a shard boundary where the preparation cut it."""

  def __init__(self, arrays: Sequence[np.ndarray], starts: Sequence[np.ndarray], tokenizer):
    self.arrays, self.tokenizer = list(arrays), tokenizer
    sizes = [len(a) for a in self.arrays]
    self.first = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # of each array
    self.starts = np.concatenate([np.asarray(s, np.int64) + f for s, f in zip(starts, self.first)]
                                 ) if starts else np.zeros([0], np.int64)

  def __len__(self) -> int:
    return len(self.starts)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    index = range(len(self))[index]
    begin = int(self.starts[index])
    end = int(self.starts[index + 1]) if index + 1 < len(self) else int(self.first[-1])
    pieces = []
    for a, array in enumerate(self.arrays):
      low, high = max(begin, self.first[a]), min(end, self.first[a + 1])
      if low < high:
        pieces.append(np.asarray(array[low - self.first[a]:high - self.first[a]]))
    tokens = np.concatenate(pieces) if pieces else np.zeros([0], np.int64)
    if len(tokens) and tokens[-1] == self.tokenizer.eos_id:
      tokens = tokens[:-1]
    return self.tokenizer.decode(tokens)


def split_documents(data, split: str) -> list[Documents]:
  """The documents of `split` of each folder of data.tokens / data.mixture."""
  out = []
  for _, folder, _, key in token_folders(data):
    manifest = load_manifest(folder, key)
    tokenizer = load_tokenizer(folder, manifest, key)
    arrays = open_split(folder, manifest, split, key=key)
    starts = [np.load(storage.join(folder, e["docs"]), allow_pickle=False) if not
              storage.is_url(folder) else
              np.load(io.BytesIO(storage.read_bytes(storage.join(folder, e["docs"]))),
                      allow_pickle=False)
              for e in split_entries(manifest, split)]
    if storage.is_url(folder):  # (decoding reads whole documents: fetch the split's tokens)
      arrays = [np.load(io.BytesIO(storage.read_bytes(storage.join(folder, e["file"]))),
                        allow_pickle=False) for e in split_entries(manifest, split)]
    out.append(Documents(arrays, starts, tokenizer))
  return out
