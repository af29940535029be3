r"""Import a GPT-2 checkpoint in the Hugging Face layout as a jaxlm run directory.

  python -m experiments.import_gpt2 --hf_dir=/models/gpt2 --workdir=runs/gpt2
  python -m experiments.generate --workdir=runs/gpt2 --prompt="The meaning of life is"
  python -m experiments.evaluate --workdir=runs/gpt2 --text_files='/data/*.txt'

--hf_dir holds config.json, model.safetensors (or sharded model-*.safetensors with
model.safetensors.index.json), vocab.json and merges.txt, e.g. downloaded elsewhere with
`huggingface-cli download openai-community/gpt2 config.json model.safetensors vocab.json
merges.txt --local-dir gpt2`. Only safetensors is read (never pickles). --workdir must be new or
empty; it gets config.json, tokenizer.json and checkpoints/0 (params only).
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from experiments import common

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face GPT-2 directory to read.")
_WORKDIR = flags.DEFINE_string("workdir", None, "new run directory to write.")


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_logs()
  from jaxlm import convert
  if not _HF_DIR.value or not _WORKDIR.value:
    raise convert.ConvertError("pass both --hf_dir=DIR (the GPT-2 files) and --workdir=RUN "
                               "(the new run directory).")
  start = time.perf_counter()
  summary = convert.import_gpt2(_HF_DIR.value, _WORKDIR.value)
  summary["seconds"] = round(time.perf_counter() - start, 2)
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
