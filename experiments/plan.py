r"""Plan a run: per-device memory and FLOPs of the real train step, compiled ahead of time.

  python -m experiments.plan --config=configs/gpt2_124m.py --num_devices=8 --config.mesh.fsdp=8
  python -m experiments.plan --config=configs/gpt2_1558m.py --num_devices=64 \
      --config.mesh.fsdp=64 --config.train.global_batch_size=64 \
      --config.model.scan_layers=true --json
  python -m experiments.plan --config=configs/gpt2_124m.py --topology=v5e:2x4 \
      --config.mesh.fsdp=8 --config.model.dtype=bfloat16     # TPU compiler, no TPU needed

Nothing runs and no arrays are allocated: the train step of `jaxlm.steps.make_steps` is lowered
and compiled for abstract inputs (ShapeDtypeStructs with the run's shardings). With
`--num_devices=N` it is compiled for N simulated CPU devices (XLA_FLAGS
--xla_force_host_platform_device_count=N, set before jax is imported); without it, for this
machine's devices. The numbers are then the CPU compiler's: a TPU/GPU compiler fuses and lays out
differently, so expect temporaries (not parameters or optimizer state) to differ there.

With `--topology=GENERATION:SHAPE` (v4:2x2x1, v5e:2x4, v5e:16x16, v5p:4x4x4, v6e:16x16; plus
`--num_slices=S` for S such slices, mesh.data spanning them) the step is compiled by the real TPU
compiler for that slice's chips, on this CPU-only machine: libtpu (`pip install -r
requirements-tpu.txt`) describes the topology (`jax.experimental.topologies`) and compiles for
it; JAX_PLATFORMS=cpu keeps it from looking for an attached TPU. The output adds each device's
HBM (TPU_GENERATIONS below: the chip's HBM, halved on v4, whose chips libtpu describes as two
devices, one per TensorCore) and whether the step fits in it. On TPU, XLA's argument bytes exceed
parameters + optimizer state + batch: it pads arrays to the TPU's tiled layouts, and reports
that; `fits` uses XLA's numbers. The TPU compiler itself refuses a step whose buffers exceed the
HBM it can use (RESOURCE_EXHAUSTED; on v5e "available HBM (15.75G)" of the chip's 16 GiB): the
plan then says `fits: false` and shows the compiler's message (`compile_error`), without the
numbers only a compiled step has. So a plan within a few percent of HBM may still not fit.

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
                               (on TPU also the padding of tiled layouts)
  HBM, fits (--topology only)  the device's HBM; fits = total <= HBM
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

DEVICES_FLAG = "--xla_force_host_platform_device_count"


def _flag_from_argv(argv: list[str], name: str) -> str | None:
  """The value of --name=V (or --name V) on the raw command line; None if absent."""
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _num_devices_from_argv(argv: list[str]) -> int | None:
  """--num_devices=N (or --num_devices N) from the raw command line; None if absent or bad
  (absl reports a bad value later)."""
  value = _flag_from_argv(argv, "num_devices")
  try:
    return None if value is None else int(value)
  except ValueError:
    return None


def libtpu_installed() -> bool:
  """Whether jax can load the TPU compiler (the `libtpu` package or TPU_LIBRARY_PATH)."""
  import importlib.util
  return (bool(os.environ.get("TPU_LIBRARY_PATH"))
          or importlib.util.find_spec("libtpu") is not None)


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
  if _flag_from_argv(sys.argv, "topology"):
    # This host only compiles: keep jax (and libtpu) from looking for a TPU attached to it.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402

from absl import app, flags  # noqa: E402

from experiments import common  # noqa: E402
from jaxlm import config as config_lib  # noqa: E402
from jaxlm.plan import (  # noqa: E402
  TOPOLOGY_EXAMPLES,
  check_topology,
  format_search,
  format_table,
  libtpu_environment,
  plan,
  search,
  topology_mesh,
  tpu_topology,
)


def _define_flags() -> None:
  global _CONFIG, _NUM_DEVICES, _TOPOLOGY_FLAG, _NUM_SLICES, _JSON, _SEARCH, _MEMORY_GIB
  _CONFIG = common.define_config_flag("configs/default.py")
  _NUM_DEVICES = flags.DEFINE_integer(
      "num_devices", None, "plan for this many simulated CPU devices (default: this machine's "
      "devices).", lower_bound=1)
  _TOPOLOGY_FLAG = flags.DEFINE_string(
      "topology", None, f"plan for a TPU slice with the TPU compiler, e.g. {TOPOLOGY_EXAMPLES} "
      "(needs pip install -r requirements-tpu.txt; no TPU needed).")
  _NUM_SLICES = flags.DEFINE_integer(
      "num_slices", 1, "with --topology: this many such slices (multi-slice); mesh.data spans "
      "them.", lower_bound=1)
  _JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of a table.")
  _SEARCH = flags.DEFINE_bool(
      "search", False, "try remat policies x scan_layers x microbatches and recommend the "
      "fastest configuration that fits (by the compiler's cost analysis).")
  _MEMORY_GIB = flags.DEFINE_float(
      "memory_gib", None, "memory per device to plan against (default: the TPU chip's HBM with "
      "--topology, else this host's available memory shared by its devices).", lower_bound=0)


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_logs()
  config = config_lib.validate(common.config_value(_CONFIG))
  topology_name, num_slices = _TOPOLOGY_FLAG.value, _NUM_SLICES.value
  if topology_name is not None:
    if _NUM_DEVICES.value is not None:
      raise config_lib.ConfigError(
          f"--topology={topology_name} and --num_devices={_NUM_DEVICES.value} both choose the "
          f"devices; pass one (--topology plans for TPU chips, --num_devices for CPU devices).")
    check_topology(topology_name, num_slices, libtpu_installed())  # (before jax: fast errors)
    for key, value in libtpu_environment(topology_name).items():
      os.environ.setdefault(key, value)
  elif num_slices != 1:
    raise config_lib.ConfigError(f"--num_slices={num_slices} needs --topology (e.g. "
                                 f"--topology=v5e:16x16 --num_slices={num_slices}).")
  import jax

  from jaxlm import metrics, sharding
  from jaxlm import steps as steps_lib
  topology_info = None
  if topology_name is not None:
    topology = tpu_topology(topology_name, num_slices)
    mesh = topology_mesh(config, topology)
    memory = topology.hbm_bytes
    topology_info = {"name": topology.name, "num_slices": topology.num_slices,
                     "chips": topology.chips, "devices_per_chip": topology.devices_per_chip}
  else:
    devices = jax.devices()
    if _NUM_DEVICES.value is not None and len(devices) != _NUM_DEVICES.value:
      raise RuntimeError(f"asked for {_NUM_DEVICES.value} devices, jax has {len(devices)}: "
                         f"XLA_FLAGS was not applied before jax was imported.")
    mesh = sharding.make_mesh(config.mesh, devices)
    memory = None
  if _MEMORY_GIB.value is not None:
    memory = int(_MEMORY_GIB.value * 2**30)
  if _SEARCH.value:
    if memory is None:
      known = steps_lib.device_memory_bytes(mesh)
      memory = known[0] if known else None
    device = mesh.devices.flat[0]
    peak = (metrics.data_sheet_peak(device.device_kind, config.model.dtype)
            if device.platform != "cpu" else None)
    result = search(config, mesh, memory, peak)
    print(json.dumps(result) if _JSON.value else format_search(result))
    return
  result = plan(config, mesh, hbm_bytes=memory)
  result["topology"] = topology_info
  if _JSON.value:
    print(json.dumps(result))
  else:
    from ml_collections import config_flags
    print(format_table(result, config_flags.get_config_filename(flags.FLAGS["config"])))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=common.parse_flags)
