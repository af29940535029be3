"""experiments/plan: per-device memory/FLOPs of the compiled train step, without running it."""

import json
import os
import subprocess
import sys

import jax
import pytest

from experiments import plan as plan_lib
from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model": {"num_layers": 1, "num_heads": 2, "embed_dim": 64, "mlp_dim": 256,
                  "vocab_size": 1024, "max_seq_len": 32},
        "data": {"seq_len": 32, "stride": 32},
        "train": {"global_batch_size": 8}}
TINY_FLAGS = [f"--config.{section}.{key}={value}"
              for section, values in TINY.items() for key, value in values.items()]


def tiny_plan(**mesh):
  config = config_lib.validate({**TINY, "mesh": mesh})
  return plan_lib.plan(config, sharding.make_mesh(config.mesh, jax.devices()[:8]))


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.plan", *TINY_FLAGS, *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def plans():
  return {"data": tiny_plan(data=8, fsdp=1), "fsdp": tiny_plan(data=1, fsdp=8)}


def test_fsdp_shards_parameters_and_optimizer_state(plans):
  replicated, sharded = plans["data"], plans["fsdp"]
  state = lambda p: p["param_bytes"] + p["opt_state_bytes"]
  # Only the few leaves without an 'embed' axis (qkv/MLP biases, counters) stay replicated.
  assert state(sharded) == pytest.approx(state(replicated) / 8, rel=0.05)
  params = model_lib.param_count(config_lib.validate(TINY).model)
  assert replicated["param_bytes"] == 4 * params  # float32, whole on every device
  for p in (replicated, sharded):
    # XLA's own argument size is exactly the shards we count: state + step/rng + batch rows.
    assert p["argument_bytes"] == (state(p) + p["other_state_bytes"] + p["batch_bytes"])
    assert p["batch_bytes"] == 5 * 4 * 32  # 5 arrays x 1 row x 32 tokens x 4 bytes
    assert p["per_device_batch"] == 1 and p["temp_bytes"] > 0
    assert p["total_bytes"] == (p["argument_bytes"] + p["temp_bytes"] + p["output_bytes"]
                                - p["alias_bytes"])
    assert p["alias_bytes"] >= state(p)  # the donated state is updated in place
    # cost_analysis is per device: close to the analytic model FLOPs / 8 devices.
    assert p["xla_flops_per_device"] == pytest.approx(p["model_flops_per_device"], rel=0.3)


def test_cli_simulates_the_devices_and_prints_json():
  # conftest's XLA_FLAGS ask for 8 devices; --num_devices=4 must win.
  result = run_cli("--num_devices=4", "--config.mesh.fsdp=4", "--json")
  assert result.returncode == 0, result.stderr
  plan = json.loads(result.stdout)
  assert plan["num_devices"] == 4 and plan["platform"] == "cpu"
  assert plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and plan["per_device_batch"] == 2
  for key in ("param_bytes", "opt_state_bytes", "temp_bytes", "total_bytes",
              "xla_flops_per_device", "model_flops_per_device"):
    assert plan[key] > 0, key


def test_table_names_every_number(plans):
  table = plan_lib.format_table(plans["fsdp"], "configs/default.py")
  for text in ("data=1 x fsdp=8 x tensor=1", "per device 1", "parameters", "optimizer state",
               "temporaries", "total", "KiB", "XLA cost analysis", "model (analytic)", "FLOP"):
    assert text in table, text


@pytest.mark.parametrize("args, message", [
    (["--num_devices=4", "--config.mesh.data=3"], "mesh data=3"),
    (["--num_devices=8", "--config.mesh.fsdp=8", "--config.train.global_batch_size=4"],
     "train.global_batch_size=4"),
])
def test_bad_mesh_or_batch_is_one_line_exit_2(args, message):
  result = run_cli(*args)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
