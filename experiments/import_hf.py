r"""Import a Hugging Face checkpoint (GPT-2, Llama, Mistral, Qwen2, Qwen3) as a jaxlm run.

  python -m experiments.import_hf --hf_dir=/models/Llama-3.2-1B --workdir=runs/llama1b
  python -m experiments.generate --workdir=runs/llama1b --prompt="The capital of France is"
  python -m experiments.evaluate --workdir=runs/llama1b --tasks=hellaswag:/data/hellaswag.jsonl

--hf_dir holds config.json, model.safetensors (or model-*.safetensors shards with
model.safetensors.index.json) and the tokenizer (tokenizer.json, or GPT-2's vocab.json +
merges.txt), e.g. downloaded elsewhere with `huggingface-cli download Qwen/Qwen3-0.6B
--local-dir qwen3`. Only safetensors is read (never pickles). Tensors are read one file at a time
and placed straight into their sharding. --workdir must be new or empty; it gets config.json, the
tokenizer and checkpoints/0 (params only). docs/models.md lists the architectures.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from experiments import common

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory to read.")
_WORKDIR = flags.DEFINE_string("workdir", None, "new run directory to write.")


def importer(expect: str = ""):
  """The script's main; `expect`: the one model_type it takes (experiments.import_gpt2)."""

  @common.exit_on_user_error
  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    common.quiet_logs()
    from jaxlm import convert
    if not _HF_DIR.value or not _WORKDIR.value:
      raise convert.ConvertError("pass both --hf_dir=DIR (the Hugging Face files) and "
                                 "--workdir=RUN (the new run directory).")
    start = time.perf_counter()
    summary = convert.import_hf(_HF_DIR.value, _WORKDIR.value, expect=expect)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(summary))
  return main


main = importer()


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
