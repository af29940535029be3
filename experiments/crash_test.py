r"""Crash safety of checkpointing: kill -9 a pretraining run at random moments, half of them
while an asynchronous checkpoint is being written, restart it after each kill, and check that

  * every restart resumes from the newest complete checkpoint on disk at the kill (no kill
    leaves a checkpoint that is listed but does not restore: that would show as a fallback);
  * once finished, the run logged exactly (bitwise) the losses of an uninterrupted run.

  python -m experiments.crash_test --workdir=/tmp/crash --kills=20 \
      --config.model.num_layers=2 --config.model.embed_dim=64 ...   # any pretrain override

The pretrain script runs in subprocesses with the given --config/--config.K=V flags (keep the
run small: it is trained twice, plus one startup per kill), with train.checkpoint_every and
train.log_every set to 1 unless given. Prints one JSON object; exits 1 if a check failed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from absl import app, flags

from experiments import common
from jaxlm import metrics as metrics_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "folder for the two runs (emptied first).")
_KILLS = flags.DEFINE_integer("kills", 20, "how many times the run is killed.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "seed of the kill moments.")
_TIMEOUT = flags.DEFINE_integer("timeout", 600, "seconds one attempt may take.")
_CONFIG = common.define_config_flag("configs/default.py")

_TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax writes a step here, then renames it when complete


def pretrain_command(workdir: str) -> list[str]:
  passed = [a for a in sys.argv[1:] if a.startswith("--config")]
  defaults = [f"--config.train.{key}=1" for key in ("checkpoint_every", "log_every")
              if not any(a.startswith(f"--config.train.{key}=") for a in passed)]
  return [sys.executable, "-m", "experiments.pretrain", f"--workdir={workdir}",
          "--progress=false", *passed, *defaults]


def committed_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def unfinished_writes(workdir: str) -> set[str]:
  """Checkpoint steps being written (or left half-written by a kill: the next start removes
  them)."""
  directory = os.path.join(workdir, "checkpoints")
  return {n for n in (os.listdir(directory) if os.path.isdir(directory) else [])
          if _TMP_MARK in n}


def logged_step(workdir: str) -> int:
  """The last step in metrics.jsonl (0 before any)."""
  records = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return max((r.get("step", 0) for r in records), default=0)


def losses(workdir: str) -> dict[int, float]:
  return {r["step"]: r["train_loss"]
          for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "train_loss" in r}


def resumed_step(stderr: str) -> int | None:
  found = re.findall(r"resumed from .*/checkpoints/(\d+)", stderr)
  return int(found[-1]) if found else None


class Attempt:
  """One start of the pretrain script on `workdir`; its stderr is read as it comes."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.stale = unfinished_writes(workdir)  # left by the previous kill
    self.process = subprocess.Popen(pretrain_command(workdir), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
    self.lines: list[str] = []
    self.reader = threading.Thread(target=self._read, daemon=True)
    self.reader.start()

  def _read(self) -> None:
    for line in self.process.stderr:
      self.lines.append(line)

  def training(self) -> bool:
    """Restored (or started fresh) and training: the loop's start line is out, and
    metrics.jsonl holds only the steps before the restored one and this attempt's."""
    return any(" parameters; " in line for line in self.lines)

  def writing(self) -> bool:
    """This attempt is writing a checkpoint (Orbax's temporary step directory exists)."""
    return bool(unfinished_writes(self.workdir) - self.stale)

  def run(self, kill_when=lambda attempt: False) -> dict | None:
    """Waits until `kill_when(self)` holds (then SIGKILL: returns the kill's record) or the
    script exits (returns None)."""
    deadline = time.time() + _TIMEOUT.value
    while self.process.poll() is None:
      if time.time() > deadline:
        self.process.kill()
        raise RuntimeError(f"an attempt took over --timeout={_TIMEOUT.value} s")
      if kill_when(self):
        during_write = self.writing()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.reader.join()
        return {"step": logged_step(self.workdir), "during_checkpoint_write": during_write}
      time.sleep(0.005)
    self.reader.join()
    return None

  @property
  def stderr(self) -> str:
    return "".join(self.lines)


def main(argv: list[str]) -> None:
  del argv
  common.quiet_logs()
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  num_steps = common.config_value(_CONFIG).train.num_steps
  if num_steps < 4:
    raise app.UsageError("train.num_steps must be at least 4")
  root = os.path.abspath(_WORKDIR.value)
  shutil.rmtree(root, ignore_errors=True)
  reference, crashed = os.path.join(root, "reference"), os.path.join(root, "crashed")
  start = time.time()
  uninterrupted = Attempt(reference)
  uninterrupted.run()
  if uninterrupted.process.returncode != 0:
    sys.exit(f"error: the uninterrupted run failed:\n{uninterrupted.stderr[-3000:]}")

  rng = random.Random(_SEED.value)
  kills, problems = [], []

  def check_resume(attempt: Attempt, committed: list[int]) -> None:
    expected = committed[-1] if committed else None
    if attempt.training() and (resumed_step(attempt.stderr) != expected
                               or "warning: skipping checkpoint" in attempt.stderr):
      problems.append(f"attempt {len(kills) + 1}: resumed from {resumed_step(attempt.stderr)}, "
                      f"the newest complete checkpoint was {expected}; its log ends: "
                      f"{attempt.stderr[-600:]!r}")

  while len(kills) < _KILLS.value:
    committed = committed_steps(crashed)
    if committed and committed[-1] >= num_steps - 1:  # no step left to kill in: start over
      shutil.rmtree(crashed)
      committed = []
    # A step this attempt will log, a few after the newest complete checkpoint (it resumes
    # there): the kills spread over the whole run, which starts over when it reaches the end.
    resume = committed[-1] if committed else 0
    target = rng.randint(resume + 1, min(num_steps - 1, resume + max(2, num_steps // 6)))
    if len(kills) % 2 == 0:  # while a checkpoint is being written
      kill_when = lambda a, t=target: a.training() and logged_step(crashed) >= t and a.writing()
    else:  # at a random moment: up to 50 ms after logging the target step
      moment = {"delay": rng.uniform(0, 0.05)}

      def kill_when(a, t=target, moment=moment):
        if "at" not in moment and a.training() and logged_step(crashed) >= t:
          moment["at"] = time.time() + moment["delay"]
        return "at" in moment and time.time() >= moment["at"]
    attempt = Attempt(crashed)
    record = attempt.run(kill_when)
    check_resume(attempt, committed)
    if record is None:  # it finished before the kill moment: start over from scratch
      if attempt.process.returncode != 0:
        sys.exit(f"error: an attempt failed:\n{attempt.stderr[-3000:]}")
      shutil.rmtree(crashed)
      continue
    kills.append(record)
  committed = committed_steps(crashed)
  last = Attempt(crashed)
  last.run()
  if last.process.returncode != 0:
    sys.exit(f"error: the last attempt failed:\n{last.stderr[-3000:]}")
  check_resume(last, committed)
  got, want = losses(crashed), losses(reference)
  if got != want:
    differ = sorted(s for s in set(got) | set(want) if got.get(s) != want.get(s))
    problems.append(f"logged losses differ from the uninterrupted run at steps {differ[:10]}")
  print(json.dumps({
      "kills": len(kills),
      "kills_during_checkpoint_write": sum(k["during_checkpoint_write"] for k in kills),
      "kill_steps": [k["step"] for k in kills], "num_steps": num_steps,
      "losses_equal": got == want, "problems": problems,
      "seconds": round(time.time() - start, 1)}))
  if problems:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
