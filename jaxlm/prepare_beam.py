"""Token preparation on Apache Beam: the local engine's stages (jaxlm/prepare.py) as Beam jobs,
for corpora one machine cannot tokenize in time.

  driver   the plan (file listing, cheap checks), the tokenizer (given, or trained on a sample),
           and between the jobs the layout, from the units' markers
  job 1    compressed inputs decompressed to their end (a truncated one fails the job before
           anything is written)
  job 2    units -> tokens (`prepare.tokenize_unit`), one per element, spread by a Reshuffle
  job 3    shards (`prepare.write_shard`), one per element
  driver   manifest.json, last

The elements run the same functions as the local engine and write through the same storage
layer (local paths, or gs:// for Dataflow's workers), so the shards are byte-identical to the
local engine's. Locally the DirectRunner runs it; on a cluster pass the runner's options
(`--runner=DataflowRunner --project=... --region=... --temp_location=gs://...`, and
`--requirements_file=requirements.txt` so the workers have jaxlm's dependencies).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np

from jaxlm import prepare, shards, sources, storage
from jaxlm.prepare import PrepareError, PrepareSettings


def _beam():
  try:
    import apache_beam  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise PrepareError("the Beam engine needs Apache Beam: pip install -r requirements-beam.txt "
                       "(or use the local engine: leave out --runner).") from None
  return apache_beam


def _run(beam, options: Sequence[str], build: Callable[[Any], None]) -> None:
  """Runs one job; an input error raised inside it (which runners wrap in their own errors,
  with a traceback) comes out as its one line."""
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
  try:
    with beam.Pipeline(options=PipelineOptions(list(options))) as pipeline:
      build(pipeline)
  except Exception as e:  # pylint: disable=broad-except
    found = re.search(r"(?:CorpusError|PrepareError|StorageError|TokenizerError): ([^\n]+)",
                      str(e))
    if found:
      raise PrepareError(found.group(1).strip().strip("'\"[]")) from None
    raise


def _check_runner(beam_options: Sequence[str]) -> None:
  """PrepareError for a runner Beam does not know, before anything runs or is written."""
  from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions  # pylint: disable=import-outside-toplevel
  from apache_beam.runners.runner import create_runner  # pylint: disable=import-outside-toplevel
  try:
    runner = PipelineOptions(list(beam_options)).view_as(StandardOptions).runner
    if runner:
      create_runner(runner)
  except (ValueError, ImportError) as e:
    raise PrepareError(f"--runner / --beam_options: {str(e).splitlines()[0][:300]}") from None


def _units_fn(beam, settings: PrepareSettings, source: tuple[str, str], work: str):
  class UnitsFn(beam.DoFn):
    def setup(self):
      self.tokenizer = prepare.load_tokenizer(source)

    def process(self, unit_plan):
      yield prepare.tokenize_unit(unit_plan, settings, self.tokenizer, work)
  return UnitsFn()


def prepare_on_beam(inputs: str, output: str, tokenizer: str = "",
                    settings: PrepareSettings = PrepareSettings(),
                    beam_options: Sequence[str] = (), log=print) -> dict[str, Any]:
  """`prepare.prepare` on Beam (`beam_options`: Beam's own flags, e.g.
  ["--runner=DirectRunner", "--direct_num_workers=2"]); returns the manifest."""
  beam = _beam()
  _check_runner(beam_options)
  plan = prepare.make_plan(inputs, output, tokenizer, settings)
  done = prepare.finished(plan)
  if done is not None:
    log(f"{output} already holds these shards ({done['tokens']:,} tokens); nothing to do.")
    return done
  log(f"{len(plan.files)} input files in {len(plan.units)} units; running on Beam.")
  compressed = [f for f in plan.files if f.compressed]
  if compressed:
    _run(beam, beam_options, lambda p: (
        p | "compressed" >> beam.Create(compressed) | "spread" >> beam.Reshuffle()
        | "check" >> beam.Map(sources.check_file, settings.text_key, True)))
  if plan.tokenizer is None:
    prepare.train_tokenizer(plan, log)
    source = (storage.join(plan.work, f"tokenizer-{plan.fingerprint()}.model"), "tokenizer.model")
  else:
    source = (plan.given_tokenizer, plan.tokenizer.file_name)

  def tokenize(unit_plans: list[prepare.UnitPlan]) -> list[dict[str, Any]]:
    pending = [t for t in unit_plans if prepare.read_marker(plan.work, t.fingerprint) is None]
    if pending:
      _run(beam, beam_options, lambda p: (
          p | "units" >> beam.Create(pending) | "spread" >> beam.Reshuffle()
          | "tokenize" >> beam.ParDo(_units_fn(beam, settings, source, plan.work))))
    return [prepare.read_marker(plan.work, t.fingerprint) for t in unit_plans]

  unit_plans = prepare.plan_units(plan)
  markers = tokenize(unit_plans)
  fix = prepare.split_fix(unit_plans, markers)
  if fix is not None:
    unit_plans = prepare.plan_units(plan, fix)
    markers = tokenize(unit_plans)
    prepare.check_splits(markers, settings)
  layout = prepare.layout(unit_plans, markers, settings.shard_tokens)
  arguments = (plan.work, output, shards.token_dtype(plan.tokenizer.vocab_size),
               plan.tokenizer.byte_lengths().astype(np.int64), shards.fingerprint(plan.tokenizer))
  _run(beam, beam_options, lambda p: (
      p | "shards" >> beam.Create(layout) | "spread" >> beam.Reshuffle()
      | "write" >> beam.Map(prepare.write_shard, *arguments)))
  entries = [prepare.write_shard(shard, *arguments) for shard in layout]  # (their markers: no work)
  manifest = prepare.write_manifest(plan, entries)
  storage.remove(plan.work)
  return manifest
