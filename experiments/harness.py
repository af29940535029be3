r"""lm-evaluation-harness on a jaxlm run: lm_eval's own command line, with model "jaxlm".

  python -m experiments.harness --model jaxlm --model_args workdir=runs/x --tasks hellaswag \
      --batch_size 32 --output_path results/
  python -m experiments.harness --model jaxlm --model_args workdir=runs/x,step=2000 \
      --tasks my_task --include_path my_tasks/ --limit 100

Every lm_eval flag works as documented by lm-evaluation-harness; model_args are workdir, step,
batch_size and max_gen_toks (jaxlm/harness.py). This launcher exists because the `lm_eval`
console script only knows the models it ships: importing jaxlm.harness registers "jaxlm" first.
Needs `pip install lm-eval` (a test extra: requirements-test.txt).
"""

from __future__ import annotations

import sys

from experiments import common


def model_args(argv: list[str]) -> dict[str, str]:
  """The key=value pairs of --model_args (either spelling), as lm_eval splits them."""
  for i, arg in enumerate(argv):
    value = (argv[i + 1] if arg == "--model_args" and i + 1 < len(argv)
             else arg.partition("=")[2] if arg.startswith("--model_args=") else None)
    if value is not None:
      return dict(pair.partition("=")[::2] for pair in value.split(",") if pair)
  return {}


def main() -> None:
  common.quiet_logs()
  from jaxlm import run as run_lib
  from jaxlm.errors import UserError
  args = model_args(sys.argv[1:])
  try:
    if "workdir" in args:  # a missing or broken run fails here, not after lm_eval's slow import
      run_lib.open_run(args["workdir"], int(args["step"]) if args.get("step", "").isdigit()
                       else None, language_model=True)
  except UserError as error:
    sys.exit(f"error: {error}")
  try:
    from lm_eval.__main__ import cli_evaluate
  except ImportError:
    sys.exit("experiments.harness needs lm-evaluation-harness: pip install lm-eval==0.4.13")
  from jaxlm import harness  # noqa: F401  pylint: disable=unused-import (registers "jaxlm")
  try:
    cli_evaluate()
  except UserError as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  main()
