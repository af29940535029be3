r"""Tokenize raw text into token shards that pretraining streams (data.corpus=tokens).

  python -m experiments.prepare_data --input='/data/fineweb/*.parquet' --output=/data/fw \
      --tokenizer=/models/gpt2            # vocab.json + merges.txt, tokenizer.json or .model
  python -m experiments.prepare_data --input='/data/mine/*.jsonl.zst' --output=/data/mine-tok \
      --vocab_size=8192                   # no --tokenizer: SentencePiece trained on a sample
  python -m experiments.prepare_data --input=/data/clean --output=/data/clean-tok  # curate's
  # on Apache Beam (DirectRunner here; Dataflow/Flink/Spark by their options):
  python -m experiments.prepare_data --input='gs://b/raw/*.jsonl.gz' --output=gs://b/tok \
      --tokenizer=/models/gpt2 --runner=DataflowRunner \
      --beam_options='--project=P --region=R --temp_location=gs://b/tmp'

Inputs: .txt/.md (a document per file), .jsonl, .jsonl.gz, .jsonl.zst (a document per line,
field --text_key), .parquet (column --text_key) and experiments.curate output folders, read
streaming. Writes DIR/{train,validation}-NNNNN.npy (+ .docs.npy), the tokenizer and, last,
DIR/manifest.json. An interrupted preparation resumes when rerun with the same arguments; the
shards are byte-identical whatever --workers or runner made them. Then pretrain with
  --config.data.corpus=tokens --config.data.tokens=DIR
"""

from __future__ import annotations

import json
import shlex

from absl import app, flags

from experiments import common
from jaxlm import prepare

_DEFAULTS = prepare.PrepareSettings()
_INPUT = flags.DEFINE_string("input", None, "comma-separated globs of .txt/.md/.jsonl/.jsonl.gz/"
                             ".jsonl.zst/.parquet files or curate output folders (local or "
                             "gs://); quote them.")
_OUTPUT = flags.DEFINE_string("output", None, "folder for the shards (local or gs://).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "a SentencePiece .model, a tokenizer.json, or "
                                 "a folder with GPT-2's vocab.json + merges.txt; empty: train "
                                 "SentencePiece on a sample of the input.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", _DEFAULTS.vocab_size, "vocabulary of the "
                                   "tokenizer trained when --tokenizer is empty.")
_TEXT_KEY = flags.DEFINE_string("text_key", _DEFAULTS.text_key, "the text field of .jsonl "
                                "records / column of .parquet files.")
_ID_KEY = flags.DEFINE_string("id_key", _DEFAULTS.id_key, "a record's identity field (decides "
                              "its split where present; else its file and place).")
_VALIDATION = flags.DEFINE_float("validation_fraction", _DEFAULTS.validation_fraction,
                                 "share of documents held out for validation (by a hash of "
                                 "their identity).")
_SHARD_TOKENS = flags.DEFINE_integer("shard_tokens", _DEFAULTS.shard_tokens,
                                     "tokens per shard file.")
_UNIT_MB = flags.DEFINE_float("unit_mb", _DEFAULTS.unit_mb, "MB of input per unit of work "
                              "(and of resume).")
_WORKERS = flags.DEFINE_integer("workers", 0, "local engine: processes (0: every core).",
                                lower_bound=0)
_RUNNER = flags.DEFINE_string("runner", None, "run on Apache Beam with this runner "
                              "(DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...).")
_BEAM_OPTIONS = flags.DEFINE_string("beam_options", "", "more Beam pipeline options, e.g. "
                                    "'--project=P --region=R --direct_num_workers=2'.")


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise prepare.PrepareError(f"unexpected arguments: {' '.join(argv[1:])}; quote globs "
                               f"(--input='/data/*.jsonl') so the shell does not expand them.")
  if not _INPUT.value:
    raise prepare.PrepareError("--input=GLOB is required (e.g. --input='/data/raw/*.jsonl').")
  if not _OUTPUT.value:
    raise prepare.PrepareError("--output=DIR is required (the folder for the shards).")
  settings = prepare.PrepareSettings(
      text_key=_TEXT_KEY.value, id_key=_ID_KEY.value, validation_fraction=_VALIDATION.value,
      shard_tokens=_SHARD_TOKENS.value, unit_mb=_UNIT_MB.value, vocab_size=_VOCAB_SIZE.value)
  common.quiet_logs()
  if _RUNNER.value:
    from jaxlm import prepare_beam  # pylint: disable=import-outside-toplevel  (optional: Beam)
    try:
      options = [f"--runner={_RUNNER.value}"] + shlex.split(_BEAM_OPTIONS.value)
    except ValueError as e:
      raise prepare.PrepareError(f"--beam_options={_BEAM_OPTIONS.value!r}: {e}; quote it as "
                                 f"one shell word.") from None
    manifest = prepare_beam.prepare_on_beam(_INPUT.value, _OUTPUT.value, _TOKENIZER.value,
                                            settings, options, log=common.log)
  else:
    manifest = prepare.prepare(_INPUT.value, _OUTPUT.value, _TOKENIZER.value, settings,
                               workers=_WORKERS.value, log=common.log)
  print(json.dumps({"output": _OUTPUT.value, "tokens": manifest["tokens"],
                    "documents": manifest["documents"], "splits": manifest["splits"],
                    "pretrain_with": f"--config.data.corpus=tokens "
                                     f"--config.data.tokens={_OUTPUT.value}"}))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
