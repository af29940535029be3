r"""Plan a run: per-device memory and FLOPs of the real train step, compiled ahead of time.

  python -m experiments.plan --config=configs/gpt2_124m.py --num_devices=8 --config.mesh.fsdp=8
  python -m experiments.plan --config=configs/gpt2_1558m.py --num_devices=64 \
      --config.mesh.fsdp=64 --config.train.global_batch_size=64 \
      --config.model.scan_layers=true --json

Nothing runs and no arrays are allocated: the train step of `jaxlm.train.make_steps` is lowered
and compiled for abstract inputs (ShapeDtypeStructs with the run's shardings). With
`--num_devices=N` it is compiled for N simulated CPU devices (XLA_FLAGS
--xla_force_host_platform_device_count=N, set before jax is imported); without it, for this
machine's devices. The numbers are the CPU compiler's: a TPU/GPU compiler fuses and lays out
differently, so expect temporaries (not parameters or optimizer state) to differ there.

Per device:
  parameters, optimizer state  from each leaf's sharding: shard_shape(shape) x itemsize (every
                               shard of a NamedSharding has the same shape, so this is also the
                               maximum over devices)
  batch                        this device's rows of inputs/targets/weights/segment_ids/positions
  temporaries                  XLA's temp_size_in_bytes: activations kept for the backward pass,
                               gradients, optimizer scratch, at the peak of the step
  outputs not aliased          output_size - alias_size: outputs that do not reuse a donated
                               input buffer (the metrics; the new state is written in place)
  total                        = argument_size + (output_size - alias_size) + temp_size, where
                               argument_size = parameters + optimizer state + batch + step/rng
FLOPs per step per device: XLA's cost analysis of the compiled SPMD program (it is per device:
the compiled module is one device's program), next to the analytic model FLOPs,
`model.flops_per_token(cfg.model, seq_len) * tokens_per_step / num_devices`. XLA counts a while
loop's body once, so with `model.scan_layers=true` or `train.microbatches>1` its count misses
most of the step; the analytic number does not depend on either.

Big unrolled models compile slowly on CPU (gpt2_124m/355m on 8 devices: ~65-75 s on 2 shared
cores); `--config.model.scan_layers=true` compiles one layer instead of num_layers (~20 s):
parameter and optimizer bytes are identical, temporaries within a few percent (measured +5% for
gpt2_124m, +1% for gpt2_355m), XLA's FLOPs are not usable (see above).
"""

from __future__ import annotations

import os
import sys
from typing import Any

DEVICES_FLAG = "--xla_force_host_platform_device_count"


def _num_devices_from_argv(argv: list[str]) -> int | None:
  """--num_devices=N (or --num_devices N) from the raw command line; None if absent or bad
  (absl reports a bad value later)."""
  for i, arg in enumerate(argv):
    value = None
    if arg.startswith("--num_devices="):
      value = arg.split("=", 1)[1]
    elif arg == "--num_devices" and i + 1 < len(argv):
      value = argv[i + 1]
    if value is not None:
      try:
        return int(value)
      except ValueError:
        return None
  return None


def simulate_cpu_devices(num_devices: int) -> None:
  """Makes jax (not yet imported) see `num_devices` CPU devices and use the CPU backend."""
  if "jax" in sys.modules:
    raise RuntimeError("simulate_cpu_devices must run before jax is imported.")
  flags = os.environ.get("XLA_FLAGS", "")
  flags = " ".join(f for f in flags.split() if not f.startswith(DEVICES_FLAG))
  os.environ["XLA_FLAGS"] = f"{flags} {DEVICES_FLAG}={num_devices}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
  _N = _num_devices_from_argv(sys.argv)
  if _N is not None and _N > 0:
    simulate_cpu_devices(_N)

import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from absl import app, flags  # noqa: E402

from experiments import common  # noqa: E402
from jaxlm import config as config_lib  # noqa: E402

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def _shard_bytes(leaf: Any) -> int:
  """Bytes of one device's shard of a ShapeDtypeStruct that carries a sharding."""
  return math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def _tree_bytes(tree: Any) -> int:
  import jax
  return sum(_shard_bytes(leaf) for leaf in jax.tree.leaves(tree))


def abstract_batch(config: config_lib.Config, mesh) -> dict[str, Any]:
  """ShapeDtypeStructs [global_batch_size, seq_len] sharded like the real batch."""
  import jax
  import jax.numpy as jnp
  from jaxlm import sharding
  shape = (config.train.global_batch_size, config.data.seq_len)
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32,
                                  sharding=batch_sharding) for k in BATCH_KEYS}


def plan(config: config_lib.Config, mesh) -> dict[str, Any]:
  """Compiles the train step for `mesh` without running it; per-device bytes and FLOPs.

  Raises ConfigError for a batch that does not split over data x fsdp (before compiling).
  """
  from jaxlm import model as model_lib
  from jaxlm import train

  start = time.perf_counter()
  steps = train.make_steps(config, mesh)
  state, batch = steps.abstract_state, abstract_batch(config, mesh)
  compiled = steps.compile_train(state, batch)
  compile_seconds = time.perf_counter() - start

  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per module
  num_devices = mesh.devices.size
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  seq_len = config.data.seq_len
  tokens_per_step = config.train.global_batch_size * seq_len
  param_bytes = _tree_bytes(state.params)
  opt_state_bytes = _tree_bytes(state.opt_state)
  batch_bytes = _tree_bytes(batch)
  argument = memory.argument_size_in_bytes
  output, alias = memory.output_size_in_bytes, memory.alias_size_in_bytes
  temp = memory.temp_size_in_bytes
  model_flops = model_lib.flops_per_token(config.model, seq_len) * tokens_per_step / num_devices
  return {
      "num_devices": num_devices,
      "platform": mesh.devices.flat[0].platform,
      "mesh": {name: int(size) for name, size in mesh.shape.items()},
      "global_batch_size": config.train.global_batch_size,
      "microbatches": config.train.microbatches,
      "seq_len": seq_len,
      "per_device_batch": config.train.global_batch_size // ways,
      "tokens_per_step": tokens_per_step,
      "num_params": model_lib.count_params(state.params),
      "scan_layers": config.model.scan_layers,
      "remat_policy": config.model.remat_policy,
      "dtype": config.model.dtype,
      # Per device, in bytes.
      "param_bytes": param_bytes,
      "opt_state_bytes": opt_state_bytes,
      "batch_bytes": batch_bytes,
      "other_state_bytes": _tree_bytes((state.step, state.rng)),
      "argument_bytes": argument,
      "output_bytes": output,
      "alias_bytes": alias,
      "temp_bytes": temp,
      "total_bytes": argument + output - alias + temp,
      # Per device, per step.
      "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else None,
      "model_flops_per_device": model_flops,
      "compile_seconds": round(compile_seconds, 2),
  }


def _bytes(n: float) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def _flops(n: float | None) -> str:
  if n is None:
    return "n/a"
  for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
    if n >= size:
      return f"{n / size:.3f} {unit}"
  return f"{n / 1e6:.3f} MFLOP"


def format_table(result: dict[str, Any], config_path: str = "") -> str:
  r = result
  mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
  micro = (f", {r['per_device_batch'] // r['microbatches']} per microbatch"
           if r["microbatches"] > 1 else "")
  rows = [
      ("parameters", r["param_bytes"]),
      ("optimizer state", r["opt_state_bytes"]),
      ("batch", r["batch_bytes"]),
      ("temporaries (XLA)", r["temp_bytes"]),
      ("outputs not aliased", r["output_bytes"] - r["alias_bytes"]),
      ("step, rng", r["other_state_bytes"]),
  ]
  lines = [
      f"plan {config_path} on {r['num_devices']} {r['platform']} devices (compiled in "
      f"{r['compile_seconds']:.1f} s)",
      f"mesh              {mesh}",
      f"batch             global {r['global_batch_size']} x seq_len {r['seq_len']} = "
      f"{r['tokens_per_step']:,} tokens/step; per device {r['per_device_batch']}{micro}",
      f"parameters        {r['num_params']:,}",
      "memory per device",
  ]
  lines += [f"  {name:<20}{_bytes(value):>12}" for name, value in rows]
  lines.append(f"  {'total':<20}{_bytes(r['total_bytes']):>12}")
  xla, model = r["xla_flops_per_device"], r["model_flops_per_device"]
  ratio = f" ({xla / model:.2f}x model)" if xla and model else ""
  note = ("  (counts the scanned body once)"
          if r["scan_layers"] or r["microbatches"] > 1 else "")
  lines += [
      "FLOPs per step per device",
      f"  {'XLA cost analysis':<20}{_flops(xla):>12}{ratio}{note}",
      f"  {'model (analytic)':<20}{_flops(model):>12}",
  ]
  return "\n".join(lines)


def _define_flags() -> None:
  global _CONFIG, _NUM_DEVICES, _JSON
  _CONFIG = common.define_config_flag("configs/default.py")
  _NUM_DEVICES = flags.DEFINE_integer(
      "num_devices", None, "plan for this many simulated CPU devices (default: this machine's "
      "devices).", lower_bound=1)
  _JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of a table.")


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_logs()
  config = config_lib.validate(common.config_value(_CONFIG))
  import jax
  from jaxlm import sharding
  devices = jax.devices()
  if _NUM_DEVICES.value is not None and len(devices) != _NUM_DEVICES.value:
    raise RuntimeError(f"asked for {_NUM_DEVICES.value} devices, jax has {len(devices)}: "
                       f"XLA_FLAGS was not applied before jax was imported.")
  mesh = sharding.make_mesh(config.mesh, devices)
  result = plan(config, mesh)
  if _JSON.value:
    print(json.dumps(result))
  else:
    from ml_collections import config_flags
    print(format_table(result, config_flags.get_config_filename(flags.FLAGS["config"])))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=common.parse_flags)
