r"""Curate raw documents into a training corpus: web pages' main text, normalize, language,
quality, decontaminate, the quality classifier, PII, exact + near-duplicate removal (see
jaxlm/curate and docs/curation.md).

  python -m experiments.curate --input='/data/crawl/**/*.jsonl' --output=/data/clean
  python -m experiments.curate --input='/data/cc/*.warc.gz' --output=/data/cc-clean \
      --config.web.blocklist=blocklist.txt --config.classifier.model=/data/quality_classifier
  python -m experiments.curate --input='/data/crawl/*' --output=/data/clean \
      --config=configs/curation/default.py --config.dedup.threshold=0.7 \
      --config.decontaminate.files='tasks/*.jsonl' --workers=8
  # the same on Apache Beam (locally, or Dataflow/Flink/Spark with their options):
  python -m experiments.curate --input='gs://bucket/crawl/*.jsonl' --output=gs://bucket/clean \
      --runner=DataflowRunner --beam_options='--project=P --region=R --temp_location=gs://b/tmp'
  # throughput of each stage on this machine (MB/s per core), nothing written:
  python -m experiments.curate --input='/data/crawl/*' --benchmark

Writes OUTPUT/shard-*.jsonl ({"text", "id"} per line, web pages with "url", "date",
"content_type": pretrain with
--config.data.corpus=text_files --config.data.files='OUTPUT/*.jsonl'), manifest.json,
stats.json, report.md and config.json. An interrupted local run resumes when rerun with the same
arguments (finished input shards are kept in OUTPUT.partial/); OUTPUT appears only when complete.
"""

from __future__ import annotations

import json
import shlex

from absl import app, flags

from experiments import common
from jaxlm.curate import local, settings, throughput

_CONFIG = common.define_config_flag(settings.DEFAULT_CONFIG_FILE)
_INPUT = flags.DEFINE_string("input", None, "comma-separated globs of .txt/.md (a document per "
                             "file), .jsonl (a document per line) and web archive (.warc.gz, "
                             ".warc.wet.gz: a document per page) files; quote them.")
_OUTPUT = flags.DEFINE_string("output", None, "folder to create with the curated corpus.")
_WORKERS = flags.DEFINE_integer("workers", 0, "local engine: processes (0: every core).",
                                lower_bound=0)
_RUNNER = flags.DEFINE_string("runner", None, "run on Apache Beam with this runner "
                              "(DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...).")
_BEAM_OPTIONS = flags.DEFINE_string("beam_options", "", "more Beam pipeline options, e.g. "
                                    "'--project=P --region=R --direct_num_workers=2'.")
_BENCHMARK = flags.DEFINE_bool("benchmark", False, "measure each stage's throughput on --input "
                               "(one process; nothing is written) and print a table.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "benchmark: runs per stage (the median is shown).",
                                lower_bound=1)


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _INPUT.value:
    raise app.UsageError("--input=GLOB is required (e.g. --input='/data/crawl/*.jsonl').")
  config = settings.from_dict(common.config_value(_CONFIG).to_dict())
  if _BENCHMARK.value:
    rows = throughput.measure(_INPUT.value, config, repeats=_REPEATS.value)
    print(throughput.table(rows))
    print(json.dumps(rows))
    return
  if not _OUTPUT.value:
    raise app.UsageError("--output=DIR is required (a folder that does not exist yet).")
  common.quiet_logs()
  if _RUNNER.value:
    from jaxlm.curate import beam  # pylint: disable=import-outside-toplevel  (optional: Beam)
    options = [f"--runner={_RUNNER.value}"] + shlex.split(_BEAM_OPTIONS.value)
    stats = beam.curate(_INPUT.value, _OUTPUT.value, config, options, log=common.log)
  else:
    stats = local.curate(_INPUT.value, _OUTPUT.value, config, workers=_WORKERS.value,
                         log=common.log)
  print(json.dumps({"documents": stats["input"]["documents"],
                    "kept": stats["kept"]["documents"],
                    "dropped": {rule: d["documents"] for rule, d in stats["dropped"].items()},
                    "output": _OUTPUT.value}))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
