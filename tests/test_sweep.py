"""Sweeps: loading and checking sweep files, the shipped sweeps, and the runner end to end
(parallel runs, a failing point, SIGTERM then resume, skipping finished runs, the report)."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time

import pytest

from jaxlm import sweep
from tests.conftest import FAST_COMPILE_XLA_FLAGS, REPO

SHIPPED = {"positional": 4, "norm_mlp": 2, "tying": 2, "depth_width": 4}


def write_sweep(tmp_path, body: str, name: str = "s.py") -> str:
  path = tmp_path / name
  path.write_text(textwrap.dedent(body))
  return str(path)


# Runs the sweep CLI; the file argv[1] says whether its process initialized a JAX backend.
BACKEND_PROBE = """
import runpy, sys
from jax._src import xla_bridge
probe, sys.argv = sys.argv[1], ["experiments.sweep", *sys.argv[2:]]
def initialized(backend):
  with open(probe, "w") as f:
    f.write(f"initialized {backend.platform}")
with open(probe, "w") as f:
  f.write("none")
xla_bridge.register_backend_initialization_hook(initialized)
runpy.run_module("experiments.sweep", run_name="__main__", alter_sys=True)
"""


def run_sweep(args, backend_probe=None, **kwargs):
  """The sweep CLI as a process; backend_probe: a file that gets whether its (parent) process
  initialized a JAX backend."""
  # The runs are 8 steps: compile time dominates, so compile fast (tests/conftest.py).
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)
  command = (["-c", BACKEND_PROBE, str(backend_probe)] if backend_probe
             else ["-m", "experiments.sweep"])
  return subprocess.Popen([sys.executable, *command, *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finish(process, timeout=900):
  out, err = process.communicate(timeout=timeout)
  return process.returncode, out, err


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_sweeps_load_with_every_run_validated(name):
  plan = sweep.load(os.path.join(REPO, "configs", "sweeps", f"{name}.py"))
  assert len(plan.points) == SHIPPED[name]
  assert len(plan.runs) == SHIPPED[name] * len(plan.seeds) and len(plan.seeds) >= 2
  # Every point differs from the base only where its overrides say (plus the seed).
  for run in plan.runs:
    changed = {k for k in sweep.config_lib.diff(plan.base, run.config)}
    assert changed <= set(run.overrides) | {"seed"}, (run.name, changed)
    assert run.config["data"]["corpus"] == "pystdlib"  # CPU-sized on the default corpus


def test_depth_width_points_have_about_equal_non_embedding_parameters():
  from jaxlm import config as config_lib
  from jaxlm.model import param_count
  plan = sweep.load(os.path.join(REPO, "configs", "sweeps", "depth_width.py"))
  counts = []
  for name, _ in plan.points:
    model = config_lib.validate(next(r for r in plan.runs if r.point == name).config).model
    counts.append(param_count(model) - model.vocab_size * model.embed_dim)
  assert max(counts) < 1.2 * min(counts), counts


def test_grid_is_every_combination_in_order(tmp_path):
  path = write_sweep(tmp_path, """
      def get_sweep():
        return {"base": {"train": {"num_steps": 7}},
                "overrides": {"model.num_layers": 1},
                "grid": {"model.positional": ["learned", "rope"],
                         "model.tie_embeddings": [True, False]},
                "seeds": [3, 5]}
      """)
  plan = sweep.load(path)
  assert [n for n, _ in plan.points] == [
      "positional-learned_tie_embeddings-true", "positional-learned_tie_embeddings-false",
      "positional-rope_tie_embeddings-true", "positional-rope_tie_embeddings-false"]
  run = plan.runs[-1]
  assert run.name == "positional-rope_tie_embeddings-false/seed_5"
  assert run.config["seed"] == 5 and run.config["model"]["num_layers"] == 1
  assert run.config["model"]["tie_embeddings"] is False
  assert run.config["train"]["num_steps"] == 7  # the base's own values survive


def test_points_with_names_and_a_base_file_relative_to_the_sweep(tmp_path):
  (tmp_path / "base.py").write_text(textwrap.dedent("""
      from jaxlm.config import default_config_dict
      def get_config():
        config = default_config_dict()
        config.model.num_layers = 3
        return config
      """))
  (tmp_path / "sweeps").mkdir()
  path = write_sweep(tmp_path / "sweeps", """
      def get_sweep():
        return {"base": "../base.py",
                "points": [{"name": "wide", "model.embed_dim": 512}, {"model.mlp": "swiglu"}]}
      """)
  plan = sweep.load(path)
  assert [n for n, _ in plan.points] == ["wide", "mlp-swiglu"]
  assert plan.seeds == [0]
  assert [r.config["model"]["num_layers"] for r in plan.runs] == [3, 3]
  assert plan.runs[0].config["model"]["embed_dim"] == 512


@pytest.mark.parametrize("body, message", [
    ("def get_sweep():\n  return {'base': {}, 'grid': {'model.num_layerz': [1, 2]}}\n",
     "point 'num_layerz-1': unknown config key 'model.num_layerz'; did you mean "
     "model.num_layers?"),
    ("def get_sweep():\n  return {'base': {}, 'points': [{'name': 'odd', 'model.num_heads': 3}]}\n",
     "point 'odd': model.num_heads=3 does not divide model.embed_dim=256"),
    ("def get_sweep():\n  return {'base': {}, 'grid': {'model.positional': ['rope']},"
     " 'points': []}\n", "define exactly one of 'grid'"),
    ("def get_sweep():\n  return {'base': {}, 'grid': {'model.positional': []}}\n",
     "grid['model.positional'] must be a non-empty list"),
    ("def get_sweep():\n  return {'base': {}, 'grid': {'seed': [1]}, 'seeds': [0]}\n",
     "set seeds with the sweep's 'seeds' list"),
    ("def get_sweep():\n  return {'base': {}, 'grid': {'model.positional': ['rope']},"
     " 'seeds': [1, 1]}\n", "'seeds' must be a non-empty list of distinct integers"),
    ("def get_sweep():\n  return {'base': {}, 'points': [{'name': 'a'}, {'name': 'a'}]}\n",
     "two points are both named 'a'"),
    ("def get_sweep():\n  return {'grid': {'model.positional': ['rope']}}\n", "'base' is missing"),
    ("def get_sweep():\n  return {'base': {}, 'gird': {}}\n", "unknown key(s) gird"),
    ("def get_sweep():\n  return {'base': 'nope.py', 'grid': {'model.positional': ['rope']}}\n",
     "nope.py does not exist"),
    ("def get_sweep():\n  return {'base': {}, 'grid': {'model.positional': ['rope']},"
     " 'optimum': {'of': 'optim.learning_rate'}}\n",
     "'optimum' must be a dict with 'of' and 'per'"),
    ("def get_sweep():\n  return {'base': {}, 'grid': {'model.positional': ['rope']},"
     " 'optimum': {'of': 'optim.lr', 'per': 'model.embed_dim'}}\n",
     "'optimum': of='optim.lr' is not a config key"),
    ("x = 1\n", "defines no get_sweep()"),
    ("def get_sweep(:\n", "cannot be loaded: SyntaxError"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, body, message):
  path = tmp_path / "bad.py"
  path.write_text(body)
  with pytest.raises(sweep.SweepError) as e:
    sweep.load(str(path))
  assert message in str(e.value) and "\n" not in str(e.value)
  assert str(e.value).count(str(path)) == 1  # named once (a missing base was named twice)


@pytest.mark.e2e
def test_cli_refuses_a_bad_sweep_before_writing_anything(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("def get_sweep():\n  return {'base': {}, 'grid': {'model.num_layerz': [1]}}\n")
  workdir = tmp_path / "out"
  code, out, err = finish(run_sweep([f"--sweep={path}", f"--workdir={workdir}"]), 300)
  assert code == 2, err
  assert err.strip().splitlines() == [
      f"error: sweep {path}: point 'num_layerz-1': unknown config key 'model.num_layerz'; did "
      f"you mean model.num_layers?"]
  assert not workdir.exists()
  code, _, err = finish(run_sweep([f"--workdir={workdir}"]), 300)
  assert code == 2 and "holds no sweep" in err and not workdir.exists()


# -- the runner, end to end --------------------------------------------------------------------
TINY = """
    def get_sweep():
      return {{
          "base": {{
              "model": {{"num_layers": 1, "num_heads": 2, "embed_dim": 32, "mlp_dim": 64,
                         "vocab_size": 512, "max_seq_len": 32}},
              "data": {{"corpus": "text_files", "files": "{files}", "seq_len": 32, "stride": 32,
                        "data_dir": "{cache}", "validation_fraction": 0.2}},
              "train": {{"num_steps": {steps}, "global_batch_size": 8, "log_every": 2,
                         "eval_every": {every}, "eval_batches": 2, "checkpoint_every": {every},
                         "sample_every": 0, "sample_max_new_tokens": 0,
                         "max_nonfinite_steps": 0}},
              "optim": {{"warmup_steps": 0}},
          }},
          "points": {points},
          "seeds": [0, 1],
      }}
    """


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """40 real Python files (the standard library's) as a user's text files."""
  root = tmp_path_factory.mktemp("corpus")
  sources = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
  for source in [s for s in sources if os.path.getsize(s) > 4000][:40]:
    shutil.copy(source, root / (os.path.basename(source) + ".txt"))
  return root


def tiny_sweep(tmp_path, corpus, points, steps=8, name="tiny.py", every=4):
  """every: steps between evaluations and between checkpoints. The corpus's data_dir (its
  prepared text and tokenizer) is the corpus fixture's, shared as on a user's machine."""
  return write_sweep(tmp_path, TINY.format(files=f"{corpus}/*.txt", cache=f"{corpus}.cache",
                                           steps=steps, points=points, every=every), name)


def report_rows(workdir) -> dict[str, list[str]]:
  rows = {}
  for line in (workdir / "report.md").read_text().splitlines():
    if line.startswith("| ") and not line.startswith("| point"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      rows[cells[0].strip("*")] = cells
  return rows


@pytest.mark.e2e
def test_cli_refuses_inputs_that_fail_their_check_before_writing_anything(tmp_path):
  # The checks run in their own process; their error is the sweep's one line, exit 2.
  path = tiny_sweep(tmp_path, tmp_path / "no_corpus", repr([{"name": "a"}]))
  workdir = tmp_path / "sweep"
  code, _, err = finish(run_sweep([f"--sweep={path}", f"--workdir={workdir}"]), 300)
  assert code == 2, err
  assert err.strip().splitlines()[-1].startswith("error: --config.data.files glob ")
  assert "matched no files" in err and "Traceback" not in err
  assert sum(line.startswith("error:") for line in err.splitlines()) == 1
  assert not workdir.exists()


@pytest.mark.e2e
def test_sweep_runs_in_parallel_keeps_going_past_a_failure_and_reports(tmp_path, corpus):
  points = [{"name": "learned", "model.positional": "learned"},
            # Diverges at once: with max_nonfinite_steps=0 the run stops with an error.
            {"name": "diverges", "optim.learning_rate": 1e30}]
  path = tiny_sweep(tmp_path, corpus, repr(points))
  workdir = tmp_path / "sweep"
  probe = tmp_path / "backend"
  code, out, err = finish(run_sweep([f"--sweep={path}", f"--workdir={workdir}",
                                     "--parallel=2"], backend_probe=probe))
  assert code == 1, err  # not every run finished
  assert "FAILED diverges/seed_0" in err and "training diverged" in err
  # The input checks ran in a process of their own: the sweep itself held no device the runs
  # needed (on a TPU host the runs could not open it; on a GPU they would lack memory).
  assert "checking inputs of learned/seed_0" in err
  assert probe.read_text() == "none"

  state = json.loads((workdir / "sweep.json").read_text())
  statuses = {name: s["status"] for name, s in state["runs"].items()}
  assert statuses == {"learned/seed_0": "finished", "learned/seed_1": "finished",
                      "diverges/seed_0": "failed", "diverges/seed_1": "failed"}
  assert "training diverged" in state["runs"]["diverges/seed_1"]["error"]
  assert "rerun to start over (no checkpoint was saved yet)" in state["runs"][
      "diverges/seed_1"]["error"]  # (not "the last checkpoint (step 0)")
  for seed in (0, 1):
    run = workdir / "learned" / f"seed_{seed}"
    assert json.loads((run / "summary.json").read_text())["step"] == 8
    assert json.loads((run / "config.json").read_text())["seed"] == seed
    diff = json.loads((run / "config_diff.json").read_text())
    assert set(diff) == {"model.positional"} | ({"seed"} if seed else set())
  # Different seeds, different runs.
  losses = [json.loads((workdir / "learned" / f"seed_{s}" / "summary.json").read_text())
            ["train_loss"] for s in (0, 1)]
  assert losses[0] != losses[1]

  rows = report_rows(workdir)
  assert list(rows) == ["learned", "diverges"]
  learned = rows["learned"]
  assert learned[2] == "2/2" and " ± " in learned[3] and " ± " in learned[4]
  finals = [json.loads((workdir / "learned" / f"seed_{s}" / "summary.json").read_text())
            ["eval_loss"] for s in (0, 1)]
  assert learned[4].startswith(f"{sum(finals) / 2:.3f}")
  assert learned[8] == "`model.positional=learned`"
  assert rows["diverges"][2] == "0/2"
  report = (workdir / "report.md").read_text()
  assert "`diverges/seed_0`: failed: " in report and "training diverged" in report
  assert (workdir / "curves.png").stat().st_size > 10_000
  assert out == report  # the table is printed too

  # Rerun: finished runs are skipped, the failing point is retried (and fails again).
  code, _, err = finish(run_sweep([f"--workdir={workdir}"]))
  assert code == 1
  assert "2 of 4 runs already finished; skipping them." in err
  assert "starting learned" not in err and "FAILED diverges/seed_0" in err

  # --report_only rewrites the report from the run directories without running anything.
  (workdir / "report.md").unlink()
  (workdir / "curves.png").unlink()
  code, out, err = finish(run_sweep([f"--workdir={workdir}", "--report_only"]), 300)
  assert code == 0, err
  assert report_rows(workdir) == rows and (workdir / "curves.png").exists()


@pytest.mark.e2e
def test_sigterm_stops_the_sweep_and_a_rerun_resumes_from_checkpoints(tmp_path, corpus):
  # 400 steps: long enough that SIGTERM lands mid-run; evaluations and checkpoints every 40
  # (the SIGTERM save needs none of them).
  path = tiny_sweep(tmp_path, corpus, repr([{"name": "only", "model.positional": "rope"}]),
                    steps=400, every=40)
  workdir = tmp_path / "sweep"
  process = run_sweep([f"--sweep={path}", f"--workdir={workdir}"])
  metrics = workdir / "only" / "seed_0" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline:  # wait until the first run has trained a few steps
    if metrics.exists() and sum(1 for _ in metrics.open()) >= 3:
      break
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  code, _, err = finish(process, 300)
  assert code == 1, err
  assert "interrupted only/seed_0" in err and "did not finish" in err
  state = json.loads((workdir / "sweep.json").read_text())
  assert state["runs"]["only/seed_0"]["status"] == "interrupted"
  assert state["runs"]["only/seed_1"]["status"] == "pending"  # never started
  summary = json.loads((workdir / "only" / "seed_0" / "summary.json").read_text())
  assert not summary["finished"] and 0 < summary["step"] < 400
  stopped_at = summary["step"]

  code, _, err = finish(run_sweep([f"--workdir={workdir}", "--parallel=2"]))
  assert code == 0, err
  assert "resuming only/seed_0" in err and "starting only/seed_1" in err
  log = (workdir / "only" / "seed_0.log").read_text()
  assert f"checkpoints/{stopped_at}" in log  # the second attempt restored that step
  for seed in (0, 1):
    steps = [json.loads(line)["step"] for line in
             (workdir / "only" / f"seed_{seed}" / "metrics.jsonl").open()
             if "train_loss" in json.loads(line)]
    assert steps == list(range(2, 401, 2))  # every logged step exactly once


def test_final_train_loss_averages_the_last_tenth_of_training():
  records = [{"step": s, "train_loss": float(s)} for s in range(10, 101, 10)]
  records.insert(3, {"step": 40, "eval_loss": 9.0})
  assert sweep.final_train_loss(records, 100) == 100.0  # only step 100 is past 90
  assert sweep.final_train_loss(records, 200) == 100.0  # unfinished: the last logged step
  assert sweep.final_train_loss(records[:5], 100) == 40.0
  assert sweep.final_train_loss([], 100) is None


def test_a_workdir_of_another_sweep_file_is_refused(tmp_path):
  body = """
      def get_sweep():
        return {"base": {"train": {"num_steps": 7}}, "grid": {"model.num_layers": [1]}}
      """
  first, other = write_sweep(tmp_path, body, "a.py"), write_sweep(tmp_path, body, "b.py")
  workdir = tmp_path / "sweep"
  sweep._save_state(str(workdir), sweep.load(first), {}, 1)  # what a started sweep leaves
  sweep.check_workdir(sweep.load(first), str(workdir))  # the same file (edits of it) resumes
  with pytest.raises(sweep.SweepError, match=r"holds sweep 'a' \(.*a\.py\), not 'b'; rerun "
                     r"that file"):
    sweep.check_workdir(sweep.load(other), str(workdir))


def test_the_report_says_when_points_were_validated_on_different_samples(tmp_path):
  """train.eval_batches batches of global_batch_size windows: a batch-size sweep validates each
  point on another sample of the held-out split, which the report now says."""
  path = write_sweep(tmp_path, "def get_sweep():\n  return {'base': {}, 'grid': "
                               "{'train.global_batch_size': [4, 8]}}\n")
  plan = sweep.load(path)
  report, _ = sweep.write_report(plan, str(tmp_path / "out"))
  text = open(report).read()
  assert ("validated on different samples of the held-out split" in text
          and "global_batch_size-4 32×256, global_batch_size-8 64×256" in text), text
  same = sweep.load(write_sweep(tmp_path, "def get_sweep():\n  return {'base': {}, 'grid': "
                                          "{'optim.learning_rate': [1e-3, 2e-3]}}\n", "lr.py"))
  report, _ = sweep.write_report(same, str(tmp_path / "lr"))
  assert "different samples" not in open(report).read()


def test_the_report_finds_the_best_value_per_width_in_each_panel(tmp_path):
  """A sweep's `optimum`: the best learning rate per width and parametrization, the spread of
  those optima, and optimum.png; from the runs' summaries (written here as finished runs)."""
  path = write_sweep(tmp_path, textwrap.dedent("""
      def get_sweep():
        return {"base": {"model": {"mup_base_width": 64}},
                "grid": {"model.parametrization": ["standard", "mup"],
                         "model.embed_dim": [64, 128], "optim.learning_rate": [1e-3, 4e-3]},
                "optimum": {"of": "optim.learning_rate", "per": "model.embed_dim",
                            "panels": "model.parametrization"}}
      """))
  plan = sweep.load(path)
  workdir = tmp_path / "out"
  # Standard: the best rate halves... here 4e-3 at 64 and 1e-3 at 128; muP: 4e-3 at both.
  losses = {("standard", 64, 1e-3): 5.0, ("standard", 64, 4e-3): 4.0,
            ("standard", 128, 1e-3): 3.5, ("standard", 128, 4e-3): 3.9,
            ("mup", 64, 1e-3): 5.0, ("mup", 64, 4e-3): 4.0,
            ("mup", 128, 1e-3): 4.5, ("mup", 128, 4e-3): 3.6}
  for run in plan.runs:
    model, optim = run.config["model"], run.config["optim"]
    loss = losses[(model["parametrization"], model["embed_dim"], optim["learning_rate"])]
    os.makedirs(sweep.run_dir(str(workdir), run))
    with open(os.path.join(sweep.run_dir(str(workdir), run), "summary.json"), "w") as f:
      json.dump({"finished": True, "step": run.config["train"]["num_steps"], "eval_loss": loss,
                 "eval_bits_per_byte": loss / 3, "num_params": 1,
                 "median_tokens_per_second": 1.0}, f)
    with open(os.path.join(sweep.run_dir(str(workdir), run), "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": run.config["train"]["num_steps"], "train_loss": loss}) + "\n")
  report, _ = sweep.write_report(plan, str(workdir))
  text = open(report).read()
  assert "| standard | 64 | 0.004 | 4.000 | 4x |" in text, text
  assert "| standard | 128 | 0.001 | 3.500 |  |" in text
  assert "| mup | 64 | 0.004 | 4.000 | 1x |" in text and "| mup | 128 | 0.004 | 3.600 |  |" in text
  assert os.path.getsize(workdir / "optimum.png") > 0
