r"""Export a jaxlm run as a Hugging Face checkpoint that `transformers` loads.

  python -m experiments.export_hf --workdir=runs/x --hf_dir=exported/x
  python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('exported/x')"

Writes config.json, model.safetensors and the tokenizer (GPT-2's vocab.json + merges.txt, or
tokenizer.json + tokenizer_config.json; a jaxlm SentencePiece tokenizer is copied as
tokenizer.model). The architecture is the first that expresses the model exactly: GPT-2
(layernorm, gelu), else Llama / Mistral (a sliding window) / Qwen2 (q/k/v biases) / Qwen3
(qk-norm); --family names one instead. LoRA adapters are merged into the weights. --hf_dir must
be new or empty.
"""

from __future__ import annotations

import json

from absl import app, flags

from experiments import common

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory to export.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "new directory for the Hugging Face files.")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest).")
_FAMILY = flags.DEFINE_string("family", "", "model_type to write: gpt2, llama, mistral, qwen2, "
                              "qwen3 (default: the first that expresses the model exactly).")


def exporter(family_name: str = ""):
  """The script's main; `family_name`: the one family it writes, without --family
  (experiments.export_gpt2)."""

  @common.exit_on_user_error
  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    common.quiet_logs()
    if family_name and _FAMILY.value not in ("", family_name):
      from jaxlm import convert
      raise convert.ConvertError(f"--family={_FAMILY.value}: this command writes {family_name} "
                                 f"only; use python -m experiments.export_hf "
                                 f"--family={_FAMILY.value}.")
    export(family_name or _FAMILY.value)
  return main


def export(family_name: str) -> None:
  from jaxlm import convert
  from jaxlm import run as run_lib
  if not _HF_DIR.value or not _WORKDIR.value:
    raise convert.ConvertError("pass both --workdir=RUN (the run to export) and --hf_dir=DIR "
                               "(the new directory to write).")
  run = run_lib.open_run(_WORKDIR.value, _STEP.value)
  family = convert.family_for(run.config.model, family_name)  # before the (slow) restore
  convert.check_new_directory(_HF_DIR.value, "--hf_dir")
  params = run_lib.restore_params(run)
  written = convert.export_hf(run.config.model, params, run.tokenizer, _HF_DIR.value,
                              family.name)
  print(json.dumps({"hf_dir": _HF_DIR.value, "step": run.step,
                    "architecture": family.architecture, "files": written}))


main = exporter()


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
