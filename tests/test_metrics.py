"""jaxlm.metrics: peak FLOP/s for MFU from data sheets or a measured probe, never NaN."""

import dataclasses
import json
import math
import time

import jax
import jax.numpy as jnp
import pytest

from jaxlm import metrics


@dataclasses.dataclass
class FakeDevice:
  platform: str
  device_kind: str


@pytest.mark.parametrize("kind, dtype, expected", [
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 156e12),
    ("NVIDIA B200", "bfloat16", 2.25e15),
    ("NVIDIA L40S", "bfloat16", 362e12),
    ("NVIDIA L4", "bfloat16", 121e12),
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5", "bfloat16", 459e12),
    ("TPU v6 lite", "bfloat16", 918e12),
])
def test_data_sheet_peaks(kind, dtype, expected):
  assert metrics.data_sheet_peak(kind, dtype) == expected


def test_unknown_accelerator_gets_a_measured_probe_cached(monkeypatch, tmp_path):
  devices = [FakeDevice("gpu", "NVIDIA Future 9000")] * 2
  monkeypatch.setattr(jax, "devices", lambda *a: devices)
  monkeypatch.setattr(jax, "device_count", lambda *a: len(devices))
  probes = []

  def probe(size, dtype, device):
    probes.append((size, str(dtype), device.device_kind))
    return 5e14

  monkeypatch.setattr(metrics, "measure_matmul_flops", probe)
  assert metrics.data_sheet_peak("NVIDIA Future 9000", "bfloat16") is None
  for _ in range(2):  # measured once, then read from the cache file
    assert metrics.peak_flops("bfloat16", str(tmp_path)) == 2 * 5e14
  assert probes == [(4096, "bfloat16", "NVIDIA Future 9000")]
  cache = json.loads((tmp_path / "peak_flops.json").read_text())
  assert any("NVIDIA Future 9000" in key for key in cache)


def test_known_accelerator_uses_the_data_sheet(monkeypatch):
  monkeypatch.setattr(jax, "devices", lambda *a: [FakeDevice("gpu", "NVIDIA H200")] * 8)
  monkeypatch.setattr(jax, "device_count", lambda *a: 8)
  monkeypatch.setattr(metrics, "measure_matmul_flops", lambda *a, **k: pytest.fail("probed"))
  assert metrics.peak_flops("bfloat16") == 8 * 989e12


def test_cpu_probe_is_finite_and_positive(tmp_path):
  peak = metrics.peak_flops("float32", str(tmp_path))
  assert math.isfinite(peak) and peak > 0


def test_loss_plot_adds_a_task_accuracy_panel_when_tasks_were_scored(tmp_path):
  import struct

  def png_width(path):
    with open(path, "rb") as f:
      return struct.unpack(">I", f.read(24)[16:20])[0]

  records = [{"step": s, "train_loss": 5.0 - s / 10} for s in range(1, 11)]
  metrics.plot_losses(records, 64, str(tmp_path / "plain.png"))
  records += [{"step": 5, "eval_loss": 4.6, "eval_lambada_acc": 0.1, "eval_hellaswag_acc": 0.25,
               "eval_hellaswag_acc_norm": 0.3},
              {"step": 10, "eval_loss": 4.1, "eval_lambada_acc": 0.2, "eval_hellaswag_acc": 0.3,
               "eval_hellaswag_acc_norm": 0.35}]
  metrics.plot_losses(records, 64, str(tmp_path / "tasks.png"))
  assert png_width(tmp_path / "tasks.png") > 1.5 * png_width(tmp_path / "plain.png")


def test_a_line_cut_by_a_crash_is_dropped_and_the_resume_logs_it_again(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "train_loss": 2.5}\n{"step": 2, "train_loss": 2.4}\n{"step": 3, "tr')
  assert [r["step"] for r in metrics.read_jsonl(str(path))] == [1, 2]
  metrics.truncate_after(str(path), 2)  # what a resume from step 2 does
  assert path.read_text() == '{"step": 1, "train_loss": 2.5}\n{"step": 2, "train_loss": 2.4}\n'
  path.write_text('{"step": 1}\n{"step": 2}')  # complete, only its newline missing
  assert [r["step"] for r in metrics.read_jsonl(str(path))] == [1, 2]
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')  # damage inside the file is an error
  with pytest.raises(json.JSONDecodeError):
    metrics.read_jsonl(str(path))


def test_the_busy_clock_stops_while_jax_compiles():
  """Throughput windows are measured with `busy_clock`: a call that compiles a new program
  advances it by the wall time less the compile, which `compile_seconds` counts."""
  def program(x):  # many distinct ops: a compile of a noticeable fraction of a second
    for i in range(300):
      x = jnp.sin(x * (i + 1.5)) + x
    return x

  jitted, x = jax.jit(program), jnp.ones(4)
  y = x + 1  # (computed before the clocks are read: it compiles an addition)
  compiled_before, busy_before, wall_before = (metrics.compile_seconds(), metrics.busy_clock(),
                                               time.perf_counter())
  jax.block_until_ready(jitted(x))
  compiled = metrics.compile_seconds() - compiled_before
  busy, wall = metrics.busy_clock() - busy_before, time.perf_counter() - wall_before
  assert compiled > 0.5 * wall  # the call was mostly compiling, and it was counted
  assert busy == pytest.approx(wall - compiled, abs=0.01)
  jax.block_until_ready(jitted(y))  # the same shapes: no compile
  assert metrics.compile_seconds() - compiled_before == pytest.approx(compiled)
