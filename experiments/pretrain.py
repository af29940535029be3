r"""Pretrain a GPT from scratch (or resume a run).

  python -m experiments.pretrain                                   # configs/default.py
  python -m experiments.pretrain --config=configs/default.py \
      --config.model.num_layers=2 --workdir=runs/x
  python -m experiments.pretrain --workdir=runs/x                  # resume with its saved config

Rerunning with the same --workdir resumes from its newest checkpoint that restores (a damaged
one is skipped with a warning), or from --restore_step=N. Without --config, an
existing run's saved config.json is used (--config.K=V overrides still apply, e.g. a larger
train.num_steps to train further).
"""

from __future__ import annotations

import datetime
import os

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from jaxlm import config as config_lib

_CONFIG = common.define_config_flag("configs/default.py")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "run directory (default: runs/<config name>-<time>); reusing one resumes.")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar on stderr.")
_RESTORE_STEP = common.define_restore_step_flag()
common.define_distributed_flags()


def resolve_config(workdir: str) -> tuple[config_lib.Config, dict]:
  """(config to run, the config it derives from) for --config/--workdir as given."""
  from jaxlm import run as run_lib
  saved = run_lib.saved_config(workdir)
  if saved is not None and not flags.FLAGS["config"].present:
    return config_lib.validate(config_lib.apply_overrides(saved, common.config_overrides())), saved
  return config_lib.validate(common.config_value(_CONFIG)), common.config_file_dict()


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_logs()
  common.maybe_initialize_distributed()
  workdir = _WORKDIR.value
  if workdir is None:
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(
        flags.FLAGS["config"])))[0]
    workdir = os.path.join("runs", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
  config, base = resolve_config(workdir)
  from jaxlm import pretrain
  summary = pretrain.train(config, workdir, base_config=base, restore_step=_RESTORE_STEP.value,
                          show_progress=_PROGRESS.value)
  import jax
  if jax.process_index() == 0:
    keys = ("step", "train_loss", "eval_loss", "eval_bits_per_byte", "median_tokens_per_second")
    print(" ".join(f"{k}={summary.get(k)}" for k in keys))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
