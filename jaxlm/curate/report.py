"""What a curation did, in numbers (stats.json) and for people (report.md), and the output's
shard files and manifest. Shared by both engines, so their outputs are byte-identical."""

from __future__ import annotations

import collections
import hashlib
import json
import os
from typing import Any, Callable

from jaxlm import files
from jaxlm.curate import dedup, rules

EXAMPLES_PER_RULE = 3
# The order stages run in: the report's funnel lists drops in this order.
STAGES = ("bad_input", "empty", "language", "contaminated", "quality", "exact_duplicate",
          "near_duplicate")


class Stats:
  """Counts of one curation; `add` one document's fate, `merge` partial counts (Beam combines)."""

  def __init__(self):
    self.documents = self.bytes = self.kept_documents = self.kept_bytes = self.output_bytes = 0
    self.cut = 0
    # Plain dicts (no defaultdict lambdas): Beam serializes the accumulator between workers.
    self.dropped: dict[str, list[int]] = {}
    self.examples: dict[str, list[tuple[dedup.DocKey, str]]] = {}
    self.languages: collections.Counter = collections.Counter()

  def add(self, record: dict[str, Any]) -> None:
    """`record`: key, bytes, rule (None: kept), language, cut, text or snippet."""
    self.documents += 1
    self.bytes += record["bytes"]
    self.cut += bool(record["cut"])
    if record["language"]:
      self.languages[record["language"]] += 1
    rule = record["rule"]
    if rule is None:
      self.kept_documents += 1
      self.kept_bytes += record["bytes"]
      self.output_bytes += len(record["text"].encode("utf-8"))
      return
    counts = self.dropped.setdefault(rule, [0, 0])
    counts[0] += 1
    counts[1] += record["bytes"]
    snippet = record.get("snippet") or record.get("text", "")[:300]
    self.examples[rule] = sorted(self.examples.get(rule, []) + [(tuple(record["key"]), snippet)]
                                 )[:EXAMPLES_PER_RULE]

  def merge(self, other: "Stats") -> "Stats":
    for name in ("documents", "bytes", "kept_documents", "kept_bytes", "output_bytes", "cut"):
      setattr(self, name, getattr(self, name) + getattr(other, name))
    for rule, (count, size) in other.dropped.items():
      counts = self.dropped.setdefault(rule, [0, 0])
      counts[0] += count
      counts[1] += size
    for rule, examples in other.examples.items():
      self.examples[rule] = sorted(self.examples.get(rule, []) + examples)[:EXAMPLES_PER_RULE]
    self.languages.update(other.languages)
    return self

  def to_json(self, clusters: dict[str, dict[str, int]]) -> dict[str, Any]:
    def order(rule: str) -> tuple[int, int]:
      stage, _, check = rule.partition(":")
      return STAGES.index(stage), rules.QUALITY_CHECKS.index(check) if check else 0
    return {
        "input": {"documents": self.documents, "bytes": self.bytes},
        "kept": {"documents": self.kept_documents, "bytes": self.kept_bytes,
                 "output_bytes": self.output_bytes},
        "dropped": {rule: {"documents": count, "bytes": size}
                    for rule, (count, size) in sorted(self.dropped.items(),
                                                      key=lambda kv: order(kv[0]))},
        "decontaminated_by_cutting": self.cut,
        "languages": dict(sorted(self.languages.items(), key=lambda kv: (-kv[1], kv[0]))),
        "duplicate_clusters": clusters,  # {"exact"|"near": {cluster size: clusters}}
        "examples": {rule: [{"id": dedup.format_key(key), "text": text} for key, text in
                            sorted(self.examples[rule])]
                     for rule in sorted(self.examples, key=order)},
    }


# -- Output shards ------------------------------------------------------------------------------

def shard_of(key: dedup.DocKey, num_shards: int) -> int:
  digest = hashlib.blake2b(f"{key[0]}\0{key[1]}".encode("utf-8", "surrogatepass"),
                           digest_size=8).digest()
  return int.from_bytes(digest, "big") % num_shards


def shard_name(index: int, num_shards: int) -> str:
  return f"shard-{index:05d}-of-{num_shards:05d}.jsonl"


def shard_line(key: dedup.DocKey, text: str) -> bytes:
  """One output document: {"text": ..., "id": ...}; what data.corpus=text_files reads."""
  return (json.dumps({"text": text, "id": dedup.format_key(key)}, ensure_ascii=False)
          + "\n").encode("utf-8")


def shard_entry(name: str, documents: int, size: int, sha256: str) -> dict[str, Any]:
  """The manifest's entry of one shard file (both engines)."""
  return {"file": name, "documents": documents, "bytes": size, "sha256": sha256}


def content_entry(name: str, content: bytes) -> dict[str, Any]:
  """shard_entry of a shard held in memory (one line per document)."""
  return shard_entry(name, content.count(b"\n"), len(content),
                     hashlib.sha256(content).hexdigest())


def _percent(part: int, whole: int) -> str:
  return f"{100.0 * part / whole:.1f}%" if whole else "-"


def render_report(stats: dict[str, Any]) -> str:
  """report.md: the funnel per rule, languages, duplicate clusters, examples of drops."""
  total_docs, total_bytes = stats["input"]["documents"], stats["input"]["bytes"]
  lines = ["# Curation report", "",
           f"Input: {total_docs} documents, {total_bytes} bytes. "
           f"Kept: {stats['kept']['documents']} documents "
           f"({_percent(stats['kept']['documents'], total_docs)}), {stats['kept']['bytes']} "
           f"input bytes ({_percent(stats['kept']['bytes'], total_bytes)}); "
           f"{stats['kept']['output_bytes']} bytes written after normalization.", "",
           "| rule (in the order applied) | documents dropped | % of input | bytes dropped "
           "| % of input | documents left |", "|---|---:|---:|---:|---:|---:|"]
  left = total_docs
  for rule, dropped in stats["dropped"].items():
    left -= dropped["documents"]
    lines.append(f"| {rule} | {dropped['documents']} | {_percent(dropped['documents'], total_docs)}"
                 f" | {dropped['bytes']} | {_percent(dropped['bytes'], total_bytes)} | {left} |")
  if stats["decontaminated_by_cutting"]:
    lines += ["", f"Decontamination cut overlapping spans out of "
                  f"{stats['decontaminated_by_cutting']} kept documents."]
  if stats["languages"]:
    lines += ["", "Languages identified (documents): " + ", ".join(
        f"{code} {count}" for code, count in stats["languages"].items())]
  for kind, histogram in stats["duplicate_clusters"].items():
    lines += ["", f"{kind.capitalize()}-duplicate clusters by size (documents per cluster: "
                  f"clusters): " + (", ".join(f"{size}: {count}"
                                            for size, count in histogram.items()) or "none")]
  lines += ["", "## Examples of dropped documents (the first by id, per rule)"]
  for rule, examples in stats["examples"].items():
    lines += ["", f"### {rule}"]
    for example in examples:
      text = " ".join(example["text"].split())[:200]
      lines.append(f"- `{example['id']}`: {text}")
  return "\n".join(lines) + "\n"


def write_metadata(directory: str, output: str, stats: dict[str, Any],
                   shards: list[dict[str, Any]], config: dict[str, Any], inputs: str,
                   write: Callable[[str, bytes], None] = files.write_bytes) -> None:
  """stats.json, report.md, config.json and, last, manifest.json into `directory` (the staging
  folder that becomes `output`); `write(path, content)` writes a file (Beam: FileSystems)."""
  def write_json(name: str, value: Any) -> None:
    write(os.path.join(directory, name), (json.dumps(value, indent=2) + "\n").encode("utf-8"))
  write_json("stats.json", stats)
  write(os.path.join(directory, "report.md"), render_report(stats).encode("utf-8"))
  write_json("config.json", config)
  write_json("manifest.json", {
      "format": "jsonl", "text_key": "text", "inputs": inputs, "shards": shards,
      "documents": sum(s["documents"] for s in shards),
      "pretrain_with": {"data.corpus": "text_files",
                        "data.files": os.path.join(os.path.abspath(output), "*.jsonl")
                        if "://" not in output else output.rstrip("/") + "/*.jsonl"}})
