"""The loop's hooks on a tiny fake job (a 1-layer model on random tokens, no corpus): a hook
runs after every N-th step (and at the end when asked) with that step's state and metrics, the
loop's own periodic work keeps its schedule, and the profiler traces its window."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import hooks as hooks_lib
from jaxlm import loader, loop, sharding
from jaxlm import steps as steps_lib
from jaxlm.hooks import Hook


def fake_task(workdir, **train) -> loop.Job:
  config = config_lib.validate({
      "model": {"num_layers": 1, "num_heads": 2, "embed_dim": 32, "mlp_dim": 64,
                "vocab_size": 64, "max_seq_len": 16},
      "data": {"seq_len": 16},
      "train": {"num_steps": 10, "global_batch_size": 4, "log_every": 5, "checkpoint_every": 0,
                "sample_every": 0, "sample_max_new_tokens": 0, **train},
      "optim": {"warmup_steps": 0}})
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  steps = steps_lib.make_steps(config, mesh)
  tokens = np.random.default_rng(0).integers(4, 64, size=4000).astype(np.uint16)
  windows = loader.Windows([tokens], 16)

  class Tokenizer:
    file_name, eos_id = "tokenizer.model", 3

    def serialize(self):
      return b"fake"

  return loop.Job(
      config=config, workdir=str(workdir), mesh=mesh, tokenizer=Tokenizer(), steps=steps,
      train_step=steps.train, compiled_step=None, compile_seconds=0.0,
      data=lambda: loader.Loader([loader.Source("random", windows)], 0, 4, eos_id=3),
      init_state=lambda: steps.init(jax.random.PRNGKey(0)), evaluate=lambda state: {},
      eval_every=0, flops_per_token=1.0, can_sample=False)


@pytest.fixture(autouse=True)
def no_step_bytes(monkeypatch):
  monkeypatch.setattr(steps_lib, "step_bytes", lambda compiled: 0)  # (nothing compiled ahead)


def test_hooks_run_after_every_nth_step_with_that_steps_state_and_metrics(tmp_path):
  seen = {"every3": [], "every4_end": [], "custom": [], "loss": {}}
  hooks = [
      Hook(lambda info: seen["every3"].append(info.step), every=3),
      Hook(lambda info: seen["every4_end"].append((info.step, info.last)), every=4, at_end=True),
      Hook(lambda info: seen["custom"].append(info.step), when=lambda step, last: step in (2, 7)),
      Hook(lambda info: seen["loss"].update({info.step: float(info.metrics["train_loss"])}),
           every=5),
  ]
  summary = loop.fit(fake_task(tmp_path / "run"), hooks=hooks, show_progress=False)
  assert summary["finished"] and summary["step"] == 10
  assert seen["every3"] == [3, 6, 9]
  assert seen["every4_end"] == [(4, False), (8, False), (10, True)]
  assert seen["custom"] == [2, 7]
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    logged = {r["step"]: r["train_loss"] for r in map(json.loads, f) if "train_loss" in r}
  assert logged == seen["loss"]  # the loop's own log hook saw the same steps and values


def test_a_hook_sees_the_state_after_its_step_and_its_data_position(tmp_path):
  states = []
  hook = Hook(lambda info: states.append((info.step, int(info.state.step),
                                          info.data_state["batch"])), every=2)
  loop.fit(fake_task(tmp_path / "run", num_steps=6), hooks=[hook], show_progress=False)
  assert states == [(2, 2, 2), (4, 4, 4), (6, 6, 6)]


def test_checkpoints_follow_their_schedule_and_a_hook_error_stops_the_run(tmp_path):
  task = fake_task(tmp_path / "run", checkpoint_every=4, keep_checkpoints=5)
  loop.fit(task, show_progress=False)
  assert sorted(int(s) for s in os.listdir(tmp_path / "run" / "checkpoints")) == [4, 8, 10]

  def fails(info):
    raise RuntimeError(f"hook failed at {info.step}")
  with pytest.raises(RuntimeError, match="hook failed at 3"):
    loop.fit(fake_task(tmp_path / "other"), hooks=[Hook(fails, every=3)], show_progress=False)


def test_profile_steps_trace_a_window_of_steps(tmp_path):
  loop.fit(fake_task(tmp_path / "run", profile_steps="4:7"), show_progress=False)
  traces = glob.glob(str(tmp_path / "run" / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


@pytest.mark.parametrize("text, num_steps, traced", [
    ("4:7", 10, [4, 5, 6]),
    ("3", 10, [3, 4, 5]),     # a count: after compilation and warm-up (steps 1-2)
    ("8:20", 10, [8, 9, 10]),  # the run ends inside the window: stopped at its last step
    ("1:3", 10, [1, 2]),      # from the first step: the trace starts before it
    ("", 10, []),
])
def test_the_profiler_window_covers_steps_start_to_end(monkeypatch, text, num_steps, traced):
  calls = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda path: calls.append("start"))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append("stop"))
  hooks = hooks_lib.profiler_hooks("unused", config_lib.profile_window(text), 1)
  tracing, steps = "start" in calls, []
  for step in range(1, num_steps + 1):
    if tracing:
      steps.append(step)  # (runs between the hooks of step - 1 and those of step)
    calls.clear()
    hooks_lib.run_due(hooks, hooks_lib.StepInfo(step, step == num_steps, None, {}, None))
    tracing = (tracing or "start" in calls) and "stop" not in calls
  assert steps == traced


@pytest.mark.parametrize("text", ["0:5", "5:5", "a:b", "-2", "3:"])
def test_bad_profile_windows_are_one_line(text):
  with pytest.raises(config_lib.ConfigError, match=r"train.profile_steps=.*use START:END"):
    config_lib.validate({"train": {"profile_steps": text}})


def test_a_saved_count_of_profiled_steps_reads_as_a_window():
  config = config_lib.validate({"train": {"profile_steps": 4}})  # (config.json before 2026-12)
  assert config.train.profile_steps == "4"
  assert config_lib.profile_window(config.train.profile_steps) == (3, 7)
  assert config_lib.validate({"train": {"profile_steps": 0}}).train.profile_steps == ""


def test_metrics_also_go_to_weights_and_biases_when_a_project_is_set(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")  # (the user's W&B setting: nothing leaves here)
  monkeypatch.setenv("WANDB_SILENT", "true")
  workdir = tmp_path / "run"
  loop.fit(fake_task(workdir, wandb_project="jaxlm-tests"), show_progress=False)
  run_id = (workdir / "wandb_id").read_text()
  runs = glob.glob(str(workdir / "wandb" / f"offline-run-*-{run_id}"))
  assert len(runs) == 1 and glob.glob(os.path.join(runs[0], "*.wandb"))
  import sys

  from jaxlm import metrics
  monkeypatch.setitem(sys.modules, "wandb", None)  # (as if not installed)
  with pytest.raises(metrics.WriteError, match="needs Weights & Biases: pip install wandb"):
    metrics.check_wandb("jaxlm-tests")
