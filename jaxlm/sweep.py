"""Ablation sweeps: a base config × a grid (or list) of overrides × seeds, one run per cell.

A sweep file (`configs/sweeps/NAME.py`) defines `get_sweep()` returning a dict:
  base       a config file path (relative to the sweep file) or a config dict/ConfigDict
  overrides  optional {dotted.key: value} applied to the base for every point
  grid       {dotted.key: [values, ...]}: every combination is a point, or
  points     [{dotted.key: value, ..., "name": optional}]: each entry is a point
  seeds      optional list of ints (default [0]); each point runs once per seed
  name       optional (default: the file's name)
  optimum    optional {"of": dotted.key, "per": dotted.key, "panels": optional dotted.key}: the
             report adds the best value of `of` (lowest mean validation loss) for each value of
             `per` (in each panel), how far apart those optima lie, and `optimum.png` (validation
             loss against `of`, a line per `per` value, a panel per `panels` value): e.g. the
             learning rate per width, under each parametrization (configs/sweeps/mup_width.py)

`load` validates every run's config before anything runs or is written. Every run is an
ordinary pretraining run directory `WORKDIR/POINT/seed_S` (trained by `jaxlm.pretrain.train`, the
code path of `experiments.pretrain`), so resume, checkpoints and metrics behave as there.
`execute` runs the unfinished ones in worker processes (finished runs are skipped, interrupted
ones resume from their checkpoints, a failing run is recorded and the rest go on); `write_report`
summarises them as `report.md` and `curves.png`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_collections
import numpy as np

from jaxlm import config as config_lib
from jaxlm import files
from jaxlm.errors import UserError

PLAN_FILE = "sweep.json"


class SweepError(UserError):
  """The sweep file or sweep directory cannot be used as asked; the message says why."""


@dataclasses.dataclass(frozen=True)
class Cell:
  """One (point, seed) cell: its overrides on top of the base and its resolved config."""
  point: str
  seed: int
  overrides: Mapping[str, Any]
  config: Mapping[str, Any]

  @property
  def name(self) -> str:
    return f"{self.point}/seed_{self.seed}"


@dataclasses.dataclass
class Plan:
  """A loaded sweep: the base config (resolved), its points in order, and every run."""
  name: str
  source: str
  base: dict[str, Any]
  points: list[tuple[str, dict[str, Any]]]
  seeds: list[int]
  runs: list[Cell]
  optimum: dict[str, str] | None = None  # the spec's `optimum` (of, per, panels)

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "source": self.source, "base": self.base,
            "points": [{"name": n, "overrides": o} for n, o in self.points],
            "seeds": self.seeds, "runs": [dataclasses.asdict(r) for r in self.runs],
            "optimum": self.optimum}

  @classmethod
  def from_json(cls, value: Mapping[str, Any]) -> "Plan":
    return cls(value["name"], value["source"], value["base"],
               [(p["name"], p["overrides"]) for p in value["points"]], value["seeds"],
               [Cell(**r) for r in value["runs"]], value.get("optimum"))


# -- loading ---------------------------------------------------------------------------------
def _base_config(base: Any, sweep_path: str) -> dict[str, Any]:
  if isinstance(base, str):
    path = base if os.path.isabs(base) else os.path.join(os.path.dirname(sweep_path), base)
    module = config_lib.import_python_file(os.path.normpath(path),
                                           f"sweep {sweep_path}: base config file")
    if not hasattr(module, "get_config"):
      raise SweepError(f"sweep {sweep_path}: base config file {path} defines no get_config().")
    return config_lib.plain(module.get_config())
  if isinstance(base, (Mapping, ml_collections.ConfigDict)):
    return config_lib.plain(base)
  raise SweepError(f"sweep {sweep_path}: 'base' must be a config file path or a config dict, "
                   f"got {type(base).__name__}.")


def _value_text(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (list, tuple)):
    return "+".join(_value_text(v) for v in value)
  return str(value)


def point_name(overrides: Mapping[str, Any]) -> str:
  """'positional-rope' for {'model.positional': 'rope'}; keys joined by '_'."""
  return "_".join(f"{k.rpartition('.')[2]}-{_value_text(v)}" for k, v in overrides.items())


def expand_points(spec: Mapping[str, Any], where: str) -> list[tuple[str, dict[str, Any]]]:
  """[(name, {dotted.key: value})] from the spec's `grid` (all combinations) or `points`."""
  if ("grid" in spec) == ("points" in spec):
    raise SweepError(f"{where}: define exactly one of 'grid' ({{key: [values]}}) or 'points' "
                     f"([{{key: value}}]).")
  if "grid" in spec:
    grid = spec["grid"]
    if not isinstance(grid, Mapping) or not grid:
      raise SweepError(f"{where}: 'grid' must be a non-empty dict {{dotted.key: [values]}}.")
    for key, values in grid.items():
      if not isinstance(values, (list, tuple)) or not values:
        raise SweepError(f"{where}: grid['{key}'] must be a non-empty list of values.")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    points = [(point_name(c), c) for c in combos]
  else:
    entries = spec["points"]
    if not isinstance(entries, (list, tuple)) or not entries:
      raise SweepError(f"{where}: 'points' must be a non-empty list of {{dotted.key: value}}.")
    points = []
    for i, entry in enumerate(entries):
      if not isinstance(entry, Mapping):
        raise SweepError(f"{where}: points[{i}] must be a dict {{dotted.key: value}}.")
      overrides = {k: v for k, v in entry.items() if k != "name"}
      points.append((str(entry.get("name") or point_name(overrides) or f"point{i}"), overrides))
  names = [n for n, _ in points]
  for name in names:
    if names.count(name) > 1:
      raise SweepError(f"{where}: two points are both named '{name}'; give them distinct "
                       f"'name' entries.")
    if not name or name.startswith(".") or "/" in name or os.sep in name:
      raise SweepError(f"{where}: point name '{name}' cannot be a directory name; set 'name'.")
  return points


_SPEC_KEYS = ("base", "overrides", "grid", "points", "seeds", "name", "optimum")
_OPTIMUM_KEYS = ("of", "per", "panels")


def config_value(config: Mapping[str, Any], dotted: str) -> Any:
  """config['a']['b'] for 'a.b'; KeyError if absent."""
  node: Any = config
  for part in dotted.split("."):
    if not isinstance(node, Mapping) or part not in node:
      raise KeyError(dotted)
    node = node[part]
  return node


def _check_optimum(spec: Any, base: Mapping[str, Any], path: str) -> dict[str, str] | None:
  if spec is None:
    return None
  where = f"sweep file {path}: 'optimum'"
  if not isinstance(spec, Mapping) or not {"of", "per"} <= set(spec) \
      or set(spec) - set(_OPTIMUM_KEYS):
    raise SweepError(f"{where} must be a dict with 'of' and 'per' (and optionally 'panels'): "
                     f"dotted config keys, e.g. {{'of': 'optim.learning_rate', "
                     f"'per': 'model.embed_dim'}}.")
  for role, key in spec.items():
    try:
      config_value(base, str(key))
    except KeyError:
      raise SweepError(f"{where}: {role}={key!r} is not a config key (e.g. "
                       f"optim.learning_rate).") from None
  return {role: str(key) for role, key in spec.items()}


def load(path: str) -> Plan:
  """Reads and validates a sweep file: every run's config is checked here."""
  try:
    return _load(path)
  except config_lib.ConfigError as e:
    raise SweepError(str(e)) from None


def _load(path: str) -> Plan:
  module = config_lib.import_python_file(path, "sweep file")
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"sweep file {path} defines no get_sweep(); see configs/sweeps/*.py.")
  spec = module.get_sweep()
  if isinstance(spec, ml_collections.ConfigDict):
    spec = spec.to_dict()
  if not isinstance(spec, Mapping):
    raise SweepError(f"sweep file {path}: get_sweep() must return a dict, got "
                     f"{type(spec).__name__}.")
  unknown = sorted(set(spec) - set(_SPEC_KEYS))
  if unknown:
    raise SweepError(f"sweep file {path}: unknown key(s) {', '.join(unknown)}; known: "
                     f"{', '.join(_SPEC_KEYS)}.")
  if "base" not in spec:
    raise SweepError(f"sweep file {path}: 'base' is missing (a config file path or dict).")
  values = _base_config(spec["base"], path)  # (its errors name the sweep and the base file)
  try:  # a partial base (file or dict) is completed with the schema's defaults
    base = config_lib.to_dict(config_lib.from_dict(values))
  except config_lib.ConfigError as e:
    raise SweepError(f"sweep {path}: base config: {e}") from None
  base = config_lib.apply_overrides(base, spec.get("overrides") or {}, f"sweep {path}: overrides")
  seeds = list(spec.get("seeds", [0]))
  if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
      or len(set(seeds)) != len(seeds):
    raise SweepError(f"sweep file {path}: 'seeds' must be a non-empty list of distinct "
                     f"integers, got {spec.get('seeds')!r}.")
  try:
    base = config_lib.to_dict(config_lib.validate(base))
  except config_lib.ConfigError as e:
    raise SweepError(f"sweep {path}: base config: {e}") from None
  points = expand_points(spec, f"sweep file {path}")
  runs = []
  for name, overrides in points:
    where = f"sweep {path}: point '{name}'"
    if "seed" in overrides:
      raise SweepError(f"{where}: set seeds with the sweep's 'seeds' list, not per point.")
    values = config_lib.apply_overrides(base, overrides, where)
    for seed in seeds:
      try:
        config = config_lib.to_dict(config_lib.validate({**values, "seed": seed}))
      except config_lib.ConfigError as e:
        raise SweepError(f"{where}: {e}") from None
      runs.append(Cell(name, seed, config_lib.plain(overrides), config))
  name = str(spec.get("name") or os.path.splitext(os.path.basename(path))[0])
  return Plan(name, os.path.abspath(path), base,
              [(n, config_lib.plain(o)) for n, o in points], seeds, runs,
              _check_optimum(spec.get("optimum"), base, path))


# -- state of a sweep directory --------------------------------------------------------------
def run_dir(workdir: str, run: Cell) -> str:
  return os.path.join(workdir, run.point, f"seed_{run.seed}")


def log_path(workdir: str, run: Cell) -> str:
  return os.path.join(workdir, run.point, f"seed_{run.seed}.log")


def is_finished(workdir: str, run: Cell) -> bool:
  summary = files.read_json(os.path.join(run_dir(workdir, run), "summary.json"))
  return bool(summary and summary.get("finished")
              and summary.get("step") == run.config["train"]["num_steps"])


def load_state(workdir: str) -> dict[str, Any]:
  """sweep.json: the plan and each run's status ({'status', 'error', 'seconds'})."""
  return files.read_json(os.path.join(workdir, PLAN_FILE)) or {}


def saved_plan(workdir: str) -> Plan | None:
  state = load_state(workdir)
  return Plan.from_json(state["plan"]) if state.get("plan") else None


def _save_state(workdir: str, plan: Plan, statuses: Mapping[str, Any], parallel: int) -> None:
  files.write_json(os.path.join(workdir, PLAN_FILE),
                   {"plan": plan.to_json(), "parallel": parallel, "runs": dict(statuses)})


def check_workdir(plan: Plan, workdir: str) -> None:
  """Refuses a sweep directory whose existing runs came from different configs."""
  from jaxlm import run as run_lib  # (jax is imported only where a run is prepared)
  run_lib.check_writable(workdir)
  saved = saved_plan(workdir)
  if saved is not None and saved.name != plan.name:  # (by name: a checkout may move)
    raise SweepError(f"{workdir} holds sweep '{saved.name}' ({saved.source}), not "
                     f"'{plan.name}'; rerun that file (edits of it resume), or use a new "
                     f"--workdir. Nothing was run.")
  for run in plan.runs:
    saved = run_lib.saved_config(run_dir(workdir, run))
    if saved is not None:
      bad = run_lib.incompatible_keys(saved, run.config)
      if bad:
        raise SweepError(
            f"{run_dir(workdir, run)} holds a run with a different {', '.join(bad[:4])} than "
            f"point '{run.point}' of {plan.source} now defines; use a new --workdir (or undo "
            f"the change). Nothing was run.")


def prepare_inputs(plan: Plan, workdir: str, log: Callable[[str], None]) -> None:
  """Checks every unfinished run's inputs (corpus, tokenizer, mesh, batch) and builds the shared
  caches (tokenizers, token arrays, the CPU peak-FLOP/s probe) once, here, so that runs started
  in parallel do not race to build them and a bad input stops the sweep before it starts."""
  from jaxlm import metrics, pretrain
  seen_data = set()
  for run in plan.runs:
    if is_finished(workdir, run):
      continue
    config = config_lib.validate(run.config)
    key = json.dumps([run.config["data"], run.config["model"]["vocab_size"],
                      run.config["model"]["dtype"], run.config["mesh"]], sort_keys=True)
    if key in seen_data:
      continue
    seen_data.add(key)
    log(f"checking inputs of {run.name} (and every run sharing its data)")
    pretrain.prepare(config, run_dir(workdir, run))
    metrics.peak_flops(config.model.dtype, config.data.data_dir)


def _error_line(lines: Iterable[str]) -> str:
  """The line of a process's output that says what went wrong: its last `error: ...` line (a
  UserError), or its last line (a traceback's)."""
  lines = [line.strip() for line in lines if line.strip()]
  errors = [line for line in lines if line.startswith("error:")]
  return (errors or lines or ["no output"])[-1]


def _last_error(log_file: str) -> str:
  """The error line of a worker's log file."""
  if not os.path.exists(log_file):
    return "no log"
  with open(log_file, errors="replace") as f:
    return _error_line(f)


@dataclasses.dataclass
class _Active:
  run: Cell
  process: subprocess.Popen
  started: float


def run_input_check(command: Sequence[str], log: Callable[[str], None]) -> None:
  """Runs `command`, a process that checks the inputs (`prepare_inputs`) and exits, passing its
  output on as it comes; SweepError with its `error:` line if it fails."""
  lines = []
  with subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, errors="replace") as process:
    for line in process.stdout:
      lines.append(line)
      if line.strip() and not line.startswith("error:"):
        log(line.rstrip())
  if process.returncode:
    raise SweepError(_error_line(lines).removeprefix("error: "))


def execute(plan: Plan, workdir: str, command: Callable[[Cell], Sequence[str]], *,
            check_command: Sequence[str], parallel: int = 1,
            log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs every unfinished run of `plan` as `command(run)` (a worker process that trains
  `run_dir(workdir, run)`), at most `parallel` at a time. Returns the statuses by run name.

  check_command: a process that runs `prepare_inputs` and exits, started first if any run is
  unfinished. The checks build the mesh and compile a step, which claims the accelerators: in a
  process of their own they free them before the workers start, while this one never touches a
  device (a TPU opens in one process at a time; a GPU process preallocates most of the memory).
  SIGTERM or Ctrl-C stops launching, asks the workers to checkpoint and exit (SIGTERM), waits
  for them and returns: rerunning resumes.
  """
  if parallel < 1:
    raise SweepError(f"--parallel={parallel}: must be at least 1.")
  check_workdir(plan, workdir)
  previous = load_state(workdir).get("runs", {})
  statuses: dict[str, Any] = {}
  pending = []
  for run in plan.runs:
    status = dict(previous.get(run.name, {}))
    if is_finished(workdir, run):
      status.update(status="finished", error=None)
    else:
      status["status"] = "pending"
      pending.append(run)
    statuses[run.name] = status
  skipped = len(plan.runs) - len(pending)
  if skipped:
    log(f"{skipped} of {len(plan.runs)} runs already finished; skipping them.")
  if pending:
    run_input_check(check_command, log)
  os.makedirs(workdir, exist_ok=True)
  _save_state(workdir, plan, statuses, parallel)

  stopping = []
  def on_signal(signum, frame):
    if not stopping:
      log(f"{signal.Signals(signum).name}: stopping; running runs checkpoint and exit (rerun "
          f"with the same --workdir to resume).")
    stopping.append(signum)
    for active in running:
      if active.process.poll() is None:
        active.process.send_signal(signal.SIGTERM)
  running: list[_Active] = []
  handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    while pending or running:
      while pending and len(running) < parallel and not stopping:
        run = pending.pop(0)
        path = log_path(workdir, run)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        resumed = os.path.isdir(os.path.join(run_dir(workdir, run), "checkpoints"))
        log(f"{'resuming' if resumed else 'starting'} {run.name}")
        if not resumed:  # wall time and attempts count from the start of this run's training
          for key in ("seconds", "attempts"):
            statuses[run.name].pop(key, None)
        with open(path, "a") as log_file:  # the worker writes to its own copy
          # A new session: a terminal's Ctrl-C reaches only the sweep, which forwards SIGTERM.
          process = subprocess.Popen(list(command(run)), stdout=log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        running.append(_Active(run, process, time.time()))
      if stopping and not running:
        break
      time.sleep(0.2)
      for active in [a for a in running if a.process.poll() is not None]:
        code = active.process.returncode
        running.remove(active)
        seconds = time.time() - active.started
        status = statuses[active.run.name]
        status["seconds"] = status.get("seconds", 0.0) + seconds
        status["attempts"] = status.get("attempts", 0) + 1
        if code == 0 and is_finished(workdir, active.run):
          status.update(status="finished", error=None)
          log(f"finished {active.run.name} in {seconds:.0f}s")
        elif code == 0 or stopping:
          status.update(status="interrupted", error=None)
          log(f"interrupted {active.run.name}; its checkpoint resumes on the next run")
        else:
          status.update(status="failed", error=_last_error(log_path(workdir, active.run)))
          log(f"FAILED {active.run.name} (exit {code}): {status['error']} "
              f"(log: {log_path(workdir, active.run)})")
        _save_state(workdir, plan, statuses, parallel)
  finally:
    for sig, handler in handlers.items():
      signal.signal(sig, handler)
    for active in running:  # only on an unexpected exception in this loop
      active.process.terminate()
  return statuses  # (sweep.json is saved each time a run ends)


# -- report ----------------------------------------------------------------------------------
def _mean_std(values: Sequence[float], digits: int) -> str:
  if not values:
    return "–"
  mean = float(np.mean(values))
  if len(values) == 1:
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {float(np.std(values, ddof=1)):.{digits}f}"


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _records(workdir: str, run: Cell) -> list[dict[str, Any]]:
  from jaxlm import metrics
  return metrics.read_jsonl(os.path.join(run_dir(workdir, run), "metrics.jsonl"))


def final_train_loss(records: Sequence[Mapping[str, Any]], num_steps: int) -> float | None:
  """Mean train loss of the steps logged in the last 10% of training (at least the last one):
  one step's loss is a single batch's, too noisy to compare runs by."""
  logged = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
  if not logged:
    return None
  tail = [loss for step, loss in logged if step > 0.9 * num_steps] or [logged[-1][1]]
  return float(np.mean(tail))


def _overrides_text(overrides: Mapping[str, Any], empty: str) -> str:
  return ", ".join(f"`{k}={_value_text(v)}`" for k, v in overrides.items()) or empty


def point_results(plan: Plan, workdir: str) -> list[dict[str, Any]]:
  """Per point: the finished seeds' final numbers and the failed/unfinished runs."""
  statuses = load_state(workdir).get("runs", {})
  results = []
  for name, overrides in plan.points:
    runs = [r for r in plan.runs if r.point == name]
    finished, problems, summaries, seconds = [], [], [], []
    for run in runs:
      status = statuses.get(run.name, {})
      if is_finished(workdir, run):
        finished.append(run)
        summary = files.read_json(os.path.join(run_dir(workdir, run), "summary.json"))
        summary["final_train_loss"] = final_train_loss(_records(workdir, run),
                                                       run.config["train"]["num_steps"])
        summaries.append(summary)
        if status.get("seconds"):
          seconds.append(status["seconds"])
      else:
        problems.append((run, status.get("status", "not run"), status.get("error")))
    results.append({"point": name, "overrides": overrides, "runs": runs, "finished": finished,
                    "problems": problems, "summaries": summaries, "seconds": seconds})
  return results


def write_report(plan: Plan, workdir: str) -> tuple[str, str]:
  """Writes report.md (a row per point, mean ± std over seeds) and curves.png; returns paths."""
  results = point_results(plan, workdir)
  parallel = load_state(workdir).get("parallel", 1)
  defaults = config_lib.to_dict(config_lib.validate(config_lib.Config()))  # paths expanded too
  base_diff = config_lib.diff(defaults, plan.base)
  eval_losses = {r["point"]: float(np.mean([s["eval_loss"] for s in r["summaries"]]))
                 for r in results if r["summaries"]}
  best = min(eval_losses, key=eval_losses.get) if eval_losses else None
  source = os.path.relpath(plan.source)  # (relative to here if under it, else absolute)
  source = plan.source if source.startswith("..") else source
  lines = [f"# Sweep `{plan.name}`", "",
           f"Sweep file `{source}`; {len(plan.points)} points × "
           f"{len(plan.seeds)} seeds ({', '.join(map(str, plan.seeds))}); losses are in nats "
           f"per token, mean ± std over finished seeds: the final validation loss and the train "
           f"loss of the steps logged in the last 10% of training; tokens/s is the median of "
           f"each run's logged steps, averaged over seeds; wall time per run includes start-up "
           f"and compilation"
           + (f" (runs shared the machine, {parallel} at a time)" if parallel > 1 else "") + ".",
           "",
           "Base config (differences from the schema defaults): "
           + _overrides_text({k: v["to"] for k, v in base_diff.items()}, "none") + ".", "",
           "| point | params | seeds | train loss | validation loss | validation bits/byte "
           "| tokens/s | wall time | config diff |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for r in results:
    s = r["summaries"]
    params = f"{s[0]['num_params']:,}" if s else "–"
    speed = (f"{np.mean([x['median_tokens_per_second'] for x in s]):,.0f}" if s else "–")
    wall = _duration(float(np.mean(r["seconds"]))) if r["seconds"] else "–"
    name = f"**{r['point']}**" if r["point"] == best and len(results) > 1 else r["point"]
    lines.append(
        f"| {name} | {params} | {len(r['finished'])}/{len(r['runs'])} "
        f"| {_mean_std([x['final_train_loss'] for x in s], 3)} "
        f"| {_mean_std([x['eval_loss'] for x in s], 3)} "
        f"| {_mean_std([x['eval_bits_per_byte'] for x in s], 3)} "
        f"| {speed} | {wall} | {_overrides_text(r['overrides'], '(base)')} |")
  problems = [p for r in results for p in r["problems"]]
  if problems:
    lines += ["", "## Runs that did not finish", ""]
    for run, status, error in problems:
      lines.append(f"- `{run.name}`: {status}" + (f": {error}" if error else "")
                   + f" (log: `{run.point}/seed_{run.seed}.log`)")
  if best is not None and len(results) > 1:
    lines += ["", "Lowest mean validation loss in bold. Curves: `curves.png`."]
  eval_sets = {r["point"]: _eval_set(r["runs"][0].config) for r in results}
  if len(set(eval_sets.values())) > 1:  # e.g. a sweep over the batch size
    lines += ["", "The points may have been validated on different samples of the held-out "
              "split (up to train.eval_batches × global_batch_size windows × data.seq_len tokens: "
              + ", ".join(f"{p} {s}" for p, s in eval_sets.items()) + "); to compare them on "
              "one set, score each run with `python -m experiments.evaluate "
              "--workdir=RUN --split=validation`."]
  if plan.optimum:
    lines += ["", *optimum_section(plan, results, workdir)]
  report = os.path.join(workdir, "report.md")
  files.write_bytes(report, ("\n".join(lines) + "\n").encode("utf-8"))
  curves = os.path.join(workdir, "curves.png")
  plot_curves(plan, workdir, results, curves)
  return report, curves


def _eval_set(config: Mapping[str, Any]) -> str:
  """The in-training validation set of a run's config, as "windows×tokens"."""
  t = config["train"]
  return f"{t['eval_batches'] * t['global_batch_size']}×{config['data']['seq_len']}"


def plot_curves(plan: Plan, workdir: str, results: list[dict[str, Any]], path: str) -> None:
  """Validation loss against tokens seen: one line per point (mean over its finished seeds)
  with a band from the lowest to the highest seed."""
  from jaxlm import metrics
  fig, ax = metrics.new_figure((7.5, 4.8))
  for r in results:
    curves = []
    for run in r["finished"]:
      tokens_per_step = run.config["train"]["global_batch_size"] * run.config["data"]["seq_len"]
      curves.append({rec["step"] * tokens_per_step: rec["eval_loss"]
                     for rec in _records(workdir, run) if "eval_loss" in rec})
    if not curves:
      continue
    tokens = sorted(set.intersection(*(set(c) for c in curves)))
    values = np.array([[c[t] for t in tokens] for c in curves])  # [seeds, evals]
    line, = ax.plot(tokens, values.mean(0), marker="o", markersize=3, label=r["point"])
    if len(curves) > 1:
      ax.fill_between(tokens, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
  ax.set_xlabel("tokens seen")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title(f"sweep {plan.name}: mean over seeds {plan.seeds}, band = min–max")
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def optima(plan: Plan, results: list[dict[str, Any]]) -> dict[Any, dict[Any, dict[Any, float]]]:
  """{panel value: {per value: {of value: mean validation loss}}} over the finished points
  (one panel, None, without 'panels')."""
  spec = plan.optimum or {}
  table: dict[Any, dict[Any, dict[Any, float]]] = {}
  for r in results:
    if not r["summaries"]:
      continue
    config = r["runs"][0].config
    panel = config_value(config, spec["panels"]) if spec.get("panels") else None
    per = table.setdefault(panel, {}).setdefault(config_value(config, spec["per"]), {})
    per[config_value(config, spec["of"])] = float(np.mean([s["eval_loss"]
                                                           for s in r["summaries"]]))
  return table


def optimum_section(plan: Plan, results: list[dict[str, Any]], workdir: str) -> list[str]:
  """The report's lines on where `of` is best per `per` (and panel), with `optimum.png`."""
  spec = plan.optimum or {}
  of, per = spec["of"], spec["per"]
  table = optima(plan, results)
  lines = [f"## Best `{of}` per `{per}`", "",
           f"The value of `{of}` with the lowest mean validation loss at each `{per}`"
           + (f", for each `{spec['panels']}`" if spec.get("panels") else "")
           + "; spread = the largest optimum / the smallest. Plot: `optimum.png`.", "",
           "| " + (f"{spec['panels']} | " if spec.get("panels") else "")
           + f"{per} | best {of} | its validation loss | spread |",
           "|" + ("---|" if spec.get("panels") else "") + "---:|---:|---:|---:|"]
  for panel, curves in table.items():
    best = {p: min(losses, key=losses.get) for p, losses in curves.items()}
    numeric = [b for b in best.values() if isinstance(b, (int, float)) and b > 0]
    spread = (f"{max(numeric) / min(numeric):.2g}x" if len(numeric) == len(best) and numeric
              else "–")
    for i, (p, b) in enumerate(sorted(best.items(), key=lambda kv: kv[0])):
      lines.append("| " + (f"{_value_text(panel)} | " if spec.get("panels") else "")
                   + f"{_value_text(p)} | {_value_text(b)} | {curves[p][b]:.3f} | "
                   + (spread if i == 0 else "") + " |")
  plot_optimum(plan, table, os.path.join(workdir, "optimum.png"))
  return lines


def plot_optimum(plan: Plan, table: Mapping[Any, Mapping[Any, Mapping[Any, float]]],
                 path: str) -> None:
  """Validation loss against `of` (log scale when numeric and positive), a line per `per`
  value with its optimum marked, a panel per `panels` value on one loss axis."""
  from jaxlm import metrics
  spec = plan.optimum or {}
  panels = list(table)
  fig, axes = metrics.new_figure((5.0 * max(len(panels), 1), 4.2), max(len(panels), 1))
  axes = list(np.atleast_1d(axes))
  for ax, panel in zip(axes, panels):
    for p, losses in sorted(table[panel].items(), key=lambda kv: kv[0]):
      xs = sorted(losses)
      line, = ax.plot(xs, [losses[x] for x in xs], marker="o", markersize=3,
                      label=f"{spec['per'].rpartition('.')[2]}={_value_text(p)}")
      best = min(losses, key=losses.get)
      ax.plot([best], [losses[best]], marker="*", markersize=12, color=line.get_color())
    if all(isinstance(x, (int, float)) and x > 0 for c in table[panel].values() for x in c):
      ax.set_xscale("log")
    ax.set_xlabel(spec["of"])
    ax.set_title(f"{spec['panels']}={_value_text(panel)}" if spec.get("panels")
                 else f"sweep {plan.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylabel("validation loss (nats/token)")
  if len(axes) > 1:  # one loss scale, so the panels compare
    low = min(ax.get_ylim()[0] for ax in axes)
    high = max(ax.get_ylim()[1] for ax in axes)
    for ax in axes:
      ax.set_ylim(low, high)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
