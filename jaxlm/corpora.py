"""Corpora: where documents come from, as TensorFlow Datasets (array_record, no TensorFlow).

Three corpora, chosen by `data.corpus`:
  pystdlib    the running interpreter's standard library source (`*.py`, tests excluded), the
              default: a real, ~12 MB code corpus that every machine already has;
  text_files  the user's files (`data.files`, comma-separated globs): `.jsonl` holds one document
              per line (field `data.text_key`), any other file is one document;
  tfds        any TFDS text dataset by name (`data.tfds_name`, e.g. `tiny_shakespeare`).

The first two are TFDS `GeneratorBasedBuilder`s written as array_record under
`data.data_dir/tfds` and read back with `builder.as_data_source` (what `tfds.data_source` calls),
so documents are random access (`len`, `docs[i] -> str`): tokenizer training samples them, and
`data.load_tokens` encodes them once into the split's token array.
Both hold out a deterministic share of whole documents as "validation": the sha256 of a
document's identity (its path relative to the corpus' folder, or path:line) decides, never
Python's salted `hash()`.

Preparation is idempotent and crash-safe: TFDS writes into `incomplete.XXXXXX_<version>/` and
renames it into place only when complete, and `file_lock` makes concurrent preparers wait for
the first one instead of racing it.

Known limit: TFDS shuffles each split in memory up to 1 GB and spills to disk through
`tf.io.gfile` beyond that, so text_files corpora over ~1 GB need TensorFlow installed; that is
checked up front (`_check_fits_in_memory`).
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import difflib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import sys
import sysconfig
from typing import Callable, Iterable, Iterator, Sequence

import tensorflow_datasets as tfds

from jaxlm.config import DataConfig
from jaxlm.textfiles import CorpusError, parse_jsonl_line, resolve_globs  # noqa: F401 (API)
from jaxlm.textfiles import unit_hash as _unit_hash

SPLITS = ("train", "validation")
# Directory names never taken from the standard library: installed packages and test suites
# (tests are huge, repetitive and full of deliberately odd code; they would dominate the corpus).
_STDLIB_EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "testing"})
_FILE_FORMAT = "array_record"
_HASH_CHARS = 12


# -- Public API ---------------------------------------------------------------------------------

def load_split(data: DataConfig, split: str) -> Sequence[str]:
  """Documents of one split ("train" or "validation") as a random-access sequence of str.

  Prepares the corpus under `data.data_dir/tfds` on first use (idempotent); later calls only
  open the array_record files. For corpus=tfds, "train"/"validation" mean `data.train_split` /
  `data.validation_split` (any TFDS split expression, e.g. "train[:95%]").
  """
  if split not in SPLITS:
    raise CorpusError(f"split={split!r}: must be one of {', '.join(SPLITS)}.")
  if data.corpus == "tokens":  # (decoded from prepared shards, every folder's in turn)
    from jaxlm import shards  # pylint: disable=import-outside-toplevel
    folders = shards.split_documents(data, split)
    return folders[0] if len(folders) == 1 else [text for docs in folders for text in docs]
  if data.corpus == "tfds":
    return _load_tfds_split(data, split)
  builder = _prepared(_files_builder_factory(data), data)
  return Documents(builder.as_data_source(split=split), "text", f"{builder.name}/{split}")


def corpus_id(data: DataConfig) -> str:
  """Short stable name of the corpus content and its split, for cache keys (tokenizers, tokens).

  Everything that changes which documents land in which split is in it:
    "pystdlib-3.11.7-<hash of the file list>-val0.05"
    "text_files-<hash of paths, sizes, mtimes and text_key>-val0.05"
    "tfds-tiny_shakespeare-1.0.0" (+ "-<text_key>" and "-splits<hash>" when not the defaults)
  """
  if data.corpus == "tfds":
    name = "tfds-" + re.sub(r"[^\w.]+", "-", _tfds_builder(data).info.full_name)
    if data.text_key != "text":
      name += f"-{data.text_key}"
    if (data.train_split, data.validation_split) != ("train", "validation"):
      # Split expressions like "train[:95%]" do not make safe file names: hash them.
      splits = json.dumps([data.train_split, data.validation_split]).encode()
      name += f"-splits{hashlib.sha256(splits).hexdigest()[:8]}"
    return name
  _, content = _local_files(data)
  prefix = f"pystdlib-{platform.python_version()}" if data.corpus == "pystdlib" else "text_files"
  return f"{prefix}-{content}-{_fraction_tag(data.validation_fraction)}"


class Documents(collections.abc.Sequence):
  """One split's documents as str, read on demand from a TFDS array_record data source.

  Supports `len`, `docs[i]`, `docs[a:b]` (a list) and iteration; pass it to
  any random-access reader. (Reads go one record at a time: batched `__getitems__` was no
  faster on this corpus, and TFDS's test mock does not implement it.)
  """

  def __init__(self, source: Sequence[dict], text_key: str, name: str):
    self._source, self._text_key, self._name = source, text_key, name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    # range() counts a negative index from the end and raises IndexError when out of range
    # (which also ends Sequence's iteration).
    return self._text(self._source[range(len(self))[index]])

  def __repr__(self) -> str:
    return f"Documents({self._name}, {len(self)} documents)"

  def _text(self, example: dict) -> str:
    value = example[self._text_key]
    if hasattr(value, "item"):  # a 0-d numpy array of bytes/str
      value = value.item()
    # TFDS Text features come back as bytes from array_record (str from some mocks/decoders).
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[bool]:
  """Holds an exclusive advisory lock on `path` (created if missing) for the block.

  Serializes preparers of the same artifact across processes (and threads with their own
  `open`); yields whether the lock is held. Where `fcntl.flock` is unavailable (Windows, some
  network filesystems) it yields False and does nothing else: every writer still writes to a
  temporary name and renames, so the worst case is duplicated work, never a half-written
  artifact that looks complete.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a+b") as lock_file:
    locked = False
    try:
      import fcntl  # pylint: disable=import-outside-toplevel
      fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
      locked = True
    except (ImportError, OSError) as e:
      logging.warning("could not lock %s (%s); preparing without a lock.", path, e)
    try:
      yield locked
    finally:
      if locked:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


# -- Deterministic held-out split by document identity ------------------------------------------

@dataclasses.dataclass(frozen=True)
class _SplitRule:
  """`is_validation(identity)`: hash < fraction, with one forced member so no split is empty."""
  fraction: float
  force_validation: str | None = None
  force_train: str | None = None

  def is_validation(self, identity: str) -> bool:
    if identity == self.force_validation:
      return True
    if identity == self.force_train:
      return False
    return _unit_hash(identity) < self.fraction


def _split_rule(identities: Iterable[str], fraction: float, corpus: str) -> _SplitRule:
  """Decides the split of every document; raises CorpusError if a split would be empty.

  With few documents the hash may send all of them to one side: then the document whose hash is
  closest to the other side moves over (still deterministic, still whole documents).
  """
  count = validation = 0
  lowest = highest = None  # (hash, identity) of the documents nearest to 0 and to 1
  for identity in identities:
    hashed = (_unit_hash(identity), identity)
    count += 1
    validation += hashed[0] < fraction
    lowest, highest = min(lowest or hashed, hashed), max(highest or hashed, hashed)
  if count == 0:
    raise CorpusError(f"corpus {corpus} has no non-empty documents; point data.files at files "
                      f"with text in them.")
  if count == 1:
    raise CorpusError(f"corpus {corpus} has only 1 non-empty document ({lowest[1]}), but the "
                      f"held-out validation split needs whole documents: add at least one more "
                      f"file (or more .jsonl lines).")
  return _SplitRule(fraction,
                    force_validation=lowest[1] if validation == 0 else None,
                    force_train=highest[1] if validation == count else None)


# -- Reading documents from files ---------------------------------------------------------------

def _read_jsonl(path: str, text_key: str, key_flag: str) -> Iterator[tuple[int, str]]:
  """Yields (line number, text) for each non-blank line of a JSON-lines file."""
  with open(path, "rb") as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        yield number, parse_jsonl_line(path, number, line, text_key, key_flag)


def _iter_documents(files: Sequence[tuple[str, str]], text_key: str,
                    key_flag: str = "--config.data.text_key", strict: bool = False
                    ) -> Iterator[tuple[str, str]]:
  """Yields (identity, text) of every non-blank document in `files` = [(identity, path)];
  key_flag: the option that sets `text_key`, for the error messages. strict: a file that is
  not UTF-8 is a CorpusError (else its undecodable bytes become U+FFFD).

  Whitespace-only documents are skipped: they teach nothing and would make splits look non-empty.
  """
  for identity, path in files:
    if path.endswith(".jsonl"):
      for number, text in _read_jsonl(path, text_key, key_flag):
        if text.strip():
          yield f"{identity}:{number}", text
    else:
      # Bytes -> str ourselves, so "\r\n" survives (no universal-newline translation).
      # Undecodable bytes become U+FFFD rather than failing the corpus on one stray Latin-1 byte.
      with open(path, "rb") as f:
        content = f.read()
      try:
        text = content.decode("utf-8", errors="strict" if strict else "replace")
      except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as "
                          f"UTF-8 (bits per byte count the bytes of the text).") from None
      if text.strip():
        yield identity, text


# -- TFDS builders for local files (pystdlib, text_files) ---------------------------------------

@dataclasses.dataclass(eq=False)
class FilesConfig(tfds.core.BuilderConfig):
  """A concrete file list; its `name` encodes a hash of the content so caches never mix."""
  files: tuple[tuple[str, str], ...] = ()  # (identity, absolute path), sorted
  text_key: str = "text"
  validation_fraction: float = 0.05


class _FilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents from a fixed file list, features {text, path}, splits train/validation."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # No code-relative resources (checksums, metadata). Also TFDS 4.9.10 computes this path with
  # `importlib_resources`, which it only declares for Python < 3.9: unset, preparing would fail.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),  # identity: relative path, or path:line for .jsonl
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config: FilesConfig = self.builder_config
    # A first pass over the documents decides the split (and raises CorpusError on bad input)
    # before TFDS writes anything, so an error never leaves a half-written dataset behind.
    rule = _split_rule((identity for identity, _ in _iter_documents(config.files,
                                                                    config.text_key)),
                       config.validation_fraction, self.name)
    return {split: self._generate_examples(rule, split == "validation") for split in SPLITS}

  def _generate_examples(self, rule: _SplitRule, validation: bool):
    config: FilesConfig = self.builder_config
    for identity, text in _iter_documents(config.files, config.text_key):
      if rule.is_validation(identity) == validation:
        yield identity, {"text": text, "path": identity}


class PyStdlib(_FilesBuilder, skip_registration=True):
  """The running Python's standard library source (*.py), without site-packages and tests."""
  name = "pystdlib"


class TextFiles(_FilesBuilder, skip_registration=True):
  """The user's text files (one document per file) and .jsonl files (one per line)."""
  name = "text_files"


def stdlib_files() -> tuple[str, list[str]]:
  """(stdlib root, sorted relative paths of its *.py files outside excluded directories)."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in _STDLIB_EXCLUDED_DIRS)
    for name in names:
      if name.endswith(".py"):
        files.append(os.path.relpath(os.path.join(directory, name), root).replace(os.sep, "/"))
  if not files:
    raise CorpusError(f"no *.py files under the standard library at {root}; this Python ships "
                      f"without its source: use data.corpus=text_files or tfds.")
  return root, sorted(files)


def _listing_hash(root: str, files: Sequence[str], mtimes: bool) -> str:
  """Hash of (path, size[, mtime]) of every file: changes whenever the content likely does."""
  digest = hashlib.sha256()
  for name in files:
    stat = os.stat(os.path.join(root, name))
    digest.update(json.dumps([name, stat.st_size, stat.st_mtime_ns if mtimes else 0]).encode())
  return digest.hexdigest()[:_HASH_CHARS]


def read_documents(patterns: str, text_key: str = "text", flag: str = "--text_files",
                   key_flag: str = "--text_key") -> list[tuple[str, str]]:
  """[(identity, text)] of the files matched by `patterns`, read directly (no TFDS): the same
  document rules as the `text_files` corpus (.txt/.md a document per file, .jsonl one per line).
  flag, key_flag: the options that gave `patterns` and `text_key`, for the error messages. A
  file that is not UTF-8 is refused (a held-out text scored as altered text would count other
  bytes).
  """
  paths = resolve_globs(patterns, flag)
  return list(_iter_documents([(path, path) for path in paths], text_key, key_flag, strict=True))


def _fraction_tag(fraction: float) -> str:
  return f"val{fraction:.6g}"


def _local_files(data: DataConfig) -> tuple[tuple[tuple[str, str], ...], str]:
  """((identity, absolute path) of every file, hash of their content) of pystdlib/text_files."""
  if data.corpus == "pystdlib":
    root, relpaths = stdlib_files()
    return (tuple((rel, os.path.join(root, rel)) for rel in relpaths),
            _listing_hash(root, relpaths, mtimes=False))
  if data.corpus == "text_files":
    paths = resolve_globs(data.files)
    content = _listing_hash("/", paths, mtimes=True) + "\0" + data.text_key
    # Identities relative to the files' common folder: the same files elsewhere (another
    # machine, another temporary folder) split the same way.
    root = os.path.dirname(paths[0]) if len(paths) == 1 else os.path.commonpath(paths)
    return (tuple((os.path.relpath(path, root), path) for path in paths),
            hashlib.sha256(content.encode()).hexdigest()[:_HASH_CHARS])
  raise CorpusError(f"data.corpus={data.corpus!r}: must be one of pystdlib, text_files, tfds.")


def _files_builder_factory(data: DataConfig) -> Callable[[], tfds.core.DatasetBuilder]:
  """A function that builds the (unprepared or prepared) builder for pystdlib / text_files."""
  files, content = _local_files(data)
  fraction = _fraction_tag(data.validation_fraction)
  cls: type[_FilesBuilder] = PyStdlib if data.corpus == "pystdlib" else TextFiles
  if cls is PyStdlib:
    name = f"py{platform.python_version()}-{content}-{fraction}"
  else:
    _check_fits_in_memory([path for _, path in files], data.validation_fraction)
    name = f"{content}-{fraction}"
  config = FilesConfig(name=name, files=files, text_key=data.text_key,
                       validation_fraction=data.validation_fraction,
                       description=f"{cls.name} corpus, {len(files)} files")

  def make() -> tfds.core.DatasetBuilder:
    with _quiet_custom_config_warning():
      return cls(config=config, data_dir=_tfds_dir(data), file_format=_FILE_FORMAT)
  return make


def _check_fits_in_memory(paths: Sequence[str], validation_fraction: float) -> None:
  """TFDS's shuffler spills splits over MAX_MEM_BUFFER_SIZE to disk with tf.io.gfile."""
  from tensorflow_datasets.core import shuffle  # pylint: disable=import-outside-toplevel
  train_bytes = sum(os.path.getsize(p) for p in paths) * (1.0 - validation_fraction)
  if train_bytes > shuffle.MAX_MEM_BUFFER_SIZE:
    if importlib.util.find_spec("tensorflow") is None:
      raise CorpusError(
          f"data.files: {train_bytes / 2**30:.1f} GB of training text is more than TFDS can "
          f"prepare without TensorFlow ({shuffle.MAX_MEM_BUFFER_SIZE / 2**30:.1f} GB); prepare "
          f"token shards instead (python -m experiments.prepare_data --input=... --output=DIR, "
          f"then --config.data.corpus=tokens --config.data.tokens=DIR: any size, no TensorFlow), "
          f"or install tensorflow-cpu for this one-time preparation.")


@contextlib.contextmanager
def _quiet_custom_config_warning() -> Iterator[None]:
  """Drops TFDS's 'Using custom data configuration' warning: our configs are custom by design."""
  absl_logger = logging.getLogger("absl")
  drop = lambda record: "Using custom data configuration" not in str(record.msg)
  absl_logger.addFilter(drop)
  try:
    yield
  finally:
    absl_logger.removeFilter(drop)


# -- Preparation and TFDS-by-name ---------------------------------------------------------------

def _tfds_dir(data: DataConfig) -> str:
  return os.path.join(os.path.expanduser(data.data_dir), "tfds")


def _prepared(make_builder: Callable[[], tfds.core.DatasetBuilder],
              data: DataConfig) -> tfds.core.DatasetBuilder:
  """Returns a prepared builder, preparing it (once, under a lock) if needed."""
  builder = make_builder()
  if _is_prepared(builder):
    return builder
  lock = os.path.join(_tfds_dir(data), ".locks",
                      f"{builder.name}-{builder.builder_config_name or 'default'}.lock")
  with file_lock(lock) as locked:
    builder = make_builder()  # re-read: another process may have prepared it while we waited
    if _is_prepared(builder):
      return builder
    if locked:
      _remove_abandoned_attempts(builder)
    try:
      # TFDS prints progress to stdout; keep stdout for what scripts output (e.g. generated text).
      with contextlib.redirect_stdout(sys.stderr):
        builder.download_and_prepare(
            file_format=_FILE_FORMAT,
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except OSError:
      # Without a working lock, a concurrent preparer may have renamed its copy into place first.
      builder = make_builder()
      if not _is_prepared(builder):
        raise
  return builder


def _remove_abandoned_attempts(builder: tfds.core.DatasetBuilder) -> None:
  """Deletes `incomplete.*` folders of killed preparers (only the lock holder may prepare)."""
  parent = builder.data_path.parent
  for leftover in parent.glob(f"incomplete.*_{builder.data_path.name}"):
    logging.info("removing %s, left by an interrupted preparation", leftover)
    leftover.rmtree(missing_ok=True)


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  # `is_prepared()` logs a warning for a missing folder; not being prepared yet is normal here.
  return builder.data_path.exists() and builder.is_prepared()


def _tfds_builder(data: DataConfig) -> tfds.core.DatasetBuilder:
  """The builder for `data.tfds_name` ("name", "name:1.0.0", "name/config"); fast, no I/O."""
  name = data.tfds_name.strip()
  if not name:
    raise CorpusError("data.corpus='tfds' needs data.tfds_name, e.g. "
                      "--config.data.tfds_name=tiny_shakespeare.")
  try:
    builder = tfds.builder(name, data_dir=_tfds_dir(data), file_format=_FILE_FORMAT)
  except tfds.core.DatasetNotFoundError:
    base = name.split("/")[0].split(":")[0]
    close = difflib.get_close_matches(
        base, sorted(set(tfds.list_builders(with_community_datasets=False))))
    hint = f"did you mean {', '.join(close)}?" if close else "see `tfds.list_builders()`."
    raise CorpusError(f"unknown TFDS dataset '{name}' (data.tfds_name); {hint}") from None
  except (ValueError, AssertionError) as e:  # unknown config or version
    # TFDS prefixes 'Failed to construct dataset "x", builder_kwargs "{...}": ' to the reason.
    reason = str(e).splitlines()[0].rsplit('": ', 1)[-1].split(" Here are")[0]
    raise CorpusError(f"data.tfds_name={name!r}: {reason} Fix the config or version in "
                      f"data.tfds_name ('name', 'name/config' or 'name:1.2.3').") from None
  features = builder.info.features
  if data.text_key not in features:
    raise CorpusError(f"TFDS dataset '{name}' has no feature '{data.text_key}' (data.text_key); "
                      f"its features are: {', '.join(features.keys())}.")
  return builder


def _load_tfds_split(data: DataConfig, split: str) -> Documents:
  field = "train_split" if split == "train" else "validation_split"
  tfds_split = getattr(data, field)
  try:
    builder = _prepared(lambda: _tfds_builder(data), data)
  except CorpusError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # anything from a failed download
    first_line = (str(e).splitlines() or [""])[0][:200]
    raise CorpusError(
        f"TFDS dataset '{data.tfds_name}' is not prepared in {_tfds_dir(data)} and could not be "
        f"downloaded here ({type(e).__name__}: {first_line}); prepare it on a machine with "
        f"network: `tfds build {data.tfds_name} --data_dir={_tfds_dir(data)} "
        f"--file_format=array_record`, then copy that directory here.") from None
  _check_split_names(builder, tfds_split, field)
  try:
    source = builder.as_data_source(split=tfds_split)
  except NotImplementedError:
    raise CorpusError(
        f"TFDS dataset '{data.tfds_name}' in {_tfds_dir(data)} was prepared without array_record "
        f"(needed for random access); rebuild it with `tfds build ... --file_format=array_record` "
        f"into that data_dir.") from None
  except (ValueError, KeyError) as e:
    raise CorpusError(f"data.{field}={tfds_split!r}: {str(e).splitlines()[0]}") from None
  return Documents(source, data.text_key, f"{builder.info.full_name}/{tfds_split}")


def _check_split_names(builder: tfds.core.DatasetBuilder, tfds_split: str, field: str) -> None:
  """Names the available splits when `tfds_split` (e.g. "train[:95%]+test") uses another one."""
  available = list(builder.info.splits.keys())
  if not available:  # splits unknown (e.g. mocked in tests): let TFDS decide
    return
  for part in tfds_split.split("+"):
    base = part.split("[")[0].strip()
    if base not in available:
      raise CorpusError(
          f"data.{field}={tfds_split!r}: TFDS dataset '{builder.info.full_name}' has no split "
          f"'{base}'; its splits are {', '.join(available)} (slices like 'train[:95%]' work too).")
