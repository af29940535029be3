"""Measured numbers and where they go: FLOPs/MFU, JSONL + TensorBoard writers, loss plot."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import files

# Dense peak FLOP/s per device from vendors' data sheets: (bfloat16/float16, float32).
ACCELERATOR_PEAK_FLOPS = {
    "TPU v4": (275e12, 275e12 / 2),
    "TPU v5 lite": (197e12, 197e12 / 2),
    "TPU v5e": (197e12, 197e12 / 2),
    "TPU v5p": (459e12, 459e12 / 2),
    "TPU v6 lite": (918e12, 918e12 / 2),
    "NVIDIA A100-SXM4-40GB": (312e12, 19.5e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 19.5e12),
    "NVIDIA H100 80GB HBM3": (989e12, 67e12),
}


def measure_matmul_flops(size: int = 1024, dtype=jnp.float32, repeats: int = 10) -> float:
  """Best FLOP/s of a jitted [size, size] @ [size, size] matmul on the default device: the
  probe of what this host's XLA can reach (used as the CPU 'peak')."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def peak_flops(dtype: str, cache_dir: str | None = None) -> float:
  """Peak FLOP/s of all devices of this job.

  Accelerators: the data-sheet number per device times the device count. CPU: a matmul probe,
  measured once per host shape and cached in `cache_dir/peak_flops.json`, times the process
  count (simulated CPU devices of one process share one host's cores).
  """
  device = jax.devices()[0]
  if device.platform != "cpu":
    low, high = ACCELERATOR_PEAK_FLOPS.get(device.device_kind, (float("nan"),) * 2)
    return (high if dtype == "float32" else low) * jax.device_count()
  key = f"cpu-{os.cpu_count()}-{dtype}-jax{jax.__version__}"
  path = os.path.join(cache_dir, "peak_flops.json") if cache_dir else None
  cache = {}
  if path and os.path.exists(path):
    with open(path) as f:
      cache = json.load(f)
  if key not in cache:
    cache[key] = measure_matmul_flops(dtype=jnp.dtype(dtype))
    if path:
      files.write_json(path, cache)
  return cache[key] * jax.process_count()


class MetricWriter:
  """Appends one JSON object per line to metrics.jsonl and mirrors scalars to TensorBoard.

  Only process 0 writes (others get a disabled writer).
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard = None
    if enabled:
      from tensorboardX import SummaryWriter
      self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in record.items():
      if name != "step" and isinstance(value, (int, float)):
        self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()


def _plain(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    value = np.asarray(value).item()
  return value


def read_jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_after(path: str, step: int) -> None:
  """Drops records with step > `step` (a resumed run logs those steps again)."""
  records = read_jsonl(path)
  kept = [r for r in records if r.get("step", 0) <= step]
  if len(kept) != len(records):
    files.write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))


def new_figure(size: tuple[float, float]):
  """(figure, axes) drawn off screen. Matplotlib's object API, not pyplot: the global backend
  and pyplot's figure list stay untouched, so a notebook's inline plots keep working."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=size)
  return fig, fig.subplots()


def plot_losses(records: Iterable[Mapping[str, Any]], tokens_per_step: int, path: str) -> None:
  """Train and validation loss against tokens seen, as a PNG."""
  records = list(records)
  fig, ax = new_figure((7, 4.5))
  for key, label in (("train_loss", "train"), ("eval_loss", "validation")):
    points = [(r["step"] * tokens_per_step, r[key]) for r in records if key in r]
    if points:
      xs, ys = zip(*points)
      ax.plot(xs, ys, marker="o" if key == "eval_loss" else None, label=label)
  ax.set_xlabel("tokens seen")
  ax.set_ylabel("loss (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
