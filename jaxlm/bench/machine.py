"""The conditions of a measurement: the machine and versions, other processes' CPU use during a
timed block, and peak-RSS growth (Linux /proc; elsewhere RSS numbers are NaN)."""

from __future__ import annotations

import os
import platform
import time

import jax
import jaxlib


def _status_kib(field: str) -> float:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return float(line.split()[1])
  except OSError:
    pass
  return float("nan")


def _reset_peak_rss() -> None:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM (peak RSS) to the current RSS
  except OSError:
    pass


def release_freed_memory() -> None:
  """Returns freed heap memory to the OS (glibc), so the next RSS growth is not hidden by
  reuse of memory an earlier measurement freed."""
  import gc
  gc.collect()
  try:
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


class RssPeak:
  """Peak-RSS growth over a `with` block, in bytes (VmHWM after - VmRSS before)."""

  def __enter__(self):
    _reset_peak_rss()
    self.start = _status_kib("VmRSS")
    return self

  def __exit__(self, *exc):
    self.bytes = (_status_kib("VmHWM") - self.start) * 1024
    return False


def _busy_seconds() -> float:
  """CPU seconds all processes spent busy since boot (/proc/stat), NaN if unavailable."""
  try:
    with open("/proc/stat") as f:
      fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return float("nan")


class OtherLoad:
  """How busy the rest of the machine was during a `with` block: CPU seconds used by other
  processes / (wall seconds * cores). 0 = quiet; 0.5 on 2 cores = one core taken."""

  def __enter__(self):
    self.busy, self.own, self.wall = _busy_seconds(), _own_cpu(), time.perf_counter()
    return self

  def __exit__(self, *exc):
    wall = time.perf_counter() - self.wall
    other = (_busy_seconds() - self.busy) - (_own_cpu() - self.own)
    # A share of the machine (0..1); /proc/stat counts in clock ticks, so over a short block
    # the rounding alone can push the raw ratio past 1.
    self.fraction = min(max(other, 0.0) / (wall * (os.cpu_count() or 1)), 1.0)
    return False


def _own_cpu() -> float:
  t = os.times()
  return t.user + t.system


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    return True
  except ImportError:
    return False


def machine_lines() -> list[str]:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  lines = [f"machine: {cpu}; {os.cpu_count()} logical cores; "
           f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'} usable",
           f"python {platform.python_version()}, jax {jax.__version__}, jaxlib "
           f"{jaxlib.__version__}, device {jax.devices()[0].device_kind}"]
  if torch_available():
    import torch
    import transformers
    lines.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
                 f"transformers {transformers.__version__}")
  lines.append(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  return lines
