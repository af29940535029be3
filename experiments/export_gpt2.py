r"""Export a jaxlm run as a GPT-2 checkpoint in the Hugging Face layout.

  python -m experiments.export_gpt2 --workdir=runs/x --hf_dir=exported/x
  python -c "import transformers; transformers.GPT2LMHeadModel.from_pretrained('exported/x')"

Writes config.json and model.safetensors, plus vocab.json + merges.txt for a GPT-2 tokenizer
(a run with jaxlm's SentencePiece tokenizer gets its tokenizer.model instead, which
`jaxlm.tokenizer.load_tokenizer` reads). The model must be GPT-2-shaped: layernorm, gelu MLP,
learned (or sinusoidal / no) positions. --hf_dir must be new or empty.
"""

from __future__ import annotations

import json

from absl import app, flags

from experiments import common

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory to export.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "new directory for the Hugging Face files.")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest).")


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_logs()
  from jaxlm import convert
  from jaxlm import run as run_lib
  if not _HF_DIR.value or not _WORKDIR.value:
    raise convert.ConvertError("pass both --workdir=RUN (the run to export) and --hf_dir=DIR "
                               "(the new directory to write).")
  run = run_lib.open_run(_WORKDIR.value, _STEP.value)
  convert.check_exportable(run.config.model)  # before the (slow) restore
  convert.check_new_directory(_HF_DIR.value, "--hf_dir")
  params = run_lib.restore_params(run)
  written = convert.export_gpt2(run.config.model, params, run.tokenizer, _HF_DIR.value)
  print(json.dumps({"hf_dir": _HF_DIR.value, "step": run.step, "files": written}))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
