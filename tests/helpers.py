"""Helpers shared by test modules (no test module imports another): corpora in every input
format prepare_data reads, and reading prepared shards back as documents."""

from __future__ import annotations

import gzip
import json
import os
import sysconfig

import numpy as np

from jaxlm import shards
from jaxlm.textfiles import unit_hash


def stdlib_texts(package: str = "json", limit: int = 0) -> list[str]:
  """Source files of a standard-library package, as text (real, varied documents)."""
  root = os.path.join(sysconfig.get_paths()["stdlib"], package)
  names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
  texts = [open(os.path.join(root, n), encoding="utf-8").read() for n in names]
  return texts[:limit] if limit else texts


def write_corpus(folder) -> dict[str, str]:
  """One corpus in every input kind; returns {identity: text} of its non-blank documents
  (identities as prepare_data names them: an `id` field, else file@offset / file#row / file)."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard

  from jaxlm.curate import report

  folder = str(folder)
  os.makedirs(os.path.join(folder, "raw"), exist_ok=True)
  texts = (stdlib_texts("json") + stdlib_texts("email", 14) + stdlib_texts("http")
           + stdlib_texts("urllib") + stdlib_texts("logging"))
  texts = [t for t in texts if t.strip()]
  assert len(texts) >= 32, len(texts)
  documents: dict[str, str] = {}
  take = iter(texts)

  def jsonl(records) -> tuple[bytes, list[int]]:
    lines = [json.dumps(r).encode() + b"\n" for r in records]
    offsets = list(np.cumsum([0] + [len(line) for line in lines[:-1]]))
    return b"".join(lines), offsets

  # .jsonl: ids on odd records; a blank line and a whitespace-only document are skipped.
  records = [{"text": next(take), **({"id": f"doc-{i}"} if i % 2 else {})} for i in range(8)]
  content, offsets = jsonl(records)
  content += b"\n" + json.dumps({"text": "  \n"}).encode() + b"\n"
  with open(os.path.join(folder, "raw", "a.jsonl"), "wb") as f:
    f.write(content)
  for record, offset in zip(records, offsets):
    documents[record.get("id", f"raw/a.jsonl@{offset}")] = record["text"]
  for name, compress in (("b.jsonl.gz", gzip.compress),
                         ("c.jsonl.zst", zstandard.ZstdCompressor().compress)):
    records = [{"text": next(take)} for _ in range(4)]
    content, offsets = jsonl(records)
    with open(os.path.join(folder, "raw", name), "wb") as f:
      f.write(compress(content))
    for record, offset in zip(records, offsets):
      documents[f"raw/{name}@{offset}"] = record["text"]
  rows = [next(take) for _ in range(6)]
  ids = [f"row-{i}" if i < 3 else None for i in range(6)]
  pq.write_table(pa.table({"text": rows, "id": ids, "n": list(range(6))}),
                 os.path.join(folder, "raw", "d.parquet"), row_group_size=4)
  for i, (text, identity) in enumerate(zip(rows, ids)):
    documents[identity or f"raw/d.parquet#{i}"] = text
  for name in ("e.txt", "f.md"):
    text = next(take)
    with open(os.path.join(folder, "raw", name), "w", encoding="utf-8") as f:
      f.write(text)
    documents[f"raw/{name}"] = text
  with open(os.path.join(folder, "raw", "blank.txt"), "w") as f:
    f.write(" \n\n")
  # A curated corpus (experiments.curate's output layout, written by its own functions).
  curated = os.path.join(folder, "curated")
  os.makedirs(curated, exist_ok=True)
  keys = [(f"crawl/page{i}.txt", 0) for i in range(6)]
  lines = [report.shard_line(key, next(take)) for key in keys]
  name = report.shard_name(0, 1)
  with open(os.path.join(curated, name), "wb") as f:
    f.write(b"".join(lines))
  stats = report.Stats()
  for key, line in zip(keys, lines):
    text = json.loads(line)["text"]
    stats.add({"key": key, "bytes": len(text.encode()), "rule": None, "language": "en",
               "cut": False, "text": text})
  report.write_metadata(curated, curated, stats.to_json({}),
                        [report.content_entry(name, b"".join(lines))], {}, "crawl/*")
  for line in lines:
    record = json.loads(line)
    documents[record["id"]] = record["text"]
  return documents


def shard_documents(directory, split: str) -> list[str]:
  """The split's documents read back from prepared shards: tokens cut at each document start
  (the .docs.npy files), end-of-text dropped, decoded."""
  directory = str(directory)
  manifest = shards.load_manifest(directory)
  tokenizer = shards.load_tokenizer(directory, manifest)
  arrays, starts, at = [], [], 0
  for entry in shards.split_entries(manifest, split):
    tokens = np.load(os.path.join(directory, entry["file"]))
    starts.append(np.load(os.path.join(directory, entry["docs"])).astype(np.int64) + at)
    arrays.append(tokens)
    at += len(tokens)
  if not arrays:
    return []
  tokens, starts = np.concatenate(arrays), np.concatenate(starts)
  out = []
  for begin, end in zip(starts, list(starts[1:]) + [len(tokens)]):
    document = tokens[begin:end]
    assert document[-1] == tokenizer.eos_id and tokenizer.eos_id not in document[:-1]
    out.append(tokenizer.decode(document[:-1]))
  return out


def expected_split(documents: dict[str, str], fraction: float, split: str) -> list[str]:
  held_out = split == "validation"
  return [text for identity, text in documents.items()
          if (unit_hash(identity) < fraction) == held_out]
