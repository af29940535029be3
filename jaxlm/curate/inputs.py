"""Input documents: the files a glob names, grouped into shards, read as the text_files corpus
reads them (.jsonl: one document per line in field `input.text_key`; web archives
(.warc.gz, .warc.wet.gz): one per page, see warc.py; any other file: one document), and the
first per-document record both engines build from them."""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple

from jaxlm import textfiles
from jaxlm.curate import classifier, dedup, extract, settings, urls, warc
from jaxlm.curate.rules import DocumentRules, normalize
from jaxlm.curate.settings import CurationConfig

SNIPPET_CHARS = 300  # of a dropped document, kept for the report's examples

File = tuple[str, str]  # (path relative to the inputs' common folder, absolute path)


def list_files(patterns: str) -> list[File]:
  """The files of the comma-separated globs, sorted, with their relative names (identities
  relative to the common folder, as text_files names documents)."""
  return relative_names(textfiles.resolve_globs(patterns, "--input"))


def relative_names(paths: list[str]) -> list[File]:
  """[(path relative to the paths' common folder, path)] (the document identities)."""
  root = os.path.dirname(paths[0]) if len(paths) == 1 else os.path.commonpath(paths)
  return [(os.path.relpath(path, root), path) for path in paths]


def check_resources(config: CurationConfig) -> None:
  """What the workers will load, loaded once here first, so that a missing extractor, block
  list, classifier or evaluation file fails in one line before any output is written."""
  if config.decontaminate.files:
    textfiles.resolve_globs(config.decontaminate.files, "--config.decontaminate.files")
  extract.check_extractor(config.web.extractor)
  urls.load(config.web.blocklist)
  if config.classifier.model:
    classifier.load(config.classifier.model)


def resources_fingerprint(config: CurationConfig) -> list:
  """(name, size, mtime) of the files the config points at besides the inputs (block list,
  classifier): a retrained classifier must not reuse records a resumed run kept."""
  paths = [config.web.blocklist] if config.web.blocklist else []
  if config.classifier.model:
    paths += [os.path.join(config.classifier.model, name)
              for name in (classifier.MODEL_FILE, classifier.WEIGHTS_FILE)]
  return [(path, os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in paths
          if os.path.exists(path)]


def plan_shards(files: list[File], sizes: list[int], shard_mb: float) -> list[list[File]]:
  """Consecutive runs of `files` (of `sizes` bytes) of about `shard_mb` each: the unit of work
  and of resume. Consecutive, so reading the shards in order reads documents in key order."""
  shards: list[list[File]] = [[]]
  total = 0
  for file, size in zip(files, sizes):
    if shards[-1] and total >= shard_mb * 2**20:
      shards.append([])
      total = 0
    shards[-1].append(file)
    total += size
  return shards


def shard_fingerprint(shard: list[File], config: CurationConfig) -> str:
  """Changes when the shard's files (name, size, mtime) or the config change."""
  stats = [(rel, os.stat(path)) for rel, path in shard]
  listing = [(rel, stat.st_size, stat.st_mtime_ns) for rel, stat in stats]
  content = json.dumps([listing, settings.to_dict(config), resources_fingerprint(config)],
                       sort_keys=True)
  return hashlib.sha256(content.encode()).hexdigest()[:16]


class Document(NamedTuple):
  """One input document, or a record counted instead (skipped, blocked, unreadable)."""
  key: dedup.DocKey
  text: str | None                  # None: not a document to curate (see rule)
  size: int                         # input bytes
  rule: str | None = None           # why it is counted instead: "bad_input", "skipped:status"...
  problem: str = ""                 # what the report shows for it
  meta: dict[str, Any] = {}         # web archives: url, date, content_type (kept in the output)


def _text_file(rel: str, path: str, content: bytes, config: CurationConfig
               ) -> Iterator[Document]:
  text = content.decode("utf-8", errors="replace")
  if text.strip():
    yield Document((rel, 0), text, len(content))


def _jsonl_file(rel: str, path: str, content: bytes, config: CurationConfig
                ) -> Iterator[Document]:
  drop = config.input.on_bad_input == "drop"
  for number, line in enumerate(content.split(b"\n"), start=1):
    if not line.strip():
      continue
    try:
      text = textfiles.parse_jsonl_line(path, number, line, config.input.text_key,
                                        "--config.input.text_key")
    except textfiles.CorpusError as e:
      if not drop:
        raise textfiles.CorpusError(f"{e} (or set --config.input.on_bad_input=drop to count such "
                                    f"lines as dropped)") from None
      yield Document((rel, number), None, len(line), "bad_input", str(e))
      continue
    if text.strip():
      yield Document((rel, number), text, len(text.encode("utf-8")))


def documents(file: File, config: CurationConfig, opener: Callable[[str], BinaryIO],
              rules: DocumentRules) -> Iterator[Document]:
  """The documents of one file: a web archive's records (warc.py), a .jsonl's lines, or the
  whole file. rules: the process's loaded resources (the extractor, the block list)."""
  rel, path = file
  try:
    with opener(path) as f:
      if warc.is_archive(path):  # streamed record by record (archives are large)
        for number, text, size, rule, problem, meta in warc.documents(
            path, f, config, rules.extractor, rules.blocklist):
          yield Document((rel, number), text, size, rule, problem, meta)
        return
      content = f.read()
  except OSError as e:
    if config.input.on_bad_input != "drop":
      raise textfiles.CorpusError(f"{path}: cannot be read ({e.strerror}); fix its permissions or "
                                  f"set --config.input.on_bad_input=drop to skip it.") from None
    yield Document((rel, 0), None, 0, "bad_input", f"unreadable: {e.strerror}")
    return
  reader = _jsonl_file if path.endswith(".jsonl") else _text_file
  yield from reader(rel, path, content, config)


def texts(input_glob: str, config: CurationConfig) -> list[tuple[str, str]]:
  """[(identity, normalized text)] of every document of `input_glob` (web archives: their
  pages' main text): what the quality classifier trains and is measured on."""
  rules = DocumentRules(settings.CurationConfig(input=config.input, web=config.web))
  c = config.normalize
  patterns = [re.compile(p, re.IGNORECASE) for p in c.boilerplate_patterns]
  found = []
  for file in list_files(input_glob):
    for document in documents(file, config, open_local, rules):
      if document.text is not None:
        text = normalize(document.text, c.unicode_form, c.whitespace, patterns,
                         c.boilerplate_max_words) if c.enabled else document.text
        if text.strip():
          found.append((dedup.format_key(document.key), text))
  return found


def open_local(path: str) -> BinaryIO:
  return open(path, "rb")


def shard_records(shard: list[File], config: CurationConfig, rules: DocumentRules,
                  signer: dedup.Signer | None, opener: Callable[[str], BinaryIO] = open_local
                  ) -> Iterator[dict[str, Any]]:
  """One record per input document of the shard, in key order: its key, input bytes, the rule
  that dropped it (None if kept so far) and, if kept, its text, exact hash and signature.
  opener: how to open a path for reading (Beam passes its FileSystems, for gs:// etc.)."""
  for file in shard:
    for document in documents(file, config, opener, rules):
      record: dict[str, Any] = {"key": list(document.key), "bytes": document.size,
                                "rule": None, "language": "", "cut": False}
      if document.meta:
        record["meta"] = document.meta
      if document.text is None:
        record.update(rule=document.rule, snippet=document.problem[:SNIPPET_CHARS])
        yield record
        continue
      text = document.text
      outcome = rules.apply(text)
      record.update(language=outcome.language, cut=outcome.cut)
      if outcome.score is not None:
        record["score"] = outcome.score
      if outcome.pii:
        record["pii"] = outcome.pii
      if outcome.text is None:
        record.update(rule=outcome.rule, snippet=text[:SNIPPET_CHARS])
      else:
        record.update(text=outcome.text, exact=dedup.exact_hash(outcome.text))
        if signer is not None:
          record["sig"] = dedup.encode_signature(signer(outcome.text))
      yield record
