"""Measured numbers and where they go: FLOPs/MFU, JSONL + TensorBoard writers, loss plot."""

from __future__ import annotations

import json
import os
import secrets
import sys
import threading
import time
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import files
from jaxlm.errors import UserError

# Dense (no sparsity) peak FLOP/s per device from vendors' data sheets, as
# (substring of jax's device_kind, bfloat16/float16 peak, float32 peak). The first match wins,
# so longer names come before their prefixes ("H100 PCIe" before "H100", "L40S" before "L4").
# float32 on NVIDIA tensor-core GPUs: XLA runs float32 matmuls as TF32 by default, so the TF32
# peak is the honest denominator. TPUs have no float32 matmul unit (XLA splits float32 into
# bfloat16 passes): half the bfloat16 peak is used. A device in none of these rows gets a
# measured matmul probe (`measure_matmul_flops`) instead, never NaN.
DEVICE_PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("TPU v6 lite", 918e12, 459e12),    # v6e (Trillium)
    ("TPU v6e", 918e12, 459e12),
    ("TPU v5 lite", 197e12, 98.5e12),   # v5e
    ("TPU v5e", 197e12, 98.5e12),
    ("TPU v5p", 459e12, 229.5e12),
    ("TPU v5", 459e12, 229.5e12),       # jax calls a v5p chip "TPU v5"
    ("TPU v4", 275e12, 137.5e12),
    ("B200", 2.25e15, 1.1e15),
    ("H200", 989e12, 494.7e12),         # same compute as H100 SXM, more and faster HBM
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", 835e12, 417.5e12),
    ("H100", 989e12, 494.7e12),         # SXM: "NVIDIA H100 80GB HBM3"
    ("GH200", 989e12, 494.7e12),
    ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("V100", 125e12, 15.7e12),          # float16 tensor cores; no bfloat16
)


def data_sheet_peak(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of one device of `device_kind` for compute `dtype`, or None if unknown."""
  for name, low_precision, full_precision in DEVICE_PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return full_precision if dtype == "float32" else low_precision
  return None


def measure_matmul_flops(size: int = 1024, dtype=jnp.float32, repeats: int = 10,
                         device: jax.Device | None = None) -> float:
  """Best FLOP/s of a jitted [size, size] @ [size, size] matmul on `device` (default: the
  first device): what this device's XLA can reach, the 'peak' where no data sheet is known."""
  a = jax.device_put(jnp.ones((size, size), dtype), device or jax.devices()[0])
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def peak_flops(dtype: str, cache_dir: str | None = None) -> float:
  """Peak FLOP/s of all devices of this job, for compute `dtype` (always finite and > 0).

  Accelerators in `DEVICE_PEAK_FLOPS`: the data-sheet number per device times the device
  count. Any other device (CPU, or an accelerator missing from the table): a matmul probe
  (4096-square on accelerators, 1024 on CPU), measured once per device kind and cached in
  `cache_dir/peak_flops.json`, times the number of devices (CPU: times the process count,
  since simulated CPU devices of one process share one host's cores).
  """
  device = jax.devices()[0]
  if device.platform != "cpu":
    known = data_sheet_peak(device.device_kind, dtype)
    if known is not None:
      return known * jax.device_count()
    key = f"{device.platform}-{device.device_kind}-{dtype}-jax{jax.__version__}"
    size, multiplier = 4096, jax.device_count()
  else:
    key = f"cpu-{os.cpu_count()}-{dtype}-jax{jax.__version__}"
    size, multiplier = 1024, jax.process_count()
  path = os.path.join(cache_dir, "peak_flops.json") if cache_dir else None
  cache = (files.read_json(path) if path else None) or {}
  if key not in cache:
    cache[key] = measure_matmul_flops(size, dtype=jnp.dtype(dtype), device=device)
    if path:
      files.write_json(path, cache)
  return cache[key] * multiplier


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compiling = {"seconds": 0.0, "listening": False}
_compiling_lock = threading.Lock()


def compile_seconds() -> float:
  """Seconds JAX has spent tracing, lowering and compiling in this process since the first call
  (which starts listening to JAX's compile events)."""
  with _compiling_lock:
    if not _compiling["listening"]:
      def listener(event: str, duration_secs: float, **_):
        if event in _COMPILE_EVENTS:
          _compiling["seconds"] += duration_secs
      jax.monitoring.register_event_duration_secs_listener(listener)
      _compiling["listening"] = True
  return _compiling["seconds"]


def busy_clock() -> float:
  """A clock (seconds) that stops while JAX compiles: two readings differ by the wall time
  between them less its compiles. Throughput is measured with it, so that a step that compiles
  a new shape (a fine-tuning batch of a new length) does not count the compile as training."""
  return time.perf_counter() - compile_seconds()


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch and google.cloud.storage:
  tensorboardX imports torch whenever it is installed (to accept torch tensors; we log Python
  floats), which cost every training process 2.8 s of startup here, and google.cloud.storage
  (to write gs:// event files; ours are local, jaxlm/remote.py copies them) 0.3 s. Both stay
  importable afterwards."""
  if "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  blocked = [name for name in ("torch", "google.cloud.storage") if name not in sys.modules]
  for name in blocked:
    sys.modules[name] = None  # `import name` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter
  finally:
    for name in blocked:
      del sys.modules[name]
  return SummaryWriter


class WriteError(UserError):
  """A run file could not be written (no space left, no permission)."""


class MetricWriter:
  """Appends one JSON object per line to metrics.jsonl and mirrors scalars to TensorBoard.

  Only process 0 writes (others get a disabled writer).
  """

  def __init__(self, workdir: str, enabled: bool = True, wandb_project: str = "",
               config: Mapping[str, Any] | None = None):
    """wandb_project: also log to this Weights & Biases project (`check_wandb` first), as one W&B
    run per run directory (its id kept in `wandb_id`), with `config`."""
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard = self.wandb = None
    if enabled:
      self.tensorboard = _summary_writer_class()(os.path.join(workdir, "tensorboard"))
      if wandb_project:
        self.wandb = _wandb_run(workdir, wandb_project, config)

  def write(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    except OSError as e:  # a full disk or a read-only workdir: one line, not a traceback
      raise WriteError(f"writing {self.path} failed ({e.strerror or e}); free disk space or make "
                       f"the workdir writable, then rerun with the same --workdir: it resumes "
                       f"from its last checkpoint.") from e
    scalars = {name: value for name, value in record.items()
               if name != "step" and isinstance(value, (int, float))}
    for name, value in scalars.items():
      self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()
    if self.wandb is not None:
      self.wandb.log(scalars, step=int(step))

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()
    if self.wandb is not None:
      self.wandb.finish()


def check_wandb(project: str) -> None:
  """WriteError (one line) when train.wandb_project is set but wandb is not installed: checked
  before a run starts."""
  if not project:
    return
  try:
    import wandb  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise WriteError(f"train.wandb_project={project!r} needs Weights & Biases: pip install "
                     f"wandb (or leave train.wandb_project empty).") from None


def _wandb_run(workdir: str, project: str, config: Mapping[str, Any] | None):
  import wandb  # pylint: disable=import-outside-toplevel  (optional)
  id_path = os.path.join(workdir, "wandb_id")
  if os.path.exists(id_path):
    with open(id_path) as f:
      run_id = f.read().strip()
  else:
    run_id = secrets.token_hex(8)
    files.write_bytes(id_path, run_id.encode())
  return wandb.init(project=project, dir=workdir, id=run_id, resume="allow",
                    name=os.path.basename(os.path.abspath(workdir)), config=dict(config or {}))


def _plain(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    value = np.asarray(value).item()
  return value


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a JSONL file. A last line without its newline that does not parse is
  dropped: the write a crash (kill -9) cut short; the resumed run logs that step again."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    *complete, last = f.read().split("\n")
  records = [json.loads(line) for line in complete if line.strip()]
  if last.strip():
    try:
      records.append(json.loads(last))
    except json.JSONDecodeError:
      pass
  return records


def _ends_with_newline(path: str) -> bool:
  """True for an empty or missing file, or one whose last write completed its line."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return True
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def truncate_after(path: str, step: int) -> None:
  """Drops records with step > `step` (a resumed run logs those steps again), and a last line
  cut short by a crash, so that the next record starts on a line of its own."""
  records = read_jsonl(path)
  kept = [r for r in records if r.get("step", 0) <= step]
  if len(kept) != len(records) or not _ends_with_newline(path):
    files.write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))


def new_figure(size: tuple[float, float], panels: int = 1):
  """(figure, axes) drawn off screen (`panels` > 1: an array of axes side by side).
  Matplotlib's object API, not pyplot: the global backend and pyplot's figure list stay
  untouched, so a notebook's inline plots keep working."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=size)
  return fig, fig.subplots(1, panels)


def plot_losses(records: Iterable[Mapping[str, Any]], tokens_per_step: float, path: str,
                train_key: str = "train_loss") -> None:
  """Train (`train_key`) and validation loss against tokens seen, as a PNG; with a second
  panel of the task accuracies (eval_TASK_acc, train.eval_tasks) when the run scored any."""
  records = list(records)
  accuracy_keys = sorted({k for r in records for k in r
                          if k.startswith("eval_") and k.endswith(("_acc", "_acc_norm"))})
  fig, axes = new_figure((12, 4.5) if accuracy_keys else (7, 4.5), 2 if accuracy_keys else 1)
  ax = axes[0] if accuracy_keys else axes
  if accuracy_keys:
    for key in accuracy_keys:
      xs, ys = zip(*[(r["step"] * tokens_per_step, r[key]) for r in records if key in r])
      axes[1].plot(xs, ys, marker="o", label=key[len("eval_"):])
    axes[1].set_xlabel("tokens seen")
    axes[1].set_ylabel("task accuracy")
    axes[1].grid(alpha=0.3)
    axes[1].legend()
  for key, label in ((train_key, "train"), ("eval_loss", "validation"),
                     ("validation_loss", "validation")):
    points = [(r["step"] * tokens_per_step, r[key]) for r in records if key in r]
    if points:
      xs, ys = zip(*points)
      ax.plot(xs, ys, marker=None if key == train_key else "o", label=label)
  ax.set_xlabel("tokens seen")
  ax.set_ylabel("loss (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
