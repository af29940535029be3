"""Input documents: the files a glob names, grouped into shards, read as the text_files corpus
reads them (.jsonl: one document per line in field `input.text_key`; any other file: one
document), and the first per-document record both engines build from them."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, BinaryIO, Callable, Iterator

from jaxlm import textfiles
from jaxlm.curate import dedup, settings
from jaxlm.curate.rules import DocumentRules
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
  content = json.dumps([listing, settings.to_dict(config)], sort_keys=True)
  return hashlib.sha256(content.encode()).hexdigest()[:16]


def documents(file: File, config: CurationConfig, opener: Callable[[str], BinaryIO]
               ) -> Iterator[tuple[dedup.DocKey, str | None, int, str]]:
  """(key, text or None when unreadable, bytes, reason) of each document of one file."""
  rel, path = file
  drop = config.input.on_bad_input == "drop"
  key_flag = "--config.input.text_key"
  try:
    with opener(path) as f:
      content = f.read()
  except OSError as e:
    if not drop:
      raise textfiles.CorpusError(f"{path}: cannot be read ({e.strerror}); fix its permissions or "
                                f"set --config.input.on_bad_input=drop to skip it.") from None
    yield (rel, 0), None, 0, f"unreadable: {e.strerror}"
    return
  if not path.endswith(".jsonl"):
    text = content.decode("utf-8", errors="replace")
    if text.strip():
      yield (rel, 0), text, len(content), ""
    return
  for number, line in enumerate(content.split(b"\n"), start=1):
    if not line.strip():
      continue
    try:
      text = textfiles.parse_jsonl_line(path, number, line, config.input.text_key, key_flag)
    except textfiles.CorpusError as e:
      if not drop:
        raise textfiles.CorpusError(f"{e} (or set --config.input.on_bad_input=drop to count such "
                                  f"lines as dropped)") from None
      yield (rel, number), None, len(line), str(e)
      continue
    if text.strip():
      yield (rel, number), text, len(text.encode("utf-8")), ""


def open_local(path: str) -> BinaryIO:
  return open(path, "rb")


def shard_records(shard: list[File], config: CurationConfig, rules: DocumentRules,
                  signer: dedup.Signer | None, opener: Callable[[str], BinaryIO] = open_local
                  ) -> Iterator[dict[str, Any]]:
  """One record per input document of the shard, in key order: its key, input bytes, the rule
  that dropped it (None if kept so far) and, if kept, its text, exact hash and signature.
  opener: how to open a path for reading (Beam passes its FileSystems, for gs:// etc.)."""
  for file in shard:
    for key, text, size, problem in documents(file, config, opener):
      record: dict[str, Any] = {"key": list(key), "bytes": size, "rule": None, "language": "",
                                "cut": False}
      if text is None:
        record.update(rule="bad_input", snippet=problem[:SNIPPET_CHARS])
        yield record
        continue
      outcome = rules.apply(text)
      record.update(language=outcome.language, cut=outcome.cut)
      if outcome.text is None:
        record.update(rule=outcome.rule, snippet=text[:SNIPPET_CHARS])
      else:
        record.update(text=outcome.text, exact=dedup.exact_hash(outcome.text))
        if signer is not None:
          record["sig"] = dedup.encode_signature(signer(outcome.text))
      yield record
