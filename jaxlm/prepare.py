"""Token preparation: raw documents -> token shards + manifest (the format of `jaxlm/shards.py`).

  plan     the input files (`sources.list_inputs`), each checked; units of ~`unit_mb` of input
           (`sources.plan_units`); the tokenizer: given, or SentencePiece trained on a bounded
           sample of the train documents (memory and time independent of the corpus size)
  stage 1  per unit (in parallel): its documents -> split by the hash of their identity
           (`textfiles.unit_hash` < validation_fraction: validation) -> tokens, end-of-text
           after each document -> DIR/.work/units/<unit fingerprint>.{split}.npy (+ where
           documents start), then a JSON marker: a unit with a marker is never redone
  stage 2  the layout: each split is its units' tokens in unit order, cut every
           `shard_tokens` tokens
  stage 3  per shard (in parallel): its pieces of the units' arrays -> the shard and its
           document starts, written atomically, then a marker; sha256 and text bytes counted
           on the way
  finish   manifest.json, written atomically and last; DIR/.work removed

Everything a shard holds is a function of the input files, the settings and the tokenizer
(never of the number of workers or of interruptions), so the shards are byte-identical
however they were made: this engine, the Beam one (`jaxlm/prepare_beam.py`), 1 or 64 workers,
in one go or resumed. Memory: a worker holds one unit's documents and tokens (~`unit_mb` of
text); the main process the plan. Nothing grows with the corpus but the plan (a few hundred
bytes per unit).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import random
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from jaxlm import shards, sources, storage
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.errors import UserError
from jaxlm.textfiles import CorpusError, unit_hash

WORK = ".work"
_CHUNK_TOKENS = 1 << 20  # tokens a shard writer handles at a time


class PrepareError(UserError):
  """Preparation cannot proceed as asked; the message names the option or file and the fix."""


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
  """What the shards depend on besides the input files and the tokenizer."""
  text_key: str = "text"                # the text field (.jsonl) or column (.parquet)
  id_key: str = "id"                    # a document's identity where records have it
  validation_fraction: float = 0.005    # of documents, held out by the hash of their identity
  shard_tokens: int = 100_000_000       # tokens per shard (the last of a split: the rest)
  unit_mb: float = 64.0                 # input per unit of work and resume
  vocab_size: int = 4096                # of a tokenizer trained here (no --tokenizer)
  tokenizer_max_sentences: int = 300_000  # training chunks (of whole lines) sampled for it

  def check(self) -> None:
    if not 0.0 < self.validation_fraction < 1.0:
      raise PrepareError(f"--validation_fraction={self.validation_fraction} must be in (0, 1) "
                         f"(e.g. 0.005: one document in 200 held out).")
    if not 1024 <= self.shard_tokens < 2**32:
      raise PrepareError(f"--shard_tokens={self.shard_tokens} must be in [1024, 2**32) (e.g. "
                         f"100000000, nanoGPT's FineWeb shards).")
    if not self.unit_mb >= 0.01:
      raise PrepareError(f"--unit_mb={self.unit_mb} must be at least 0.01 (10 KB; e.g. 64): a "
                         f"unit of work is a file of tokens and a marker.")
    if not isinstance(self.shard_tokens, int) or isinstance(self.shard_tokens, bool):
      raise PrepareError(f"--shard_tokens={self.shard_tokens!r} must be a whole number.")
    if not self.text_key:
      raise PrepareError("--text_key is empty; name the field that holds the text.")

  @property
  def unit_bytes(self) -> int:
    return max(1, int(self.unit_mb * 2**20))


@dataclasses.dataclass
class Plan:
  """Everything stage 1 needs, decided before anything is written."""
  output: str
  inputs: str
  files: list[sources.InputFile]
  units: list[sources.Unit]
  settings: PrepareSettings
  given_tokenizer: str         # --tokenizer ("": one is trained on a sample)
  tokenizer: Any = None        # given, or once trained

  @property
  def work(self) -> str:
    return storage.join(self.output, WORK)

  def fingerprint(self) -> str:
    """Of the inputs, units, settings and the given tokenizer ("trained" otherwise)."""
    given = shards.fingerprint(self.tokenizer) if self.given_tokenizer else "trained"
    return _digest([[u.describe() for u in self.units], dataclasses.asdict(self.settings),
                    given])


def _digest(value: Any, chars: int = 16) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:chars]


# -- Plan -----------------------------------------------------------------------------------------

def make_plan(inputs: str, output: str, tokenizer: str, settings: PrepareSettings) -> Plan:
  """Checks everything that can be checked before writing: settings, every input file (read
  as its kind: parquet footers and columns, compressed headers, first JSON records), the
  tokenizer, the output folder."""
  settings.check()
  inputs = ",".join(map(str, inputs)) if isinstance(inputs, (list, tuple)) else str(inputs)
  output, tokenizer = str(output or ""), str(tokenizer or "")
  if not output:
    raise PrepareError("--output is empty; name the folder for the shards.")
  files = [f for f in sources.list_inputs(inputs) if not _inside(f.path, output)]
  if not files:
    raise PrepareError(f"--input={inputs} names only files inside --output={output}; point it "
                       f"at the raw files.")
  for file in files:
    sources.check_file(file, settings.text_key)
  if storage.exists(output) and not storage.isdir(output):
    raise PrepareError(f"--output={output} is a file; name a folder for the shards.")
  found = set(storage.listdir(output))
  if found and not found & {shards.MANIFEST, WORK}:
    raise PrepareError(f"--output={output} already holds other files "
                       f"({', '.join(sorted(found)[:3])}); choose a new folder for the shards.")
  given = None
  if tokenizer:
    try:
      given = tokenizer_lib.load_tokenizer(tokenizer)
    except tokenizer_lib.TokenizerError as e:
      raise PrepareError(f"--tokenizer: {str(e).replace('data.tokenizer', '--tokenizer')}"
                         ) from None
  units = sources.plan_units(files, settings.unit_bytes, settings.text_key)
  return Plan(output, inputs, files, units, settings, tokenizer, given)


def _inside(path: str, folder: str) -> bool:
  """Whether `path` is in `folder` (a rerun's input glob may match the shards it wrote)."""
  if storage.is_url(path) != storage.is_url(folder):
    return False
  if storage.is_url(path):
    return path.startswith(folder.rstrip("/") + "/")
  return os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) == (
      os.path.abspath(folder))


def finished(plan: Plan) -> dict[str, Any] | None:
  """The manifest of a finished preparation of this plan in the output folder; PrepareError if
  the folder holds shards of another one (they are never overwritten)."""
  path = storage.join(plan.output, shards.MANIFEST)
  if not storage.exists(path):
    return None
  manifest = shards.load_manifest(plan.output, "--output")
  if manifest.get("preparation") != plan.fingerprint():
    raise PrepareError(f"--output={plan.output} holds shards prepared from other "
                       f"{_what_differs(plan, manifest)}; choose a new folder (or delete that "
                       f"one).")
  return manifest


def _what_differs(plan: Plan, manifest: Mapping[str, Any]) -> str:
  """What a finished preparation's manifest and this plan disagree on, in words."""
  recorded = manifest.get("settings", {})
  changed = [f"--{key}={value!r} (it used {recorded[key]!r})"
             for key, value in dataclasses.asdict(plan.settings).items()
             if key in recorded and recorded[key] != value]
  if changed:
    return "settings: " + ", ".join(changed)
  if plan.given_tokenizer and manifest.get("tokenizer") != shards.fingerprint(plan.tokenizer):
    return "settings: another --tokenizer"
  if bool(plan.given_tokenizer) == bool(manifest.get("tokenizer_trained")):
    return "settings: a " + ("given" if plan.given_tokenizer else "trained") + " tokenizer"
  if manifest.get("inputs", {}).get("files") != len(plan.files):
    return (f"inputs: {manifest.get('inputs', {}).get('files')} files then, "
            f"{len(plan.files)} now")
  return ("inputs: the input files changed since (their names, sizes or modification "
          "times)")


def train_tokenizer(plan: Plan, log: Callable[[str], None]) -> None:
  """SentencePiece trained on a bounded, seeded sample of the train documents (whole units in
  a random order until `tokenizer_max_sentences` line chunks), kept in the work folder so a
  resumed preparation encodes with the same one."""
  s = plan.settings
  path = storage.join(plan.work, f"tokenizer-{plan.fingerprint()}.model")
  if storage.exists(path):  # (trained before an interruption)
    plan.tokenizer = tokenizer_lib.from_bytes(storage.read_bytes(path), "tokenizer.model", path)
  else:
    started = time.perf_counter()
    sample = list(sample_documents(plan.units, s))
    log(f"training a SentencePiece tokenizer (vocabulary {s.vocab_size}) on {len(sample):,} "
        f"documents sampled from the train split")
    trained = tokenizer_lib.train_sentencepiece(sample, s.vocab_size, "",
                                                max_sentences=s.tokenizer_max_sentences,
                                                vocab_flag="--vocab_size")
    storage.write_bytes(path, trained.serialize())
    plan.tokenizer = tokenizer_lib.from_bytes(trained.serialize(), "tokenizer.model", path)
    log(f"tokenizer trained in {time.perf_counter() - started:.0f}s")


def sample_documents(units: Sequence[sources.Unit], settings: PrepareSettings, seed: int = 0
                     ) -> Iterator[str]:
  """Train-split documents of units visited in a seeded random order, until their line chunks
  reach `tokenizer_max_sentences` (the trainer samples exactly that many from them)."""
  order = list(range(len(units)))
  random.Random(seed).shuffle(order)
  chunks = 0
  for index in order:
    for document in sources.documents(units[index], settings.text_key, settings.id_key):
      if unit_hash(document.identity) >= settings.validation_fraction:
        yield document.text
        chunks += len(tokenizer_lib.document_chunks(document.text))
        if chunks >= settings.tokenizer_max_sentences:
          return


# -- Stage 1: units -> tokens ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class UnitPlan:
  unit: sources.Unit
  fingerprint: str
  force_validation: str | None = None   # an identity held out whatever its hash (tiny corpora)
  force_train: str | None = None


@dataclasses.dataclass(frozen=True)
class SplitFix:
  """A document moved to the other split (a split would be empty): its identity, the split it
  goes to, and the units that hold it (only they are tokenized again)."""
  identity: str
  to: str
  units: frozenset[str]   # fingerprints of the units as first tokenized


def plan_units(plan: Plan, fix: SplitFix | None = None) -> list[UnitPlan]:
  base = [dataclasses.asdict(plan.settings), shards.fingerprint(plan.tokenizer)]
  unit_plans = []
  for unit in plan.units:
    first = _digest([unit.describe(), base, []])
    if fix is None or first not in fix.units:
      unit_plans.append(UnitPlan(unit, first))
      continue
    forced = ((fix.identity, None) if fix.to == "validation" else (None, fix.identity))
    unit_plans.append(UnitPlan(unit, _digest([unit.describe(), base, list(forced)]), *forced))
  return unit_plans


def unit_path(work: str, fingerprint: str, suffix: str) -> str:
  return storage.join(work, "units", f"{fingerprint}{suffix}")


def tokenize_unit(unit_plan: UnitPlan, settings: PrepareSettings, tokenizer, work: str
                  ) -> dict[str, Any]:
  """Stage 1 for one unit: writes its tokens and document starts per split, then its marker
  (JSON, returned): tokens and documents per split and the documents nearest the split line
  (to move one over when a tiny corpus leaves a split empty)."""
  dtype = shards.token_dtype(tokenizer.vocab_size)
  pieces: dict[str, list[np.ndarray]] = {split: [] for split in shards.SPLITS}
  starts: dict[str, list[int]] = {split: [] for split in shards.SPLITS}
  counts = {split: 0 for split in shards.SPLITS}
  nearest: dict[str, Any] = {"lowest_train": None, "highest_validation": None}
  eos = np.asarray([tokenizer.eos_id], dtype)

  def flush(batch: list[tuple[sources.Document, str]]) -> None:
    encoded = tokenizer.encode_batch([d.text for d, _ in batch], num_threads=1)
    for (document, split), ids in zip(batch, encoded):
      if document.starts:
        starts[split].append(counts[split])
      array = np.asarray(ids, dtype)
      pieces[split].append(array)
      counts[split] += len(array)
      if document.ends:
        pieces[split].append(eos)
        counts[split] += 1

  batch, batch_chars = [], 0
  for document in sources.documents(unit_plan.unit, settings.text_key, settings.id_key):
    split = _split_of(document.identity, settings.validation_fraction, unit_plan)
    hashed = [unit_hash(document.identity), document.identity]
    if split == "train" and (nearest["lowest_train"] is None or hashed < nearest["lowest_train"]):
      nearest["lowest_train"] = hashed
    if split == "validation" and (nearest["highest_validation"] is None
                                  or hashed > nearest["highest_validation"]):
      nearest["highest_validation"] = hashed
    batch.append((document, split))
    batch_chars += len(document.text)
    if batch_chars >= 1 << 20 or len(batch) >= 1024:  # ~1 MB of text per encode call
      flush(batch)
      batch, batch_chars = [], 0
  if batch:
    flush(batch)
  marker: dict[str, Any] = {"fingerprint": unit_plan.fingerprint, "splits": {}, **nearest}
  for split in shards.SPLITS:
    tokens = np.concatenate(pieces[split]) if pieces[split] else np.zeros([0], dtype)
    write_npy(unit_path(work, unit_plan.fingerprint, f".{split}.npy"), tokens)
    write_npy(unit_path(work, unit_plan.fingerprint, f".{split}.starts.npy"),
              np.asarray(starts[split], np.uint32))
    marker["splits"][split] = {"tokens": int(counts[split]), "documents": len(starts[split])}
  storage.write_bytes(unit_path(work, unit_plan.fingerprint, ".json"),
                      (json.dumps(marker) + "\n").encode())
  return marker


def _split_of(identity: str, fraction: float, unit_plan: UnitPlan) -> str:
  if identity == unit_plan.force_validation:
    return "validation"
  if identity == unit_plan.force_train:
    return "train"
  return "validation" if unit_hash(identity) < fraction else "train"


def write_npy(path: str, array: np.ndarray) -> None:
  with storage.open_write(path) as handle:
    np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)


def read_npy(path: str) -> np.ndarray:
  if storage.is_url(path):
    return np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
  return np.load(path, mmap_mode="r", allow_pickle=False)


def read_marker(work: str, fingerprint: str) -> dict[str, Any] | None:
  path = unit_path(work, fingerprint, ".json")
  if not storage.exists(path):
    return None
  try:
    return json.loads(storage.read_bytes(path))
  except ValueError:
    return None  # (a damaged marker: the unit is redone)


def split_fix(unit_plans: Sequence[UnitPlan], markers: Sequence[dict[str, Any]]) -> SplitFix | None:
  """The document to move when a split would be empty (the one whose hash is nearest the other
  side, as the text_files corpus does), or None. PrepareError when there are fewer than 2
  documents."""
  documents = sum(m["splits"][s]["documents"] for m in markers for s in shards.SPLITS)
  if documents < 2:
    raise PrepareError(f"the inputs hold {documents} non-empty document(s); the held-out "
                       f"validation split needs whole documents: add at least one more (a file, "
                       f"a line of a .jsonl, a row of a parquet file).")
  validation = sum(m["splits"]["validation"]["documents"] for m in markers)
  if 0 < validation < documents:
    return None
  key, to, pick = (("lowest_train", "validation", min) if validation == 0
                   else ("highest_validation", "train", max))
  identity = pick(m[key] for m in markers if m[key])[1]
  return SplitFix(identity, to, frozenset(t.fingerprint for t, m in zip(unit_plans, markers)
                                          if m[key] and m[key][1] == identity))


def check_splits(markers: Sequence[dict[str, Any]], settings: PrepareSettings) -> None:
  """PrepareError when a split is still empty after moving a document over: every document
  has the same identity (an --id_key field that is not unique)."""
  counts = {split: sum(m["splits"][split]["documents"] for m in markers)
            for split in shards.SPLITS}
  empty = [split for split, count in counts.items() if not count]
  if empty:
    raise PrepareError(
        f"all {sum(counts.values())} documents have one identity, so they cannot be split "
        f"into train and validation: the --id_key={settings.id_key!r} field holds the same "
        f"value in every record; pass --id_key with a field unique to each document, or "
        f"--id_key='' to identify documents by their file and place.")


# -- Stages 2 and 3: layout and shards ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ShardPlan:
  split: str
  index: int
  pieces: tuple[tuple[str, int, int], ...]   # (unit fingerprint, from, to) in its split array
  tokens: int

  @property
  def name(self) -> str:
    return shards.shard_name(self.split, self.index)

  def fingerprint(self, tokenizer_fingerprint: str) -> str:
    return _digest([self.split, self.index, self.pieces, tokenizer_fingerprint])


def layout(unit_plans: Sequence[UnitPlan], markers: Sequence[dict[str, Any]], shard_tokens: int
           ) -> list[ShardPlan]:
  """Each split as its units' tokens in unit order, cut every `shard_tokens` tokens."""
  out = []
  for split in shards.SPLITS:
    index, current, size = 0, [], 0
    for unit_plan, marker in zip(unit_plans, markers):
      count, at = marker["splits"][split]["tokens"], 0
      while at < count:
        take = min(count - at, shard_tokens - size)
        current.append((unit_plan.fingerprint, at, at + take))
        at, size = at + take, size + take
        if size == shard_tokens:
          out.append(ShardPlan(split, index, tuple(current), size))
          index, current, size = index + 1, [], 0
    if size:
      out.append(ShardPlan(split, index, tuple(current), size))
  return out


def write_shard(shard: ShardPlan, work: str, output: str, dtype: np.dtype,
                byte_lengths: np.ndarray, tokenizer_fingerprint: str) -> dict[str, Any]:
  """Stage 3 for one shard: the shard and its document starts (atomic), then a marker holding
  its manifest entry (returned). An existing marker of the same content is reused."""
  fingerprint = shard.fingerprint(tokenizer_fingerprint)
  marker_path = storage.join(work, "shards", f"{shard.name}.json")
  if storage.exists(marker_path):
    try:
      marker = json.loads(storage.read_bytes(marker_path))
      if marker.get("fingerprint") == fingerprint:
        return marker["entry"]
    except ValueError:
      pass
  digest = hashlib.sha256()
  counts = np.zeros(len(byte_lengths), np.int64)
  starts, at = [], 0
  with storage.open_write(storage.join(output, shard.name)) as handle:
    header = shards.npy_header(dtype, shard.tokens)
    handle.write(header)
    digest.update(header)
    for unit, begin, end in shard.pieces:
      tokens = read_npy(unit_path(work, unit, f".{shard.split}.npy"))
      unit_starts = read_npy(unit_path(work, unit, f".{shard.split}.starts.npy"))
      chosen = unit_starts[(unit_starts >= begin) & (unit_starts < end)]
      starts.append(chosen.astype(np.int64) - begin + at)
      # In chunks: memory stays a few MB whatever the unit and shard sizes (bincount makes
      # an int64 copy of what it counts).
      for low in range(begin, end, _CHUNK_TOKENS):
        chunk = np.ascontiguousarray(tokens[low:min(low + _CHUNK_TOKENS, end)], dtype)
        handle.write(chunk.data)
        digest.update(chunk.data)
        counts += np.bincount(chunk, minlength=len(byte_lengths))[:len(byte_lengths)]
      at += end - begin
      del tokens
  documents = np.concatenate(starts).astype(np.uint32) if starts else np.zeros([0], np.uint32)
  docs_file = shards.docs_name(shard.split, shard.index)
  docs = io.BytesIO()
  np.lib.format.write_array(docs, documents, allow_pickle=False)
  storage.write_bytes(storage.join(output, docs_file), docs.getvalue())
  entry = {"file": shard.name, "docs": docs_file, "split": shard.split, "tokens": shard.tokens,
           "documents": int(len(documents)), "bytes": int(counts @ byte_lengths),
           "sha256": digest.hexdigest(),
           "docs_sha256": hashlib.sha256(docs.getvalue()).hexdigest()}
  storage.write_bytes(marker_path, (json.dumps({"fingerprint": fingerprint, "entry": entry})
                                    + "\n").encode())
  return entry


def write_manifest(plan: Plan, entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """manifest.json, written atomically and last (it marks the folder finished), beside the
  tokenizer; returns it."""
  tokenizer = plan.tokenizer
  tokenizer_file = tokenizer.file_name
  storage.write_bytes(storage.join(plan.output, tokenizer_file), tokenizer.serialize())
  splits = {split: {key: sum(e[key] for e in entries if e["split"] == split)
                    for key in ("tokens", "documents", "bytes")} for split in shards.SPLITS}
  for split in shards.SPLITS:
    splits[split]["shards"] = sum(1 for e in entries if e["split"] == split)
  s = plan.settings
  manifest = {
      "format": shards.FORMAT, "version": shards.VERSION,
      "tokens": sum(e["tokens"] for e in entries),
      "documents": sum(e["documents"] for e in entries),
      "bytes": sum(e["bytes"] for e in entries),
      "tokenizer": shards.fingerprint(tokenizer), "tokenizer_file": tokenizer_file,
      "tokenizer_trained": not plan.given_tokenizer,
      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
      "dtype": shards.token_dtype(tokenizer.vocab_size).name,
      "shard_tokens": s.shard_tokens, "validation_fraction": s.validation_fraction,
      "splits": splits, "shards": list(entries),
      "inputs": {"patterns": plan.inputs, "files": len(plan.files), "units": len(plan.units),
                 "text_key": s.text_key, "id_key": s.id_key},
      "settings": dataclasses.asdict(s),
      "preparation": plan.fingerprint(),
  }
  storage.write_bytes(storage.join(plan.output, shards.MANIFEST),
                      (json.dumps(manifest, indent=2) + "\n").encode())
  return manifest


# -- The local engine -----------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(settings: PrepareSettings, work: str) -> None:
  # One thread per worker for `tokenizers` too (SentencePiece takes num_threads=1 per call):
  # the workers are the parallelism, and tokens/s per core is what is measured.
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  _WORKER.update(settings=settings, work=work, tokenizers={})


def load_tokenizer(source: tuple[str, str]):
  """The tokenizer at `source` = (path, file name): a given one (a file, or GPT-2's folder) or
  one trained into the work folder (local or on an object store)."""
  path, file_name = source
  if storage.is_url(path) or os.path.basename(path).startswith("tokenizer-"):
    return tokenizer_lib.from_bytes(storage.read_bytes(path), file_name, path)
  return tokenizer_lib.load_tokenizer(path)


def _worker_tokenizer(source: tuple[str, str]):
  if source not in _WORKER["tokenizers"]:
    _WORKER["tokenizers"][source] = load_tokenizer(source)
  return _WORKER["tokenizers"][source]


def _check_whole(file: sources.InputFile) -> None:
  sources.check_file(file, _WORKER["settings"].text_key, whole=True)


def _run_unit(arguments: tuple[UnitPlan, tuple[str, str]]) -> dict[str, Any]:
  unit_plan, source = arguments
  return tokenize_unit(unit_plan, _WORKER["settings"], _worker_tokenizer(source), _WORKER["work"])


def _run_shard(arguments: tuple) -> dict[str, Any]:
  return write_shard(*arguments)


def prepare(inputs: str, output: str, tokenizer: str = "",
            settings: PrepareSettings = PrepareSettings(), workers: int = 0,
            log: Callable[[str], None] = print) -> dict[str, Any]:
  """Prepares token shards of `inputs` (comma-separated globs, curate output folders) in
  `output` (see the module docstring) on `workers` processes (0: every core); returns the
  manifest. Rerunning after an interruption resumes; rerunning after the end does nothing.
  Compressed inputs are decompressed to their end (in parallel) before anything is written, so
  a truncated one is refused first. (The workers are spawned processes: a script calling this
  needs the `if __name__ == "__main__":` guard.)"""
  if workers < 0:
    raise PrepareError(f"--workers={workers} must be >= 0 (0: every core).")
  plan = make_plan(inputs, output, tokenizer, settings)
  done = finished(plan)
  if done is not None:
    log(f"{output} already holds these shards ({done['tokens']:,} tokens); nothing to do.")
    return done
  workers = min(workers or os.cpu_count() or 1, max(1, len(plan.units)))
  log(f"{len(plan.files)} input files in {len(plan.units)} units; {workers} workers")
  created = not storage.exists(output)
  try:
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"),  # (no fork of threads)
        initializer=_init_worker, initargs=(settings, plan.work)) as pool:
      list(pool.map(_check_whole, [f for f in plan.files if f.compressed]))
      remove_leftovers(plan)
      if plan.tokenizer is None:
        train_tokenizer(plan, log)
        source = (storage.join(plan.work, f"tokenizer-{plan.fingerprint()}.model"),
                  "tokenizer.model")
      else:
        source = (plan.given_tokenizer, plan.tokenizer.file_name)
      unit_plans, markers = _tokenize(plan, plan_units(plan), pool, source, log)
      try:
        fix = split_fix(unit_plans, markers)
        if fix is not None:
          unit_plans, markers = _tokenize(plan, plan_units(plan, fix), pool, source, log)
          check_splits(markers, settings)
      except PrepareError:  # (the inputs themselves must change: nothing here is reusable)
        storage.remove(output if created else plan.work)
        raise
      shard_plans = layout(unit_plans, markers, settings.shard_tokens)
      dtype = shards.token_dtype(plan.tokenizer.vocab_size)
      byte_lengths = plan.tokenizer.byte_lengths().astype(np.int64)
      fingerprint = shards.fingerprint(plan.tokenizer)
      started = time.perf_counter()
      entries = list(pool.map(_run_shard, [(t, plan.work, output, dtype, byte_lengths,
                                            fingerprint) for t in shard_plans]))
      log(f"{len(entries)} shards written in {time.perf_counter() - started:.1f}s")
  except concurrent.futures.process.BrokenProcessPool:
    raise PrepareError(f"a worker process of prepare_data died (killed, or out of memory: "
                       f"lower --workers or --unit_mb); rerun the same command to resume: the "
                       f"finished units and shards in {output} are kept.") from None
  manifest = write_manifest(plan, entries)
  storage.remove(plan.work)
  return manifest


def remove_leftovers(plan: Plan) -> None:
  """Deletes the temporary files of writes a killed run left half done (their complete
  versions are written again)."""
  for folder in (plan.output, storage.join(plan.work, "units"), storage.join(plan.work,
                                                                             "shards")):
    for name in storage.listdir(folder):
      if ".tmp-" in name:
        storage.remove(storage.join(folder, name))


def _tokenize(plan: Plan, unit_plans: list[UnitPlan], pool, source: tuple[str, str], log
              ) -> tuple[list[UnitPlan], list[dict]]:
  """Stage 1 for the unit_plans without a marker; (unit_plans, markers) in unit order."""
  markers = {t.fingerprint: read_marker(plan.work, t.fingerprint) for t in unit_plans}
  pending = [t for t in unit_plans if markers[t.fingerprint] is None]
  if len(pending) < len(unit_plans):
    log(f"{len(unit_plans) - len(pending)} of {len(unit_plans)} units already tokenized")
  started, tokens = time.perf_counter(), 0
  futures = [pool.submit(_run_unit, (t, source)) for t in pending]
  try:
    for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
      marker = future.result()
      markers[marker["fingerprint"]] = marker
      tokens += sum(s["tokens"] for s in marker["splits"].values())
      seconds = time.perf_counter() - started
      log(f"unit {done}/{len(pending)} tokenized ({tokens / max(seconds, 1e-9):,.0f} tokens/s)")
  except BaseException:
    for future in futures:  # (the queued ones; those running finish and keep their markers)
      future.cancel()
    raise
  return unit_plans, [markers[t.fingerprint] for t in unit_plans]


__all__ = ["CorpusError", "PrepareError", "PrepareSettings", "prepare"]
