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
SCORE_BINS = 10  # the classifier's score histogram: [0, 0.1), ..., [0.9, 1]
# The order stages run in: the report's funnel lists drops in this order.
STAGES = ("bad_input", "skipped", "blocked", "empty", "language", "contaminated", "quality",
          "classifier", "exact_duplicate", "near_duplicate")
METADATA = ("url", "date", "content_type")  # of web archive records, kept in the output


class Stats:
  """Counts of one curation; `add` one document's fate, `merge` partial counts (Beam combines)."""

  def __init__(self):
    self.documents = self.bytes = self.kept_documents = self.kept_bytes = self.output_bytes = 0
    self.cut = 0
    # Plain dicts (no defaultdict lambdas): Beam serializes the accumulator between workers.
    self.dropped: dict[str, list[int]] = {}
    self.examples: dict[str, list[tuple[dedup.DocKey, str]]] = {}
    self.languages: collections.Counter = collections.Counter()
    # The classifier: scores of the documents it kept / dropped per bin, and the borderline
    # calls (the lowest-scoring kept, the highest-scoring dropped) as (score, key, snippet).
    self.scores = {"kept": [0] * SCORE_BINS, "dropped": [0] * SCORE_BINS}
    self.score_examples: dict[str, list[tuple[float, dedup.DocKey, str]]] = {
        "kept": [], "dropped": []}
    self.pii: collections.Counter = collections.Counter()  # kind -> replacements; "documents"

  def _add_score(self, record: dict[str, Any]) -> None:
    score, kept = record["score"], record["rule"] != "classifier"
    fate = "kept" if kept else "dropped"
    self.scores[fate][min(int(score * SCORE_BINS), SCORE_BINS - 1)] += 1
    snippet = (record.get("text") or record.get("snippet") or "")[:300]
    self._keep_examples(fate, [(score, tuple(record["key"]), snippet)])

  def _keep_examples(self, fate: str, new: list) -> None:
    # kept: the lowest scores first; dropped: the highest (ties: by key): a pure function of
    # the set of documents, so merged partial counts give the same examples.
    order = (lambda e: (e[0], e[1])) if fate == "kept" else (lambda e: (-e[0], e[1]))
    self.score_examples[fate] = sorted(self.score_examples[fate] + new,
                                       key=order)[:EXAMPLES_PER_RULE]

  def add(self, record: dict[str, Any]) -> None:
    """`record`: key, bytes, rule (None: kept), language, cut, text or snippet."""
    self.documents += 1
    self.bytes += record["bytes"]
    self.cut += bool(record["cut"])
    if record["language"]:
      self.languages[record["language"]] += 1
    if record.get("score") is not None:
      self._add_score(record)
    if record.get("pii"):
      self.pii.update(record["pii"])
      self.pii["documents"] += 1
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
    for fate in ("kept", "dropped"):
      self.scores[fate] = [a + b for a, b in zip(self.scores[fate], other.scores[fate])]
      self._keep_examples(fate, [tuple(e) for e in other.score_examples[fate]])
    self.pii.update(other.pii)
    return self

  def to_json(self, clusters: dict[str, dict[str, int]]) -> dict[str, Any]:
    def order(rule: str) -> tuple[int, int, str]:
      stage, _, check = rule.partition(":")
      return (STAGES.index(stage),
              rules.QUALITY_CHECKS.index(check) if stage == "quality" else 0, check)
    result = {
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
    if sum(map(sum, self.scores.values())):
      result["classifier"] = {
          "bins": [round(i / SCORE_BINS, 2) for i in range(SCORE_BINS + 1)],
          "kept": self.scores["kept"], "dropped": self.scores["dropped"],
          "examples": {fate: [{"id": dedup.format_key(key), "score": score, "text": text}
                              for score, key, text in examples]
                       for fate, examples in self.score_examples.items()}}
    if self.pii:
      result["pii"] = dict(sorted(self.pii.items()))
    return result


# -- Output shards ------------------------------------------------------------------------------

def shard_of(key: dedup.DocKey, num_shards: int) -> int:
  digest = hashlib.blake2b(f"{key[0]}\0{key[1]}".encode("utf-8", "surrogatepass"),
                           digest_size=8).digest()
  return int.from_bytes(digest, "big") % num_shards


def shard_name(index: int, num_shards: int) -> str:
  return f"shard-{index:05d}-of-{num_shards:05d}.jsonl"


def shard_line(key: dedup.DocKey, text: str, meta: dict[str, Any] | None = None) -> bytes:
  """One output document: {"text": ..., "id": ...} (what data.corpus=text_files and
  prepare_data read), then a web page's "url", "date" and "content_type"."""
  record = {"text": text, "id": dedup.format_key(key)}
  record.update((name, meta[name]) for name in METADATA if meta and name in meta)
  return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


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
  if "classifier" in stats:
    c = stats["classifier"]
    lines += ["", "## Quality classifier", "", "| score | kept | dropped |", "|---|---:|---:|"]
    lines += [f"| {low:.1f}-{high:.1f} | {kept} | {dropped} |" for low, high, kept, dropped
              in zip(c["bins"], c["bins"][1:], c["kept"], c["dropped"])]
    for fate, title in (("kept", "Kept with the lowest scores"),
                        ("dropped", "Dropped with the highest scores")):
      lines += ["", f"{title}:"]
      lines += [f"- `{e['id']}` ({e['score']:.3f}): {' '.join(e['text'].split())[:200]}"
                for e in c["examples"][fate]]
  if "pii" in stats:
    counts = dict(stats["pii"])
    documents = counts.pop("documents", 0)
    lines += ["", f"Personal data replaced by placeholders in {documents} documents: "
                  + ", ".join(f"{kind} {count}" for kind, count in counts.items()) + "."]
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
