"""The curation pipeline on Apache Beam: the same stages, grouped by Beam instead of in memory.

  records = shards | per-document stages (inputs.shard_records, as the local engine)
  exact   = survivors keyed by text hash | GroupByKey -> all but the smallest key dropped
  near    = survivors' band keys | GroupByKey per band -> verified pairs -> clusters
  output  = kept documents keyed by output shard | GroupByKey -> one sorted file per shard

Near duplicates are found per LSH band (a GroupByKey), never in one index; only the duplicate
pairs found (one per duplicate document, not per document) meet on one worker, to join them
into clusters. Files are read and written through Beam's FileSystems, so paths may be gs://,
hdfs:// or local. Locally the DirectRunner runs it; on a cluster pass the runner's options
(`--runner=DataflowRunner --project=... --region=... --temp_location=gs://...`). The output is
byte-identical to the local engine's for the same input and config.
"""

from __future__ import annotations

import collections
import json
import os
import posixpath
from typing import Any, Iterable, Sequence

from jaxlm.curate import dedup, inputs, report, settings
from jaxlm.curate.local import CurationError, check_output
from jaxlm.curate.rules import DocumentRules


def _beam():
  try:
    import apache_beam  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise CurationError("the Beam engine needs Apache Beam: pip install -r requirements-beam.txt "
                        "(or use the local engine: leave out --runner).") from None
  return apache_beam


def _list_files(patterns: str) -> tuple[list[inputs.File], list[int]]:
  """(files with their relative names, sizes) matched by the globs, through FileSystems."""
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  found: dict[str, int] = {}
  for pattern in [p.strip() for p in patterns.split(",") if p.strip()]:
    metadata = FileSystems.match([pattern])[0].metadata_list
    if not metadata:
      raise CurationError(f"--input glob '{pattern}' matched no files; check the path and quote "
                          f"the glob so the shell passes it unexpanded.")
    found.update((m.path, m.size_in_bytes) for m in metadata)
  paths = sorted(found)
  if "://" in paths[0]:  # posix relative names for URLs
    root = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(paths)
    files = [(posixpath.relpath(path, root), path) for path in paths]
  else:
    files = inputs.relative_names(paths)
  return files, [found[path] for path in paths]


def _records_fn(beam, config: settings.CurationConfig):
  """A DoFn: the per-document records of one input shard (rules loaded once per worker)."""
  class RecordsFn(beam.DoFn):
    def setup(self):
      # pylint: disable=import-outside-toplevel
      from apache_beam.io.filesystems import CompressionTypes, FileSystems
      self.rules = DocumentRules(config)
      self.signer = dedup.Signer(config.dedup) if config.dedup.near else None
      # The files' bytes as stored (FileSystems would gunzip .gz itself): the readers
      # decompress, as locally, so a damaged archive reads the same on both engines.
      self.open = lambda path: FileSystems.open(
          path, compression_type=CompressionTypes.UNCOMPRESSED)

    def process(self, shard):
      yield from inputs.shard_records(shard, config, self.rules, self.signer, self.open)
  return RecordsFn()


def _band_members(record: dict[str, Any], bands: int, rows: int):
  signature = dedup.decode_signature(record["sig"])
  key = tuple(record["key"])
  return [(band, (key, signature)) for band in dedup.band_keys(signature, bands, rows)]


def _write(path: str, content: bytes) -> None:
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  with FileSystems.create(path) as f:
    f.write(content)


def _write_shard(item: tuple[int, Iterable[tuple[dedup.DocKey, str, dict | None]]],
                 directory: str, num_shards: int) -> dict[str, Any]:
  """Writes one output shard (documents sorted by key); returns its manifest entry."""
  index, documents = item
  content = b"".join(report.shard_line(key, text, meta)
                     for key, text, meta in sorted(documents, key=lambda d: d[0]))
  name = report.shard_name(index, num_shards)
  _write(posixpath.join(directory, name), content)
  return report.content_entry(name, content)


def _stats_combine_fn(beam):
  """A CombineFn of final records into report.Stats (defined here: Beam is imported late)."""
  class StatsFn(beam.CombineFn):
    def create_accumulator(self):
      return report.Stats()

    def add_input(self, stats, record):
      stats.add(record)
      return stats

    def merge_accumulators(self, accumulators):
      merged = report.Stats()
      for stats in accumulators:
        merged.merge(stats)
      return merged

    def extract_output(self, stats):
      return stats
  return StatsFn()


def _final_record(item: tuple[dedup.DocKey, dict[str, list]]) -> dict[str, Any]:
  """The record with the de-duplication's verdict, if any, as its rule."""
  (record,), drops = item[1]["record"], item[1]["drop"]
  return dict(record, rule=drops[0]) if drops else record


def _summary(_, stats: report.Stats, shards: list[dict[str, Any]], exact_sizes: list[int],
             near_histograms: list[dict[str, int]], config: settings.CurationConfig) -> bytes:
  """The stats (with the cluster histograms) and the written shards, as JSON."""
  clusters = {}
  if config.dedup.exact:
    clusters["exact"] = {str(size): count for size, count in
                         sorted(collections.Counter(exact_sizes).items())}
  if config.dedup.near:
    clusters["near"] = near_histograms[0]
  return json.dumps({"stats": stats.to_json(clusters), "shards": shards}).encode()


def _pipeline(pipeline, beam, shards: list[list[inputs.File]], config: settings.CurationConfig,
              staging: str) -> None:
  """Builds the curation on `pipeline`; its last step writes staging/_summary.json."""
  num_shards = config.output.num_shards
  key_of = lambda r: tuple(r["key"])  # pylint: disable=unnecessary-lambda-assignment
  records = (pipeline | "shards" >> beam.Create(shards) | "spread" >> beam.Reshuffle()
             | "filter" >> beam.ParDo(_records_fn(beam, config)))
  survivors = records | "kept so far" >> beam.Filter(lambda r: r["rule"] is None)
  drops = []
  exact_sizes = pipeline | "no exact" >> beam.Create([])
  near_histograms = pipeline | "no near" >> beam.Create([{}])
  if config.dedup.exact:
    groups = (survivors | "by hash" >> beam.Map(lambda r: (r["exact"], key_of(r)))
              | "group hashes" >> beam.GroupByKey()
              | beam.Map(lambda kv: sorted(kv[1])) | beam.Filter(lambda keys: len(keys) > 1))
    exact_sizes = groups | "sizes" >> beam.Map(len)
    exact_drops = groups | beam.FlatMap(lambda keys: [(k, "exact_duplicate") for k in keys[1:]])
    drops.append(exact_drops)
    survivors = ({"record": survivors | "by key" >> beam.Map(lambda r: (key_of(r), r)),
                  "drop": exact_drops}
                 | "join exact" >> beam.CoGroupByKey()
                 | beam.FlatMap(lambda kv: [] if kv[1]["drop"] else kv[1]["record"]))
  if config.dedup.near:
    bands, rows = dedup.band_shape(config.dedup)
    roots = (survivors | "bands" >> beam.FlatMap(_band_members, bands, rows)
             | "group bands" >> beam.GroupByKey()
             | "pairs" >> beam.FlatMap(
                 lambda kv: dedup.bucket_pairs(list(kv[1]), config.dedup.threshold))
             | beam.Distinct() | "all pairs" >> beam.combiners.ToList()
             | "clusters" >> beam.Map(lambda pairs: dedup.cluster_roots(sorted(pairs))))
    near_histograms = roots | "histogram" >> beam.Map(dedup.size_histogram)
    drops.append(roots | "near drops" >> beam.FlatMap(
        lambda r: [(key, "near_duplicate") for key, root in r.items() if key != root]))
  all_drops = (drops | "drops" >> beam.Flatten()) if drops else pipeline | beam.Create([])
  finals = ({"record": records | "all by key" >> beam.Map(lambda r: (key_of(r), r)),
             "drop": all_drops}
            | "join drops" >> beam.CoGroupByKey() | "verdict" >> beam.Map(_final_record))
  written = (finals | "kept" >> beam.Filter(lambda r: r["rule"] is None)
             | "to shards" >> beam.Map(lambda r: (report.shard_of(key_of(r), num_shards),
                                                 (key_of(r), r["text"], r.get("meta"))))
             | "group shards" >> beam.GroupByKey()
             | "write" >> beam.Map(_write_shard, staging, num_shards)
             | "written" >> beam.combiners.ToList())
  stats = finals | "stats" >> beam.CombineGlobally(_stats_combine_fn(beam))
  side = beam.pvalue
  (pipeline | "once" >> beam.Create([None])
   | "summary" >> beam.Map(_summary, side.AsSingleton(stats), side.AsSingleton(written),
                           side.AsList(exact_sizes), side.AsList(near_histograms), config)
   | "save summary" >> beam.Map(lambda content: _write(posixpath.join(staging, "_summary.json"),
                                                       content)))


def curate(input_glob: str, output: str, config: settings.CurationConfig,
           beam_options: Sequence[str] = (), log=print) -> dict[str, Any]:
  """Curates `input_glob` into `output` on Beam (`beam_options`: Beam's own flags, e.g.
  ["--runner=DirectRunner", "--direct_num_workers=2"]); returns the stats."""
  beam = _beam()
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
  if "://" not in output:
    check_output(output)
  elif FileSystems.exists(output):
    raise CurationError(f"--output {output} already exists; choose a new folder or delete it.")
  files, sizes = _list_files(input_glob)
  inputs.check_resources(config)  # what the workers load; fail here, before the pipeline
  shards = inputs.plan_shards(files, sizes, config.input.shard_mb)
  log(f"{len(files)} files in {len(shards)} shards; running on Beam.")
  staging = output.rstrip("/") + ".partial"
  if FileSystems.exists(staging):  # an earlier, interrupted attempt: the runner starts over
    FileSystems.delete([staging])
  FileSystems.mkdirs(staging)
  with beam.Pipeline(options=PipelineOptions(list(beam_options))) as pipeline:
    _pipeline(pipeline, beam, shards, config, staging)
  summary_path = posixpath.join(staging, "_summary.json")
  with FileSystems.open(summary_path) as f:
    summary = json.loads(f.read())
  FileSystems.delete([summary_path])
  shard_entries = {entry["file"]: entry for entry in summary["shards"]}
  for index in range(config.output.num_shards):  # shards no document hashed to: empty files
    name = report.shard_name(index, config.output.num_shards)
    if name not in shard_entries:
      _write(posixpath.join(staging, name), b"")
      shard_entries[name] = report.content_entry(name, b"")
  report.write_metadata(staging, output, summary["stats"], sorted(
      shard_entries.values(), key=lambda e: e["file"]), settings.to_dict(config), input_glob,
                        write=_write)
  if "://" in output:  # object stores have no folder rename: move each file, manifest last
    names = [m.path for m in FileSystems.match([posixpath.join(staging, "*")])[0].metadata_list]
    names.sort(key=lambda path: path.endswith("manifest.json"))
    FileSystems.rename(names, [posixpath.join(output, posixpath.basename(p)) for p in names])
  else:
    os.rename(staging, output)
  return summary["stats"]
