r"""Run an ablation sweep: every (point, seed) of a sweep file as its own pretraining run.

  python -m experiments.sweep --sweep=configs/sweeps/positional.py --workdir=runs/pos
  python -m experiments.sweep --sweep=configs/sweeps/positional.py --workdir=runs/pos --parallel=2
  python -m experiments.sweep --workdir=runs/pos                    # resume with its saved plan
  python -m experiments.sweep --workdir=runs/pos --report_only      # rewrite report.md/curves.png

Each run is an ordinary run directory WORKDIR/POINT/seed_S (generate, evaluate and pretrain
accept it), its output in WORKDIR/POINT/seed_S.log. Every run's config is checked before
anything starts. Rerunning skips finished runs and resumes interrupted ones from their
checkpoints; a failing run is reported (report.md, sweep.json) while the others go on. Ctrl-C or
SIGTERM asks the running runs to checkpoint and exit. At the end WORKDIR/report.md (a row per
point: parameters, final train/validation loss mean ± std over seeds, validation bits per byte,
tokens/s, wall time, config diff) and WORKDIR/curves.png (validation loss against tokens seen,
a band over seeds) are written, and the table is printed.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from experiments import common
from jaxlm import sweep as sweep_lib

_SWEEP = flags.DEFINE_string(
    "sweep", None, "sweep file (configs/sweeps/NAME.py); without it, the plan saved in "
    "--workdir is resumed.")
_WORKDIR = flags.DEFINE_string("workdir", None, "sweep directory (one run directory per "
                               "point and seed inside).")
_PARALLEL = flags.DEFINE_integer(
    "parallel", 1, "runs trained at the same time (each a process; on CPU they share the "
    "cores, so tokens/s and wall time then describe a shared machine).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False,
                                 "only (re)write report.md and curves.png from the runs.")
_RUN = flags.DEFINE_string("run", None, "internal: train one run POINT/seed_S of the saved "
                           "plan in this process (what the sweep's worker processes do).")
_CHECK_INPUTS = flags.DEFINE_bool(
    "check_inputs", False, "internal: check every unfinished run's inputs and build the shared "
    "caches, then exit (the sweep runs this in its own process, which frees the accelerators "
    "before the runs start).")


def _plan(workdir: str) -> sweep_lib.Plan:
  if _SWEEP.value:
    return sweep_lib.load(_SWEEP.value)
  plan = sweep_lib.saved_plan(workdir)
  if plan is None:
    raise sweep_lib.SweepError(f"--workdir={workdir} holds no sweep ({sweep_lib.PLAN_FILE}); "
                               f"pass --sweep=configs/sweeps/NAME.py to start one.")
  return plan


def _train_one(workdir: str, name: str) -> None:
  from jaxlm import config as config_lib
  from jaxlm import pretrain
  plan = sweep_lib.saved_plan(workdir)
  runs = {run.name: run for run in (plan.runs if plan else [])}
  if name not in runs:
    raise sweep_lib.SweepError(f"--run={name}: no such run in {workdir}/{sweep_lib.PLAN_FILE}.")
  run = runs[name]
  summary = pretrain.train(config_lib.validate(run.config), sweep_lib.run_dir(workdir, run),
                          base_config=plan.base, show_progress=False)
  print(" ".join(f"{k}={summary.get(k)}" for k in ("step", "train_loss", "eval_loss")))


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_logs()
  workdir = _WORKDIR.value
  if not workdir:
    raise sweep_lib.SweepError("--workdir=DIR is required (where the sweep's runs live).")
  if _RUN.value:
    _train_one(workdir, _RUN.value)
    return
  plan = _plan(workdir)
  if _CHECK_INPUTS.value:
    sweep_lib.prepare_inputs(plan, workdir, common.log)
    return
  if not _REPORT_ONLY.value:
    this = [sys.executable, "-m", "experiments.sweep", f"--workdir={workdir}"]

    def command(run: sweep_lib.Cell) -> list[str]:
      return this + [f"--run={run.name}"]
    # This process never touches a device: the runs need them (see sweep_lib.execute).
    check = this + ([f"--sweep={_SWEEP.value}"] if _SWEEP.value else []) + ["--check_inputs"]
    statuses = sweep_lib.execute(plan, workdir, command, check_command=check,
                                 parallel=_PARALLEL.value, log=common.log)
  else:
    if not os.path.isdir(workdir):
      raise sweep_lib.SweepError(f"--workdir={workdir} does not exist: nothing to report on; "
                                 f"run the sweep first.")
    statuses = {}
  report, curves = sweep_lib.write_report(plan, workdir)
  with open(report) as f:
    print(f.read(), end="")
  common.log(f"wrote {report} and {curves}")
  unfinished = [name for name, s in statuses.items() if s.get("status") != "finished"]
  if unfinished:
    common.log(f"{len(unfinished)} run(s) did not finish: {', '.join(unfinished)}; rerun with "
               f"--workdir={workdir} to retry or resume them.")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
