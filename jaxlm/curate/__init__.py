"""Corpus curation: raw documents -> a clean training corpus (see docs/architecture.md).

  settings   the curation config (configs/curation/default.py + overrides), checked
  warc       web archives (WARC/WET) -> pages' documents; extract (charset, main text); urls
             (block lists)
  rules      per-document stages: normalization, language, decontamination, quality,
             the quality classifier (classifier), PII scrubbing (pii)
  dedup      exact and MinHash-LSH near-duplicate clusters
  inputs     input files, shards, the per-document records both engines start from
  report     stats.json, report.md, the output shards and manifest.json
  local      the one-machine engine (process pool, resumable, atomic output)
  beam       the same pipeline on Apache Beam (DirectRunner, Dataflow, Flink, Spark)
"""
