"""Benchmark mode: each curation stage's throughput on the user's input, in one process.

Every stage is timed alone over the same documents (the raw text for reading and
normalization, the normalized text for the rest), `repeats` times; the median is reported as
MB/s of input text per core (what one worker of the pool sustains; the local engine runs one
worker per core). Web archives add the extraction alone, over the decoded HTML pages, and
pages/s for it and for reading (records, decoding and extraction). The de-duplication stage is
the in-memory band grouping and clustering over all signatures (one process in the local
engine).
"""

from __future__ import annotations

import os
import re
import statistics
import time
from typing import Any, Callable

from jaxlm.curate import dedup, inputs, pii, rules
from jaxlm.curate.settings import CurationConfig


def _median_seconds(run: Callable[[], Any], repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(input_glob: str, config: CurationConfig, repeats: int = 3) -> list[dict[str, Any]]:
  """[{stage, seconds, mb_per_s}] for each enabled stage, over the documents of `input_glob`."""
  files = inputs.list_files(input_glob)
  document_rules = rules.DocumentRules(config)
  extractor, pages = document_rules.extractor, []

  def keep_page(html: str) -> str:  # what the extractor gets: the decoded HTML pages
    pages.append(html)
    return extractor(html)
  document_rules.extractor = keep_page
  raw = [d.text for file in files
         for d in inputs.documents(file, config, inputs.open_local, document_rules)
         if d.text is not None]
  document_rules.extractor = extractor
  megabytes = sum(len(t.encode("utf-8")) for t in raw) / 1e6
  boilerplate = [re.compile(p, re.IGNORECASE) for p in config.normalize.boilerplate_patterns]
  n = config.normalize

  def normalize_all():
    return [rules.normalize(t, n.unicode_form, n.whitespace, boilerplate, n.boilerplate_max_words)
            for t in raw]
  texts = normalize_all()
  stages: list[tuple[str, Callable[[], Any]]] = [
      ("read", lambda: [list(inputs.documents(f, config, inputs.open_local, document_rules))
                        for f in files]),
      ("normalize", normalize_all)]
  if pages:  # web archives: the extraction alone, on the decoded pages (in pages/s too)
    stages.insert(1, (f"extract ({config.web.extractor})",
                      lambda: [extractor(html) for html in pages]))
  if config.language.enabled:
    stages.append(("language", lambda: [document_rules.language(t) for t in texts]))
  if config.decontaminate.files:
    grams = rules.evaluation_ngrams(config.decontaminate)
    stages.append(("decontaminate", lambda: [
        rules.contaminated_spans(t, grams, config.decontaminate.ngram) for t in texts]))
  if config.quality.enabled:
    stages.append(("quality", lambda: [rules.quality_failure(t, config.quality) for t in texts]))
  if config.classifier.model:
    model = document_rules.classifier
    stages.append(("classifier", lambda: model.scores(texts)))
  if config.pii.enabled:
    stages.append(("pii", lambda: [pii.scrub(t, config.pii.kinds) for t in texts]))
  if config.dedup.exact:
    stages.append(("exact_hash", lambda: [dedup.exact_hash(t) for t in texts]))
  if config.dedup.near:
    signer = dedup.Signer(config.dedup)
    stages.append(("minhash", lambda: [signer(t) for t in texts]))
    signatures = {(str(i), 0): signer(t) for i, t in enumerate(texts)}
    stages.append(("near_dedup_grouping",
                   lambda: dedup.near_duplicates(signatures, config.dedup)))
  rows = []
  for name, run in stages:
    seconds = _median_seconds(run, repeats)
    rows.append({"stage": name, "seconds": round(seconds, 4),
                 "mb_per_s": round(megabytes / seconds, 2), "megabytes": round(megabytes, 3),
                 "documents": len(raw), "repeats": repeats, "cpus": os.cpu_count()})
    if pages and name in ("read", f"extract ({config.web.extractor})"):
      rows[-1].update(pages=len(pages), pages_per_s=round(len(pages) / seconds, 1))
  return rows


def table(rows: list[dict[str, Any]]) -> str:
  """The rows as a Markdown table."""
  lines = ["| stage | MB/s per core (median) | pages/s per core | seconds |",
           "|---|---:|---:|---:|"]
  lines += [f"| {r['stage']} | {r['mb_per_s']} | {r.get('pages_per_s', '')} | {r['seconds']} |"
            for r in rows]
  if rows:
    lines.append(f"({rows[0]['documents']} documents, {rows[0]['megabytes']} MB, median of "
                 f"{rows[0]['repeats']} runs each)")
  return "\n".join(lines)
