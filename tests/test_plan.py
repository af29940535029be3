"""experiments/plan: per-device memory/FLOPs of the compiled train step, without running it."""

import json
import os
import subprocess
import sys

import jax
import pytest

from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import plan as plan_lib
from jaxlm import sharding
from tests.conftest import FAST_COMPILE_XLA_FLAGS, REPO

# (The CLI's default config file trains with Muon and has modded-nanogpt's skips: these plans
# count AdamW's state and the plain model's parameters, as the schema's defaults give them.)
TINY = {"model": {"num_layers": 1, "num_heads": 2, "embed_dim": 64, "mlp_dim": 256,
                  "vocab_size": 1024, "max_seq_len": 32, "value_embed": False, "x0_skip": False},
        "data": {"seq_len": 32, "stride": 32},
        "train": {"global_batch_size": 8},
        "optim": {"name": "adamw"}}
TINY_FLAGS = [f"--config.{section}.{key}={value}"
              for section, values in TINY.items() for key, value in values.items()]


def tiny_plan(**mesh):
  config = config_lib.validate({**TINY, "mesh": mesh})
  return plan_lib.plan(config, sharding.make_mesh(config.mesh, jax.devices()[:8]))


def run_cli(*args):
  # The planner only compiles: compile fast (tests/conftest.py); it sets the device count.
  env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)
  return subprocess.run([sys.executable, "-m", "experiments.plan", *TINY_FLAGS, *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


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
    # XLA's own argument size is exactly the shards we count: state + step/rng/spike stats +
    # batch rows.
    assert p["argument_bytes"] == (state(p) + p["other_state_bytes"] + p["batch_bytes"])
    assert p["batch_bytes"] == 5 * 4 * 32  # 5 arrays x 1 row x 32 tokens x 4 bytes
    assert p["per_device_batch"] == 1 and p["temp_bytes"] > 0
    assert p["total_bytes"] == (p["argument_bytes"] + p["temp_bytes"] + p["output_bytes"]
                                - p["alias_bytes"])
    assert p["alias_bytes"] >= state(p)  # the donated state is updated in place
    # cost_analysis is per device: close to the analytic model FLOPs / 8 devices.
    assert p["xla_flops_per_device"] == pytest.approx(p["model_flops_per_device"], rel=0.3)


@pytest.mark.e2e
def test_cli_simulates_the_devices_and_prints_json():
  # conftest's XLA_FLAGS ask for 8 devices; --num_devices=4 must win.
  result = run_cli("--num_devices=4", "--config.mesh.fsdp=4", "--json")
  assert result.returncode == 0, result.stderr
  plan = json.loads(result.stdout)
  assert plan["num_devices"] == 4 and plan["platform"] == "cpu"
  assert plan["mesh"] == {"stage": 1, "data": 1, "fsdp": 4, "tensor": 1}
  assert plan["per_device_batch"] == 2
  for key in ("param_bytes", "opt_state_bytes", "temp_bytes", "total_bytes",
              "xla_flops_per_device", "model_flops_per_device"):
    assert plan[key] > 0, key


def test_table_names_every_number(plans):
  table = plan_lib.format_table(plans["fsdp"], "configs/default.py")
  for text in ("data=1 x fsdp=8 x tensor=1", "per device 1", "parameters", "optimizer state",
               "temporaries", "total", "KiB", "XLA cost analysis", "model (analytic)", "FLOP"):
    assert text in table, text


@pytest.mark.e2e
@pytest.mark.parametrize("args, message", [
    (["--num_devices=4", "--config.mesh.data=3"], "stage=1 x data=3"),
    (["--num_devices=8", "--config.mesh.fsdp=8", "--config.train.global_batch_size=4"],
     "train.global_batch_size=4"),
])
def test_bad_mesh_or_batch_is_one_line_exit_2(args, message):
  result = run_cli(*args)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.e2e
def test_topology_compiles_with_the_tpu_compiler():
  """... with the splash-attention Pallas kernel, which `auto` picks on TPU for 128-token
  windows (its memory against XLA's attention: docs/models.md, measured with the planner)."""
  pytest.importorskip("libtpu")
  result = run_cli("--topology=v5e:2x2", "--config.mesh.fsdp=4", "--config.model.dtype=bfloat16",
                   "--config.data.seq_len=128", "--config.model.max_seq_len=128", "--json")
  assert result.returncode == 0, result.stderr
  plan = json.loads(result.stdout)
  assert plan["platform"] == "tpu" and plan["device_kind"] == "TPU v5 lite"
  assert plan["num_devices"] == 4
  assert plan["mesh"] == {"stage": 1, "data": 1, "fsdp": 4, "tensor": 1}
  assert plan["topology"] == {"name": "v5e:2x2", "num_slices": 1, "chips": 4,
                              "devices_per_chip": 1}
  assert plan["hbm_bytes"] == 16 * 2**30 and plan["fits"] is True
  assert plan["compile_error"] is None and plan["attention"] == "splash"
  # Parameters stay float32 (bfloat16 is the compute dtype). fsdp=4 splits every leaf with an
  # embed axis 4 ways; only the q/k/v bias (3 x 64) and the MLP bias (256) are whole on each chip.
  model = config_lib.validate({**TINY, "model": dict(TINY["model"], max_seq_len=128)}).model
  params, whole = model_lib.param_count(model), 3 * 64 + 256
  assert plan["param_bytes"] == 4 * ((params - whole) // 4 + whole)
  assert plan["opt_state_bytes"] == pytest.approx(2 * plan["param_bytes"], abs=64)
  # XLA's TPU arguments are the same shards padded to tiled layouts: at least our count.
  assert plan["argument_bytes"] >= (plan["param_bytes"] + plan["opt_state_bytes"]
                                    + plan["batch_bytes"] + plan["other_state_bytes"])
  assert plan["total_bytes"] == (plan["argument_bytes"] + plan["temp_bytes"]
                                 + plan["output_bytes"] - plan["alias_bytes"])


@pytest.mark.e2e
def test_topology_reports_a_step_that_does_not_fit():
  pytest.importorskip("libtpu")
  # 4,096 rows x 32 tokens x a 65,536 vocabulary of float32 logits per chip: 32 GiB, on a 16 GiB
  # v5e. The TPU compiler refuses to compile it; the plan says so instead of failing.
  result = run_cli("--topology=v5e:2x2", "--config.mesh.fsdp=4", "--config.model.dtype=bfloat16",
                   "--config.model.vocab_size=65536", "--config.train.global_batch_size=16384",
                   "--json")
  assert result.returncode == 0, result.stderr
  plan = json.loads(result.stdout)
  assert plan["fits"] is False and "RESOURCE_EXHAUSTED" in plan["compile_error"]
  assert plan["temp_bytes"] is None and plan["total_bytes"] is None
  assert plan["param_bytes"] > 0 and plan["hbm_bytes"] == 16 * 2**30


@pytest.mark.e2e
@pytest.mark.parametrize("args, devices, chips, hbm_gib", [
    # Two v5e slices: mesh.data spans them, fsdp stays inside one.
    (["--topology=v5e:2x2", "--num_slices=2", "--config.mesh.data=2", "--config.mesh.fsdp=4"],
     8, 8, 16),
    # libtpu describes a v4 chip as two devices (one per TensorCore), each half its 32 GiB.
    (["--topology=v4:2x2x1", "--config.mesh.fsdp=8"], 8, 4, 16),
    # data 2 x fsdp 8 on a 4x4 torus splits a physical axis (jax.make_mesh alone refuses).
    (["--topology=v6e:4x4", "--config.mesh.data=2", "--config.mesh.fsdp=8",
      "--config.train.global_batch_size=16"], 16, 16, 32),
])
def test_topology_slices_and_split_chips(args, devices, chips, hbm_gib):
  pytest.importorskip("libtpu")
  result = run_cli(*args, "--json")
  assert result.returncode == 0, result.stderr
  plan = json.loads(result.stdout)
  assert plan["platform"] == "tpu" and plan["num_devices"] == devices
  assert plan["topology"]["chips"] == chips and plan["hbm_bytes"] == hbm_gib * 2**30
  assert plan["fits"] is True and plan["param_bytes"] > 0 and plan["temp_bytes"] >= 0


@pytest.mark.e2e
@pytest.mark.parametrize("args, message, needs_libtpu", [
    (["--topology=v5f:2x2"], "e.g. v4:2x2x1, v5e:2x4", False),
    (["--topology=v5e-8"], "GENERATION:SHAPE", False),
    (["--topology=v5e:2x2", "--num_devices=4"], "--num_devices=4 both choose the devices", False),
    (["--num_slices=2"], "--num_slices=2 needs --topology", False),
    (["--topology=v5e:2x2", "--config.mesh.data=3"], "stage=1 x data=3", True),
    (["--topology=v5e:3x3"], "libtpu refused it", True),
])
def test_bad_topology_is_one_line_exit_2(args, message, needs_libtpu):
  if needs_libtpu:
    pytest.importorskip("libtpu")
  result = run_cli(*args)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.e2e
def test_topology_without_libtpu_says_what_to_install():
  # As if libtpu were not installed: `import libtpu` fails, find_spec finds nothing.
  script = ("import runpy, sys; sys.modules['libtpu'] = None; "
            "sys.argv = ['plan', '--topology=v5e:2x4']; "
            "runpy.run_module('experiments.plan', run_name='__main__')")
  env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "pip install -r requirements-tpu.txt" in lines[0], lines


@pytest.mark.e2e
def test_search_recommends_the_fastest_candidate_that_fits():
  # Long enough sequences that activations, not the state, dominate: remat then saves memory.
  config = config_lib.validate({
      "model": dict(TINY["model"], num_layers=2, max_seq_len=128),
      "data": {"seq_len": 128, "stride": 128}, "train": {"global_batch_size": 4},
      "mesh": {"data": 2}})
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:2])
  key = lambda r: (r["remat_policy"], r["scan_layers"], r["microbatches"])
  plans = {}  # shared: each candidate compiles once for the three searches below
  unlimited = plan_lib.search(config, mesh, memory_bytes=2**40, plans=plans)
  # Everything fits: no recomputation wins (fewest FLOPs), unscanned, one microbatch.
  assert unlimited["recommended"] == {"model.remat_policy": "none", "model.scan_layers": False,
                                      "train.microbatches": 1}
  by_key = {key(r): r for r in unlimited["candidates"]}
  assert len(by_key) == 2 * len(plan_lib.SEARCH_REMAT)
  flops = [by_key[(remat, False, 1)]["search_flops_per_device"]
           for remat in plan_lib.SEARCH_REMAT]
  assert flops == sorted(flops) and flops[0] < flops[-1]  # remat recomputes
  # (On the CPU compiler remat saves memory only in scanned layers; unscanned, every policy
  # had the same total in a 4-layer version of this test: 91.8 MB vs 117.6 MB scanned without
  # remat and 28.0 MB scanned with full remat.)
  assert by_key[("full", True, 1)]["total_bytes"] < by_key[("none", True, 1)]["total_bytes"]
  # A limit the plain step exceeds: the recommendation is the fewest-FLOPs candidate that fits
  # (a larger microbatch count or a remat policy).
  plain = by_key[("none", False, 1)]["total_bytes"]
  limit = (plain + min(r["total_bytes"] for r in unlimited["candidates"])) // 2
  limited = plan_lib.search(config, mesh, memory_bytes=limit, plans=plans)
  fitting = [r for r in limited["candidates"] if r["fits"]]
  assert fitting and all(r["total_bytes"] <= limit for r in fitting)
  assert not by_key[("none", False, 1)]["total_bytes"] <= limit
  best = min(fitting, key=lambda r: (r["search_flops_per_device"], r["microbatches"],
                                     r["scan_layers"]))
  assert limited["recommended"] == {"model.remat_policy": best["remat_policy"],
                                    "model.scan_layers": best["scan_layers"],
                                    "train.microbatches": best["microbatches"]}
  assert limited["recommended"] != unlimited["recommended"]
  text = plan_lib.format_search(limited)
  assert "recommended: --config.model.remat_policy=" in text and "est. step s" in text
  nothing = plan_lib.search(config, mesh, memory_bytes=1, plans=plans)
  assert nothing["recommended"] is None
  assert "nothing fits" in plan_lib.format_search(nothing)
