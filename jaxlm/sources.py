"""The documents token preparation reads, streamed: which files an `--input` names, how they
are cut into work units, and each unit's documents with their identities.

  .jsonl                      a document per line (field `text_key`); cut into byte ranges at
                              line boundaries, so one file feeds many workers
  .jsonl.gz, .jsonl.zst       the same, compressed: one unit per file (not seekable)
  .parquet                    a document per row (column `text_key`; FineWeb's and the Hugging
                              Face datasets layout); units of whole row groups
  a curate output folder      its shard-*.jsonl files (manifest.json lists them)
  any other file (.txt, .md)  one document; a file larger than a unit is read in pieces cut at
                              line ends (one document still: end-of-text after the last piece)

A document's identity (what decides its split, by `textfiles.unit_hash`) is its `id_key`
field where the record has one (FineWeb's `id`, curate's `id`), else its place: the file's path
relative to the inputs' common folder, plus `@byte offset` of the line (.jsonl) or `#row`
(.parquet). No file is ever read whole into memory, except a compressed one's single line.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import io
import json
import os
import posixpath
import zlib
from typing import Any, BinaryIO, Iterator

from jaxlm import storage
from jaxlm.textfiles import CorpusError

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")
_OTHER_COMPRESSED = (".gz", ".zst", ".bz2", ".xz", ".zip", ".tar")
_TABLES = (".csv", ".tsv")


@dataclasses.dataclass(frozen=True)
class InputFile:
  path: str           # local path or URL
  name: str           # relative to the inputs' common folder: the identity of its documents
  size: int
  mtime_ns: int
  kind: str           # jsonl | parquet | text

  @property
  def compressed(self) -> bool:
    return self.path.endswith((".gz", ".zst"))


@dataclasses.dataclass(frozen=True)
class Unit:
  """A unit of work: a byte range of one file (jsonl, text), row groups [start, end) of one
  parquet file, or several whole small text files."""
  files: tuple[InputFile, ...]
  start: int = 0
  end: int = -1        # -1: to the end

  def describe(self) -> list[Any]:
    """What the unit reads, for fingerprints: files (name, size, mtime) and the range."""
    return [[f.name, f.size, f.mtime_ns] for f in self.files] + [self.start, self.end]


def kind_of(path: str) -> str:
  """jsonl (also .json: JSON lines, as Hugging Face datasets write them), parquet, or text; a
  table or another compressed file is refused."""
  if path.endswith(_JSONL_SUFFIXES):
    return "jsonl"
  if path.endswith(".parquet"):
    return "parquet"
  if path.endswith(_OTHER_COMPRESSED):
    raise CorpusError(f"--input file {path}: compressed files are read as .jsonl.gz or "
                      f".jsonl.zst only; decompress it or convert it to JSON lines.")
  if path.lower().endswith(_TABLES):
    raise CorpusError(f"--input file {path}: a table; prepare_data reads JSON lines, parquet "
                      f"and text files: convert it to parquet or JSON lines (a record per "
                      f"document with a text field).")
  return "text"


def list_inputs(patterns: str, flag: str = "--input") -> list[InputFile]:
  """The files of comma-separated globs and curate output folders, sorted, with relative
  names; CorpusError naming the glob or folder when nothing usable is found."""
  paths: set[str] = set()
  globs = [p.strip() for p in patterns.split(",") if p.strip()]
  if not globs:
    raise CorpusError(f"{flag} is empty; pass files, e.g. {flag}='/data/*.jsonl' (quote it so "
                      f"the shell does not expand it; comma-separate several globs).")
  for pattern in globs:
    if storage.isdir(pattern):
      paths.update(_curated_files(pattern, flag))
      continue
    matches = storage.glob(pattern)
    if not matches:
      raise CorpusError(f"{flag} glob '{pattern}' matched no files; check the path, and quote "
                        f"the glob ({flag}='{pattern}') so the shell passes it unexpanded.")
    paths.update(m if storage.is_url(m) else os.path.abspath(m) for m in matches)
  ordered = sorted(paths)
  names = _relative_names(ordered)
  return [InputFile(path, name, storage.getsize(path), storage.mtime_ns(path), kind_of(path))
          for path, name in zip(ordered, names)]


def _curated_files(directory: str, flag: str) -> list[str]:
  manifest_path = storage.join(directory, "manifest.json")
  manifest = None
  if storage.exists(manifest_path):
    try:
      manifest = json.loads(storage.read_bytes(manifest_path))
    except ValueError:
      pass
  if not (isinstance(manifest, dict) and manifest.get("format") == "jsonl"
          and isinstance(manifest.get("shards"), list)):
    raise CorpusError(f"{flag}='{directory}' is a directory but not a curated corpus (no "
                      f"experiments.curate manifest.json); name its files with a glob, e.g. "
                      f"{flag}='{storage.join(directory, '**', '*.jsonl')}'.")
  files = [storage.join(directory, shard["file"]) for shard in manifest["shards"]]
  missing = [f for f in files if not storage.exists(f)]
  if missing:
    raise CorpusError(f"{flag}='{directory}': curated shard {missing[0]} listed in its "
                      f"manifest.json is missing; copy the whole folder.")
  return [f if storage.is_url(f) else os.path.abspath(f) for f in files]


def _relative_names(paths: list[str]) -> list[str]:
  """Paths relative to their common folder (the same files elsewhere split the same way)."""
  if storage.is_url(paths[0]):
    root = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(paths)
    return [posixpath.relpath(p, root) for p in paths]
  root = os.path.dirname(paths[0]) if len(paths) == 1 else os.path.commonpath(paths)
  return [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]


# -- Checks before any work ---------------------------------------------------------------------

def check_file(file: InputFile, text_key: str, whole: bool = False) -> None:
  """CorpusError naming the file and the fix when it cannot be read as its kind: a parquet file
  without a readable footer (a truncated one) or without the text column; a .jsonl file whose
  first or last record is not JSON or lacks the text field (a truncated file ends in half a
  record); a compressed file with a damaged header, or (`whole`: decompressed to the end) a
  truncated or corrupted stream. Damage in the middle of a plain .jsonl file is found when it
  is read, and named then."""
  try:
    if file.kind == "parquet":
      _parquet_text_column(file, text_key)
    elif file.kind == "jsonl":
      with _open_lines(file) as lines:
        for offset, line in lines:
          if line.strip():
            parse_record(file, offset, line, text_key)
            break
      if whole and file.compressed:
        with _open_lines(file) as lines:
          for _ in lines:  # (gzip checks its CRC and length at the end; zstd its frames)
            pass
      elif not file.compressed and file.size:
        offset, line = _last_line(file)
        if line.strip():
          parse_record(file, offset, line, text_key)
    else:
      with storage.open_read(file.path) as f:
        _check_text(file, f.read(1 << 20), final=file.size <= 1 << 20)
  except CorpusError:
    raise
  except (OSError, EOFError, ValueError, zlib.error) as e:
    raise CorpusError(f"--input file {file.path} cannot be read ({_reason(e)}); replace or "
                      f"remove it.") from None


def _check_text(file: InputFile, head: bytes, final: bool) -> None:
  """CorpusError for a text file that is binary (NUL bytes) or not UTF-8 in `head`."""
  if b"\0" in head[:8192]:
    raise CorpusError(f"--input file {file.path} is binary (it holds NUL bytes), not text; "
                      f"narrow the glob to text files.")
  try:
    head.decode("utf-8") if final else codecs.getincrementaldecoder("utf-8")().decode(head)
  except UnicodeDecodeError as e:
    raise CorpusError(f"--input file {file.path} is not UTF-8 text ({e.reason} at byte "
                      f"{e.start}); save it as UTF-8, or remove it.") from None


def _decode(file: InputFile, content: bytes, offset: int) -> str:
  """UTF-8 text of (a piece of) a text file, a leading byte-order mark dropped; CorpusError
  naming the file and byte otherwise."""
  try:
    return content.decode("utf-8-sig" if offset == 0 else "utf-8")
  except UnicodeDecodeError as e:
    raise CorpusError(f"--input file {file.path} is not UTF-8 text ({e.reason} at byte "
                      f"{offset + e.start}); save it as UTF-8, or remove it.") from None


def _last_line(file: InputFile) -> tuple[int, bytes]:
  """(offset, text) of a plain file's last non-empty line, read from its end."""
  with storage.open_read(file.path) as f:
    tail_start = max(0, file.size - (1 << 20))
    f.seek(tail_start)
    tail = f.read().rstrip(b"\n")
  cut = tail.rfind(b"\n")
  if cut < 0 and tail_start > 0:  # (a last line over 1 MB: read as it comes)
    return -1, b""
  return tail_start + cut + 1, tail[cut + 1:]


def _reason(e: BaseException) -> str:
  return (str(e).splitlines() or [type(e).__name__])[0][:200] or type(e).__name__


def _parquet_text_column(file: InputFile, text_key: str) -> Any:
  """The parquet file's metadata, after checking that `text_key` is a string column."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  with storage.open_read(file.path) as f:
    try:
      parquet = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
      raise CorpusError(f"--input file {file.path} is not a readable parquet file ({_reason(e)});"
                        f" it may be truncated: download it again.") from None
    schema = parquet.schema_arrow
    if text_key not in schema.names:
      raise CorpusError(f"--input file {file.path} has no column '{text_key}' (columns: "
                        f"{', '.join(schema.names)}); set --text_key to the text column.")
    kind = schema.field(text_key).type
    if pa.types.is_dictionary(kind):  # (pandas categoricals)
      kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)):
      raise CorpusError(f"--input file {file.path}: column '{text_key}' holds {kind}, not text; "
                        f"set --text_key to the text column.")
    metadata = parquet.metadata
    column = schema.names.index(text_key)
    nulls = [metadata.row_group(g).column(column).statistics for g in
             range(metadata.num_row_groups)]
    if metadata.num_rows and all(st is not None and st.has_null_count for st in nulls) and sum(
        st.null_count for st in nulls) == metadata.num_rows:
      raise CorpusError(f"--input file {file.path}: column '{text_key}' holds no text (every "
                        f"value is null); set --text_key to the text column, or remove the file.")
    return metadata


# -- Units ---------------------------------------------------------------------------------------

def plan_units(files: list[InputFile], unit_bytes: int, text_key: str) -> list[Unit]:
  """Units of about `unit_bytes` of input in file order: the unit of work, of parallelism and of
  resume. Depends only on the files and `unit_bytes`, never on the number of workers."""
  units: list[Unit] = []
  small: list[InputFile] = []  # consecutive small text files, gathered into one unit
  small_bytes = 0
  for file in files:
    if file.kind == "text" and file.size <= unit_bytes:
      if small and small_bytes + file.size > unit_bytes:
        units.append(Unit(tuple(small)))
        small, small_bytes = [], 0
      small.append(file)
      small_bytes += file.size
      continue
    if small:
      units.append(Unit(tuple(small)))
      small, small_bytes = [], 0
    if file.kind == "parquet":
      metadata = _parquet_text_column(file, text_key)
      first, size = 0, 0
      for group in range(metadata.num_row_groups):
        size += metadata.row_group(group).total_byte_size
        if size >= unit_bytes:
          units.append(Unit((file,), first, group + 1))
          first, size = group + 1, 0
      if first < metadata.num_row_groups:
        units.append(Unit((file,), first, metadata.num_row_groups))
    elif file.compressed:
      units.append(Unit((file,)))
    else:  # byte ranges of a .jsonl or a large text file
      for start in range(0, max(file.size, 1), unit_bytes):
        units.append(Unit((file,), start, min(start + unit_bytes, file.size)))
  if small:
    units.append(Unit(tuple(small)))
  return units


# -- Documents -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Document:
  identity: str
  text: str
  starts: bool = True   # the document's first piece (a large text file is read in pieces)
  ends: bool = True     # its last piece: end-of-text follows


def documents(unit: Unit, text_key: str, id_key: str) -> Iterator[Document]:
  """The unit's non-blank documents in file order; CorpusError naming the file (and line or
  row) when one cannot be read."""
  for file in unit.files:
    try:
      if file.kind == "parquet":
        yield from _parquet_documents(file, unit, text_key, id_key)
      elif file.kind == "jsonl":
        yield from _jsonl_documents(file, unit, text_key, id_key)
      else:
        yield from _text_documents(file, unit)
    except CorpusError:
      raise
    except (OSError, EOFError, ValueError, zlib.error) as e:
      raise CorpusError(f"--input file {file.path} cannot be read ({_reason(e)}); it may be "
                        f"truncated or damaged: replace or remove it.") from None


def parse_record(file: InputFile, offset: int, line: bytes, text_key: str,
                 id_key: str = "") -> tuple[str, Any]:
  """(text, id or None) of one JSON line."""
  where = f"{file.path} (byte {offset})" if not file.compressed else f"{file.path}"
  try:
    record = json.loads(line)
  except ValueError as e:
    array = " (a JSON array: write one record per line, e.g. jq -c '.[]' FILE)" if (
        line.lstrip().startswith(b"[")) else ""
    raise CorpusError(f"{where}: a line is not JSON ({_reason(e)}); each line of a .jsonl file "
                      f"must be one JSON object{array}.") from None
  if not isinstance(record, dict) or text_key not in record:
    fields = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
    raise CorpusError(f"{where}: a record has no field '{text_key}' (found: {fields}); set "
                      f"--text_key to the field that holds the text.")
  text = record[text_key]
  if text is not None and not isinstance(text, str):
    raise CorpusError(f"{where}: field '{text_key}' is a {type(text).__name__}, not a string; "
                      f"set --text_key to a text field.")
  return text or "", record.get(id_key) if id_key else None


def _identity(value: Any, place: str) -> str:
  """A record's identity: its id field when that is a non-empty string or a number, else its
  place in its file."""
  if isinstance(value, bool) or not isinstance(value, (str, int, float)) or value == "":
    return place
  return str(value)


class _Lines:
  """(byte offset, line) of a file's lines, decompressing .gz / .zst on the fly."""

  def __init__(self, file: InputFile, start: int = 0):
    self.file, self.start = file, start

  def __enter__(self) -> Iterator[tuple[int, bytes]]:
    self.raw = storage.open_read(self.file.path)
    stream: BinaryIO = self.raw
    if self.file.path.endswith(".gz"):
      stream = gzip.GzipFile(fileobj=self.raw)
    elif self.file.path.endswith(".zst"):
      stream = io.BufferedReader(_ZstdStream(self.raw), buffer_size=1 << 20)
    elif self.start:
      self.raw.seek(self.start - 1)  # the line that holds byte start-1 belongs to the unit before
      self.start += len(self.raw.readline()) - 1
    self.stream = stream
    return self._lines()

  def _lines(self) -> Iterator[tuple[int, bytes]]:
    offset = self.start
    for line in self.stream:
      yield offset, line
      offset += len(line)

  def __exit__(self, *exc) -> None:
    self.raw.close()


class _ZstdStream(io.RawIOBase):
  """The decompressed bytes of a .zst file (any number of frames), raising EOFError where the
  file ends inside a frame: zstandard's own stream_reader ends there silently, which would
  take a truncated file for a shorter one."""

  def __init__(self, raw: BinaryIO):
    import zstandard  # pylint: disable=import-outside-toplevel
    self._zstandard, self._raw, self._pending = zstandard, raw, b""
    self._decompressor = zstandard.ZstdDecompressor().decompressobj()
    self._ended = False

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    while not self._pending and not self._ended:
      chunk = self._raw.read(1 << 20)
      if not chunk:
        self._ended = True
        if not self._decompressor.eof:
          raise EOFError("the zstd stream ends inside a frame (a truncated file)")
        break
      try:
        if self._decompressor.eof:  # (a frame ended with the last chunk: the next one starts)
          self._decompressor = self._zstandard.ZstdDecompressor().decompressobj()
        self._pending = self._decompressor.decompress(chunk)
        while self._decompressor.eof and self._decompressor.unused_data:  # the next frame
          rest = self._decompressor.unused_data
          self._decompressor = self._zstandard.ZstdDecompressor().decompressobj()
          self._pending += self._decompressor.decompress(rest)
      except self._zstandard.ZstdError as e:
        raise ValueError(f"corrupted zstd data ({e})") from None
    count = min(len(buffer), len(self._pending))
    buffer[:count] = self._pending[:count]
    self._pending = self._pending[count:]
    return count


def _open_lines(file: InputFile, start: int = 0) -> _Lines:
  return _Lines(file, start)


def _jsonl_documents(file: InputFile, unit: Unit, text_key: str, id_key: str
                     ) -> Iterator[Document]:
  end = unit.end if unit.end >= 0 and not file.compressed else float("inf")
  with _open_lines(file, 0 if file.compressed else unit.start) as lines:
    for offset, line in lines:
      if offset >= end:
        break
      if not line.strip():
        continue
      text, identity = parse_record(file, offset, line, text_key, id_key)
      if text.strip():
        yield Document(_identity(identity, f"{file.name}@{offset}"), text)


def _text_documents(file: InputFile, unit: Unit) -> Iterator[Document]:
  if len(unit.files) > 1 or unit.end < 0 or (unit.start == 0 and unit.end >= file.size):
    with storage.open_read(file.path) as f:  # a whole (small) file: one document
      content = f.read()
    _check_text(file, content, final=True)
    text = _decode(file, content, 0)
    if text.strip():
      yield Document(file.name, text)
    return
  # A piece of a large file, cut at line ends like a .jsonl range. The document starts with
  # the first piece and ends (end-of-text) with the last, whatever is blank in between.
  with storage.open_read(file.path) as f:
    start = unit.start
    if start:
      f.seek(start - 1)
      start += len(f.readline()) - 1
    end = unit.end
    if end < file.size:
      f.seek(end - 1)
      end += len(f.readline()) - 1
    f.seek(start)
    text = _decode(file, f.read(max(0, end - start)), start)  # (cut at line ends: whole chars)
  yield Document(file.name, text, starts=unit.start == 0, ends=unit.end >= file.size)


def _parquet_documents(file: InputFile, unit: Unit, text_key: str, id_key: str
                       ) -> Iterator[Document]:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  with storage.open_read(file.path) as f:
    parquet = pq.ParquetFile(f)
    columns = [text_key] + ([id_key] if id_key and id_key in parquet.schema_arrow.names
                            and id_key != text_key else [])
    row = sum(parquet.metadata.row_group(g).num_rows for g in range(unit.start))
    groups = list(range(unit.start, unit.end))
    for batch in parquet.iter_batches(batch_size=1024, row_groups=groups, columns=columns):
      texts = batch.column(0).to_pylist()
      ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
      for text, identity in zip(texts, ids):
        if text and text.strip():
          yield Document(_identity(identity, f"{file.name}#{row}"), text)
        row += 1
