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


def main() -> None:
  common.quiet_logs()
  try:
    from lm_eval.__main__ import cli_evaluate
  except ImportError:
    sys.exit("experiments.harness needs lm-evaluation-harness: pip install lm-eval==0.4.13")
  from jaxlm import harness  # noqa: F401  pylint: disable=unused-import (registers "jaxlm")
  from jaxlm.errors import UserError
  try:
    cli_evaluate()
  except UserError as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  main()
