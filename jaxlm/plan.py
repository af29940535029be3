"""The planner's library: per-device memory and FLOPs of a config's real train step, compiled
ahead of time for a mesh (simulated CPU devices, or a TPU slice described by libtpu and compiled
by the TPU compiler on a CPU-only host), and the search over remat x scan x microbatches.
`experiments/plan.py` is its command line (it sets the simulated devices before jax starts);
its docstring explains the numbers.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, NamedTuple

import numpy as np

from jaxlm import config as config_lib


class TpuGeneration(NamedTuple):
  """What the planner needs to know about a TPU generation that libtpu does not say."""
  hbm_gib: int  # HBM per chip
  accelerator: str  # Cloud TPU accelerator type prefix (v5litepod-8 = 8 chips, v5p-8 = 4 chips)
  accelerator_per_chip: int  # what the accelerator type's number counts per chip


# The one table of TPU chips. libtpu takes these generation names as they are ("v5e:2x4").
TPU_GENERATIONS: dict[str, TpuGeneration] = {
    "v4": TpuGeneration(hbm_gib=32, accelerator="v4", accelerator_per_chip=2),
    "v5e": TpuGeneration(hbm_gib=16, accelerator="v5litepod", accelerator_per_chip=1),
    "v5p": TpuGeneration(hbm_gib=95, accelerator="v5p", accelerator_per_chip=2),
    "v6e": TpuGeneration(hbm_gib=32, accelerator="v6e", accelerator_per_chip=1),
}
TOPOLOGY_EXAMPLES = "v4:2x2x1, v5e:2x4, v5e:16x16, v5p:4x4x4, v6e:16x16"
_TOPOLOGY = re.compile(r"(?P<generation>v[0-9][a-z]?):(?P<shape>[0-9]+(x[0-9]+){1,2})")


class Topology(NamedTuple):
  """A TPU slice (or several) to compile for, on a machine without TPUs."""
  name: str  # as given, e.g. "v5e:2x4"
  num_slices: int
  devices: list[Any]  # jax compile-only TPU devices, num_slices x chips x devices_per_chip
  chips: int  # all slices together
  devices_per_chip: int  # 2 for v4 (one per TensorCore), 1 for v5e/v5p/v6e
  hbm_bytes: int  # per device: the chip's HBM / devices_per_chip


def check_topology(name: str, num_slices: int = 1, libtpu_present: bool = True
                   ) -> TpuGeneration:
  """Raises ConfigError for a --topology that is not GENERATION:SHAPE of a known generation, or
  when libtpu is missing (`libtpu_present`: whether the caller found it); returns the
  generation's table entry. Runs before jax is imported."""
  match = _TOPOLOGY.fullmatch(name)
  if not match or match["generation"] not in TPU_GENERATIONS:
    raise config_lib.ConfigError(
        f"--topology={name} is not a TPU topology; use GENERATION:SHAPE with GENERATION one of "
        f"{', '.join(TPU_GENERATIONS)} and SHAPE chips per axis, e.g. {TOPOLOGY_EXAMPLES}.")
  if num_slices < 1:
    raise config_lib.ConfigError(f"--num_slices={num_slices}: use 1 or more.")
  if not libtpu_present:
    raise config_lib.ConfigError(
        f"--topology={name} needs the TPU compiler (libtpu), which is not installed; run "
        f"pip install -r requirements-tpu.txt.")
  return TPU_GENERATIONS[match["generation"]]


def _dims(name: str) -> list[int]:
  dims = [int(n) for n in name.split(":")[1].split("x")]
  return dims + [1] * (3 - len(dims))


def libtpu_environment(name: str) -> dict[str, str]:
  """The environment libtpu should see before `tpu_topology(name)` on a host with no TPU: what
  to pretend instead of querying the GCE metadata server (and warning), and that several
  planners may load it at once (its lockfile guards real TPUs; none are opened here). The
  caller (a script: the process's owner) sets them."""
  generation = TPU_GENERATIONS[_TOPOLOGY.fullmatch(name)["generation"]]
  chips = math.prod(_dims(name)) * generation.accelerator_per_chip
  return {"TPU_ACCELERATOR_TYPE": f"{generation.accelerator}-{chips}",
          "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def tpu_topology(name: str, num_slices: int = 1) -> Topology:
  """Compile-only devices of the TPU topology `name` (e.g. "v5e:2x4"), via libtpu.

  No TPU is needed: libtpu describes the slice and its compiler compiles for it. Raises
  ConfigError (one line) for a name or shape libtpu refuses.
  """
  generation = check_topology(name, num_slices)
  dims = _dims(name)
  slice_chips = math.prod(dims)
  import jax
  from jax.experimental import topologies
  kwargs: dict[str, Any] = {"num_slices": num_slices} if num_slices > 1 else {}
  if slice_chips <= 4 and (dims[0] % 2 or dims[1] % 2):
    # Smaller than libtpu's default host (2x2x1 chips), e.g. v5e:1x1: one host holds it all.
    kwargs["chips_per_host_bounds"] = dims
  try:
    devices = list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)
  except (jax.errors.JaxRuntimeError, RuntimeError) as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise config_lib.ConfigError(f"--topology={name}: libtpu refused it ({reason}); try e.g. "
                                 f"{TOPOLOGY_EXAMPLES}.") from None
  per_chip = len({d.core_on_chip for d in devices})
  return Topology(name=name, num_slices=num_slices, devices=devices,
                  chips=len(devices) // per_chip, devices_per_chip=per_chip,
                  hbm_bytes=generation.hbm_gib * 2**30 // per_chip)


def topology_mesh(config: config_lib.Config, topology: Topology):
  """The (stage, data, fsdp, tensor) mesh over a topology's devices.

  Across slices only `data` is split (gradients all-reduce over the data-center network once a
  step); fsdp and tensor stay inside a slice, on the chips' own interconnect. libtpu describes
  v4 chips in split mode (a device per TensorCore), which `jax.make_mesh` refuses (it wants
  megacore); those devices are laid out in id order instead (cores of a chip side by side).
  """
  from jax.experimental import mesh_utils
  from jax.sharding import AxisType, Mesh

  from jaxlm import sharding
  if topology.num_slices == 1 and topology.devices_per_chip == 1:
    return sharding.make_mesh(config.mesh, topology.devices)
  shape = sharding.mesh_shape(config.mesh, len(topology.devices))
  slices = topology.num_slices
  data = shape[1]
  if data % slices:
    raise config_lib.ConfigError(
        f"mesh data={data} does not split over --num_slices={slices}: only the data axis "
        f"spans slices; make mesh.data a multiple of {slices}.")
  if topology.devices_per_chip == 1:
    devices = mesh_utils.create_hybrid_device_mesh(
        (shape[0], data // slices) + shape[2:], (1, slices, 1, 1), topology.devices)
  else:  # slice-major, then id: each slice holds whole rows of the data axis
    ordered = sorted(topology.devices, key=lambda d: (getattr(d, "slice_index", 0), d.id))
    devices = np.array(ordered, dtype=object).reshape(shape)
  return Mesh(devices, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def _shard_bytes(leaf: Any) -> int:
  """Bytes of one device's shard of a ShapeDtypeStruct that carries a sharding."""
  return math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def _tree_bytes(tree: Any) -> int:
  import jax
  return sum(_shard_bytes(leaf) for leaf in jax.tree.leaves(tree))


def plan(config: config_lib.Config, mesh, hbm_bytes: int | None = None) -> dict[str, Any]:
  """Compiles the train step for `mesh` without running it; per-device bytes and FLOPs.

  `hbm_bytes`: one device's memory (a TPU chip's HBM / devices per chip), if known; the result
  then says whether the step `fits` (total bytes <= hbm_bytes). A compiler that refuses the step
  for lack of memory (the TPU compiler does: RESOURCE_EXHAUSTED) gives `fits: False`, its message
  as `compile_error`, and None for the numbers only a compiled step has. Raises ConfigError for a
  batch that does not split over data x fsdp (before compiling).
  """
  import jax

  from jaxlm import model as model_lib
  from jaxlm import pipeline
  from jaxlm import steps as steps_lib

  start = time.perf_counter()
  steps = steps_lib.make_steps(config, mesh)
  state, batch = steps.abstract_state, steps_lib.abstract_batch(config, mesh)
  compiled, compile_error = None, None
  try:
    compiled = steps.compile_train(state, batch)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    compile_error = " ".join(str(e).split())
  compile_seconds = time.perf_counter() - start

  num_devices = mesh.devices.size
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  seq_len = config.data.seq_len
  tokens_per_step = config.train.global_batch_size * seq_len
  model_flops = model_lib.flops_per_token(config.model, seq_len) * tokens_per_step / num_devices
  result = {
      "num_devices": num_devices,
      "platform": mesh.devices.flat[0].platform,
      "device_kind": mesh.devices.flat[0].device_kind,
      "mesh": {name: int(size) for name, size in mesh.shape.items()},
      "global_batch_size": config.train.global_batch_size,
      "microbatches": config.train.microbatches,
      # Pipeline stages: each device holds its stage's layers; GPipe idles this share of a step.
      "pipeline_stages": int(mesh.shape["stage"]),
      "pipeline_microbatches": config.train.pipeline_microbatches,
      "bubble_fraction": pipeline.bubble_fraction(mesh.shape["stage"],
                                                  config.train.pipeline_microbatches),
      "seq_len": seq_len,
      "per_device_batch": config.train.global_batch_size // ways,
      "tokens_per_step": tokens_per_step,
      "num_params": model_lib.count_params(state.params),
      "scan_layers": config.model.scan_layers,
      "remat_policy": config.model.remat_policy,
      "dtype": config.model.dtype,
      # What attention_impl (e.g. 'auto') compiles to for these devices and seq_len.
      "attention": model_lib.attention_kernel(config.model, seq_len,
                                              mesh.devices.flat[0].platform),
      # Per device, in bytes.
      "param_bytes": _tree_bytes(state.params),
      "opt_state_bytes": _tree_bytes(state.opt_state),
      "batch_bytes": _tree_bytes(batch),
      # the step counter, rng, spike statistics, rollback and loss-scale scalars
      "other_state_bytes": _tree_bytes([getattr(state, f.name) for f in dataclasses.fields(state)
                                        if f.name not in ("params", "opt_state")]),
      "argument_bytes": None,
      "output_bytes": None,
      "alias_bytes": None,
      "temp_bytes": None,
      "total_bytes": None,
      "hbm_bytes": hbm_bytes,
      "fits": False if compile_error else None,
      "compile_error": compile_error,
      # Per device, per step.
      "xla_flops_per_device": None,
      "model_flops_per_device": model_flops,
      "compile_seconds": round(compile_seconds, 2),
  }
  if compiled is not None:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per module
    argument = memory.argument_size_in_bytes
    output, alias = memory.output_size_in_bytes, memory.alias_size_in_bytes
    temp = memory.temp_size_in_bytes
    total = steps_lib.step_bytes(compiled)  # (argument + output - alias + temp: what training logs)
    result.update(argument_bytes=argument, output_bytes=output, alias_bytes=alias,
                  temp_bytes=temp, total_bytes=total,
                  fits=None if hbm_bytes is None else total <= hbm_bytes,
                  xla_flops_per_device=float(cost.get("flops", 0.0)) if cost else None)
  return result


def _bytes(n: float | None) -> str:
  if n is None:
    return "n/a"
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
      ("outputs not aliased",
       None if r["output_bytes"] is None else r["output_bytes"] - r["alias_bytes"]),
      ("step, rng, scalars", r["other_state_bytes"]),
  ]
  topology = r.get("topology")
  where = f"{r['num_devices']} {r['platform']} devices"
  if topology:
    slices = f" x {topology['num_slices']} slices" if topology["num_slices"] > 1 else ""
    where = (f"{r['num_devices']} {r['device_kind']} devices ({topology['name']}{slices}, "
             f"{topology['chips']} chips, TPU compiler)")
  lines = [
      f"plan {config_path} on {where} (compiled in {r['compile_seconds']:.1f} s)",
      f"mesh              {mesh}",
      *([f"pipeline          {r['pipeline_stages']} stages x {r['pipeline_microbatches']} "
         f"microbatches: bubble {r['bubble_fraction']:.0%} of each step (GPipe); memory below "
         f"is one stage's device"] if r.get("pipeline_stages", 1) > 1 else []),
      f"batch             global {r['global_batch_size']} x seq_len {r['seq_len']} = "
      f"{r['tokens_per_step']:,} tokens/step; per device {r['per_device_batch']}{micro}",
      f"parameters        {r['num_params']:,}",
      f"attention         {r['attention']}"
      + (" (Pallas kernel; --config.model.attention_impl=xla for XLA's attention)"
         if r.get("attention") in ("splash", "triton") else ""),
      "memory per device",
  ]
  lines += [f"  {name:<20}{_bytes(value):>12}" for name, value in rows]
  lines.append(f"  {'total':<20}{_bytes(r['total_bytes']):>12}")
  if r.get("hbm_bytes"):
    per = (f" (chip's / {topology['devices_per_chip']})"
           if topology and topology["devices_per_chip"] > 1 else "")
    if r["total_bytes"] is None:
      verdict = "does NOT fit"
    else:
      verdict = (f"{'fits' if r['fits'] else 'does NOT fit'} "
                 f"({r['total_bytes'] / r['hbm_bytes']:.0%} used)")
    lines.append(f"  {'HBM' + per:<20}{_bytes(r['hbm_bytes']):>12}  {verdict}")
  if r.get("compile_error"):
    lines.append(f"  compiler: {r['compile_error']}")
  xla, model = r["xla_flops_per_device"], r["model_flops_per_device"]
  ratio = f" ({xla / model:.2f}x model)" if xla and model else ""
  note = ("  (counts the scanned body once)"
          if xla and (r["scan_layers"] or r["microbatches"] > 1) else "")
  lines += [
      "FLOPs per step per device",
      f"  {'XLA cost analysis':<20}{_flops(xla):>12}{ratio}{note}",
      f"  {'model (analytic)':<20}{_flops(model):>12}",
  ]
  return "\n".join(lines)


# --search: rematerialization policies tried (least to most recomputation), and the FLOPs
# factor used for a policy whose unscanned step the compiler refused (no cost analysis): full
# remat recomputes the forward pass (6N -> 8N per token); the partial policies less.
SEARCH_REMAT = ("none", "dots_with_no_batch_dims_saveable", "full")
_REMAT_FLOPS_FACTOR = {"none": 1.0, "dots_with_no_batch_dims_saveable": 7 / 6, "full": 4 / 3}


def search(config: config_lib.Config, mesh, memory_bytes: int | None,
           peak_flops_per_device: float | None = None,
           plans: dict[tuple[str, bool, int], dict[str, Any]] | None = None) -> dict[str, Any]:
  """Plans every (remat policy x scan_layers x microbatches) candidate and recommends the
  fastest one that fits in `memory_bytes` per device.

  Microbatches start at 1 and double (while they divide the per-device batch) until the step
  fits. Speed is judged by the compiler's cost analysis: the FLOPs per device of the
  unscanned, single-microbatch step with that remat policy (XLA counts a scanned or
  microbatched loop body once, so those compiles cannot tell; scan and microbatches do not
  change the FLOPs). Ties go to fewer microbatches (larger matmuls), then to unscanned layers
  (measured 1.27x faster than scanned on an H200). `est_step_seconds` = FLOPs / peak, a
  compute-bound lower bound, when the peak is known. `plans`: compiled plans by (remat, scan,
  microbatches), reused and filled in (searching the same config against other memory sizes
  compiles nothing twice).
  """
  plans = {} if plans is None else plans
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  per_device = config.train.global_batch_size // ways
  candidates, flops_by_remat = [], {}
  for remat in SEARCH_REMAT:
    for scan in (False, True):
      microbatches = 1
      while True:
        key = (remat, scan, microbatches)
        if key not in plans:
          candidate = config_lib.replace(config, model={"remat_policy": remat,
                                                        "scan_layers": scan},
                                         train={"microbatches": microbatches})
          plans[key] = plan(candidate, mesh)
        result = dict(plans[key], hbm_bytes=memory_bytes)
        if result["total_bytes"] is not None and memory_bytes is not None:
          result["fits"] = result["total_bytes"] <= memory_bytes
        if not scan and microbatches == 1:
          flops_by_remat[remat] = result["xla_flops_per_device"] or (
              result["model_flops_per_device"] * _REMAT_FLOPS_FACTOR[remat])
        candidates.append(result)
        doubled = microbatches * 2
        if result["fits"] is not False or doubled > per_device or per_device % doubled:
          break
        microbatches = doubled
  for result in candidates:
    result["search_flops_per_device"] = flops_by_remat[result["remat_policy"]]
    result["est_step_seconds"] = (result["search_flops_per_device"] / peak_flops_per_device
                                  if peak_flops_per_device else None)
  fitting = [r for r in candidates if r["fits"] is not False]
  best = min(fitting, key=lambda r: (r["search_flops_per_device"], r["microbatches"],
                                     r["scan_layers"]), default=None)
  recommended = None
  if best is not None:
    recommended = {"model.remat_policy": best["remat_policy"],
                   "model.scan_layers": best["scan_layers"],
                   "train.microbatches": best["microbatches"]}
  return {"candidates": candidates, "recommended": recommended, "memory_bytes": memory_bytes}


def format_search(result: dict[str, Any]) -> str:
  header = ("remat_policy", "scan", "microbatches", "temporaries", "total", "fits",
            "FLOP/device (cost analysis)", "est. step s", "compile s")
  rows = [header]
  for r in result["candidates"]:
    fits = {True: "yes", False: "no", None: "?"}[r["fits"]]
    seconds = r["est_step_seconds"]
    rows.append((r["remat_policy"], str(r["scan_layers"]).lower(), str(r["microbatches"]),
                 _bytes(r["temp_bytes"]) if r["temp_bytes"] is not None else "-",
                 _bytes(r["total_bytes"]) if r["total_bytes"] is not None else "-", fits,
                 _flops(r["search_flops_per_device"]),
                 "n/a" if seconds is None else f"{seconds:.3f}", f"{r['compile_seconds']:.1f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
  memory = result["memory_bytes"]
  lines.append(f"memory per device: {_bytes(memory) if memory else 'unknown'}")
  best = result["recommended"]
  lines.append("recommended: " + (" ".join(f"--config.{k}={str(v).lower()}"
                                           for k, v in best.items())
                                  if best else "nothing fits; use more devices (mesh.fsdp), a "
                                               "smaller batch or sequence, or bfloat16"))
  return "\n".join(lines)
