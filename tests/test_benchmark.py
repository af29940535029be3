"""jaxlm.bench (experiments/benchmark.py's modes): the real code paths on tiny workloads (not
timings)."""

import dataclasses
import math

import pytest

from jaxlm import config as config_lib
from jaxlm.bench import machine
from jaxlm.bench import train as benchmark

TINY = {"model": {"num_layers": 2, "num_heads": 2, "embed_dim": 32, "mlp_dim": 128,
                  "vocab_size": 97, "max_seq_len": 16},
        "data": {"seq_len": 16, "stride": 16},
        "train": {"global_batch_size": 4},
        "mesh": {"data": 1}}


def test_workload_configs_are_valid_float32_single_device():
  small = benchmark.workload_config("small")
  assert (small.model.num_layers, small.model.num_heads, small.model.embed_dim,
          small.model.mlp_dim, small.model.vocab_size, small.data.seq_len,
          small.train.global_batch_size) == (6, 6, 384, 1536, 8192, 256, 16)
  assert small.model.tie_embeddings and small.model.dropout == 0
  default = benchmark.workload_config("default")
  for config in (small, default):
    assert config.model.dtype == "float32"
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (1, 1, 1)
  # The accelerator workload: GPT-2 124M as nanoGPT benchmarks it, bf16 when asked.
  gpt2 = benchmark.workload_config("gpt2_124m", "bfloat16")
  assert (gpt2.model.num_layers, gpt2.model.embed_dim, gpt2.model.vocab_size, gpt2.data.seq_len,
          gpt2.train.global_batch_size, gpt2.model.dtype) == (12, 768, 50304, 1024, 16,
                                                              "bfloat16")
  assert benchmark.workload_config("gpt2_124m", batch_size=32).train.global_batch_size == 32
  assert benchmark.default_dtype() == "float32"  # on this CPU


@pytest.mark.e2e
@pytest.mark.parametrize("use_torch", [True, False])
def test_train_table_rows(tmp_path, use_torch):
  if use_torch and not machine.torch_available():
    pytest.skip("torch/transformers not installed")
  config = config_lib.validate(TINY)
  settings = benchmark.TrainSettings(steps=2, repeats=2, warmup=1, use_torch=use_torch,
                                     peak_cache_dir=str(tmp_path))
  rows, peak = benchmark.run_train(["tiny"], settings, configs={"tiny": config})
  assert peak > 0
  assert [r.implementation for r in rows] == (["jaxlm", "torch"] if use_torch else ["jaxlm"])
  for row in rows:
    assert row.workload == "tiny"
    assert len(row.block_tokens_per_second) == 2
    assert row.tokens_per_second > 0 and row.mfu > 0
    assert row.peak_memory_mib > 0 and row.memory_method
    assert 0 <= row.other_load <= 1 or math.isnan(row.other_load)
    assert len(row.block_other_load) == 2
    assert row.compile_seconds > 0 and row.setup
  jaxlm = rows[0]
  assert (jaxlm.ratio is not None) == use_torch
  table = benchmark.format_table(rows)
  lines = table.splitlines()
  assert lines[0].split()[:5] == ["workload", "implementation", "setup", "tokens/s", "MFU"]
  assert len(lines) == 1 + len(rows)
  assert all(line.startswith("tiny") for line in lines[1:])


def test_machine_lines_name_cpu_and_versions():
  text = "\n".join(machine.machine_lines())
  assert "machine:" in text and "jax" in text


@pytest.mark.e2e
def test_generate_table_rows():
  from jaxlm.bench import generate as generate_benchmark
  settings = generate_benchmark.GenerateSettings(
      batch_sizes=(2,), prompt_tokens=4, new_tokens=8, total_tokens=16, long_tokens=40,
      repeats=1, uncached_steps=1)
  rows = generate_benchmark.run_generate_benchmark("configs/default.py", settings,
                                                   log=lambda message: None)
  measurements = {(r["measurement"], r.get("kv_cache")) for r in rows}
  assert ("throughput", True) in measurements and ("throughput", False) in measurements
  cached = [r for r in rows if r["measurement"] == "throughput" and r["kv_cache"]][0]
  assert cached["tokens_per_second"] > 0 and cached["speedup"] > 0
  assert any("growth" in r for r in rows)
  table = generate_benchmark.format_table(rows)
  assert table.count("\n") == len(rows) + 1


@pytest.mark.e2e
def test_tasks_mode_scores_and_runs_the_plain_forward_on_the_same_batches(tmp_path):
  from jaxlm.bench import tasks as tasks_benchmark
  config_file = tmp_path / "tiny.py"
  config_file.write_text(
      "def get_config():\n"
      "  return {'model': {'num_layers': 1, 'num_heads': 2, 'embed_dim': 32, 'mlp_dim': 64,\n"
      "                    'vocab_size': 600, 'max_seq_len': 64},\n"
      "          'data': {'seq_len': 64, 'stride': 64}}\n")
  result = tasks_benchmark.run_tasks_benchmark(str(config_file), num_pairs=24, repeats=1,
                                               batch_size=8)
  assert result["pairs"] == 24 and result["batches"] == 3
  assert result["padded_tokens"] >= 24 * 16
  assert result["scoring_tokens_per_second"] > 0 and result["forward_tokens_per_second"] > 0


@pytest.mark.e2e
def test_out_of_range_flags_and_a_short_context_are_one_line():
  """--steps=0 ended in an UnboundLocalError, --repeats=0 in a StatisticsError, and the
  generate mode ran 1,016 tokens through a model of context 128."""
  import subprocess
  import sys

  from tests.conftest import REPO
  for args, expected in [(["train", "--steps=0"], "error: flag --steps=0: 0 is not a positive"),
                         (["generate", "--generate_repeats=0"], "error: flag --generate_repeats"),
                         (["generate", "--generate_config=configs/small.py"],
                          "error: configs/small.py: model.max_seq_len=128 is shorter than the "
                          "benchmark's longest generation (1016 tokens)")]:
    result = subprocess.run([sys.executable, "-m", "experiments.benchmark", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        expected), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_data_mode_loads_the_real_train_split_with_both_loaders(tmp_path):
  """DESIGN's benchmark lists data throughput: jaxlm's loader against nanoGPT's get_batch."""
  import json as json_module
  import os

  from jaxlm.bench import data as data_benchmark
  config_file = tmp_path / "tiny.py"
  files = os.path.join(os.path.dirname(json_module.__file__), "*.py")  # (a small real corpus)
  config_file.write_text(
      "from jaxlm.config import default_config_dict\n"
      "def get_config():\n"
      "  c = default_config_dict()\n"
      "  c.model.update(vocab_size=512, max_seq_len=32)\n"
      f"  c.data.update(corpus='text_files', files={files!r}, seq_len=32,"
      f" data_dir={str(tmp_path / 'cache')!r})\n"
      "  c.train.update(global_batch_size=4)\n"
      "  return c\n")
  result = data_benchmark.run_data_benchmark(str(config_file), batches=5, repeats=2)
  assert result["train_tokens"] > 1000 and result["global_batch_size"] == 4
  assert result["jaxlm_tokens_per_second"] > 0
  assert result["nanogpt_get_batch_tokens_per_second"] > 0
  table = data_benchmark.format_table(result)
  assert "| jaxlm loader (shuffled, segment ids, resumable) |" in table
  assert "| nanoGPT get_batch in numpy (random offsets) |" in table
  assert "jaxlm / nanoGPT get_batch:" in table


@pytest.mark.e2e
def test_kv_mode_measures_cache_memory_and_speed_of_each_attention():
  from jaxlm.bench import generate as generate_benchmark
  tiny = dataclasses.replace(generate_benchmark.KV_MODEL, num_layers=1, embed_dim=64,
                             mlp_dim=128, vocab_size=256)
  rows = generate_benchmark.run_kv_benchmark(
      new_tokens=128, chunk=64, repeats=1, log=lambda message: None,
      variants=generate_benchmark.kv_variants(tiny, window=32))
  mib = {r["attention"]: (r["cache_mib_1040"], r["cache_mib_4096"]) for r in rows}
  full, grouped = mib["multi-head"], mib["grouped-query 2/8"]
  windowed = mib["grouped-query 2/8, window 32"]
  assert abs(grouped[0] * 4 - full[0]) < 0.1 * full[0]        # 2 kv heads of 8: a quarter
  assert abs(full[1] / full[0] - 4096 / 1040) < 0.05          # grows with the slots...
  assert windowed[0] == windowed[1] < grouped[0] / 3          # ...but a ring does not
  assert all(r["ms_per_token_first"] > 0 and r["ms_per_token_last"] > 0 for r in rows)
  assert generate_benchmark.format_kv_table(rows).count("\n") == 4
