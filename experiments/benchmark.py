r"""Benchmarks, side by side with the reference in the same run (medians; the machine and
versions printed above each table). The measuring code is the library's `jaxlm.bench`; this
script parses the flags and prints.

  python -m experiments.benchmark train                       # small + default workloads
  python -m experiments.benchmark train --workload=small --steps=5 --repeats=7
  python -m experiments.benchmark train --workload=gpt2_124m  # GPU/TPU: bf16, batch 16
  python -m experiments.benchmark train --workload=gpt2_124m --batch_size=32
  python -m experiments.benchmark generate
  python -m experiments.benchmark kv
  python -m experiments.benchmark tasks
  python -m experiments.benchmark data
  python -m experiments.benchmark prepare

Modes (each module's docstring says what is measured and how):
  train     jaxlm's train step vs transformers.GPT2LMHeadModel + torch AdamW (jaxlm/bench/train.py)
  generate  KV-cache decoding vs full recompute, time per token (jaxlm/bench/generate.py)
  kv        KV-cache memory and ms/token: grouped-query and sliding-window attention vs
            multi-head on the same model (jaxlm/bench/generate.py)
  tasks     task scoring vs the model's plain forward pass (jaxlm/bench/tasks.py)
  data      the training loader vs nanoGPT's get_batch (jaxlm/bench/data.py)
  prepare   prepare_data's tokens/s per core vs the raw encode, and its peak RSS
            (jaxlm/bench/prepare.py)
"""

from __future__ import annotations

import json
import os

# jaxlm and torch share one GPU in this process: JAX must not grab 75% of its memory up front
# (its default), and its `peak_bytes_in_use` then counts only what jaxlm's step really holds.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
from typing import Any

from absl import app, flags

from experiments import common

WORKLOADS = ("small", "default", "gpt2_124m")  # (jaxlm.bench.train's; kept here so --help
CPU_WORKLOADS = ("small", "default")           # never imports jax)

MODES = ("train", "generate", "kv", "tasks", "data", "prepare")

_WORKLOAD = flags.DEFINE_enum(
    "workload", "all", (*WORKLOADS, "all"),
    "which workload(s); all = small + default on CPU, gpt2_124m on GPU/TPU.")
_BATCH = flags.DEFINE_integer("batch_size", None, "override the workload's global batch size.",
                              lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", None, ("float32", "bfloat16"),
                           "compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU).")
_TORCH_COMPILE = flags.DEFINE_bool(
    "torch_compile", None, "torch.compile the PyTorch reference (default: on GPU only).")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per block (per implementation).",
                              lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 5, "rounds of alternating blocks; medians over them.",
                                lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps per implementation first.",
                               lower_bound=0)
_TORCH = flags.DEFINE_bool("torch", True, "also run the PyTorch reference if importable.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads.", lower_bound=1)
_GENERATE_CONFIG = flags.DEFINE_string(
    "generate_config", "configs/gpt2_124m.py", "generate mode: model config (random weights).")
_GENERATE_REPEATS = flags.DEFINE_integer(
    "generate_repeats", 3, "generate mode: alternating cached/uncached rounds; medians.",
    lower_bound=1)
_UNCACHED_STEPS = flags.DEFINE_integer(
    "uncached_steps", 8, "generate mode: timed steps of the (constant-cost) uncached path.",
    lower_bound=1)
_TASKS_CONFIG = flags.DEFINE_string("tasks_config", "configs/adamw_cpu.py",
                                    "tasks mode: model config (random weights).")
_TASKS_PAIRS = flags.DEFINE_integer("tasks_pairs", 512, "tasks mode: context/continuation pairs.",
                                    lower_bound=1)
_TASKS_REPEATS = flags.DEFINE_integer("tasks_repeats", 3, "tasks mode: alternating rounds.",
                                      lower_bound=1)
_TASKS_BATCH = flags.DEFINE_integer("tasks_batch_size", 16, "tasks mode: rows per batch.",
                                    lower_bound=1)
_DATA_CONFIG = flags.DEFINE_string("data_config", "configs/adamw_cpu.py",
                                   "data mode: the config whose train split is loaded.")
_DATA_BATCHES = flags.DEFINE_integer("data_batches", 1000, "data mode: batches per timed block.",
                                     lower_bound=1)
_DATA_REPEATS = flags.DEFINE_integer("data_repeats", 5, "data mode: alternating rounds.",
                                     lower_bound=1)
_DATA_TOKENS = flags.DEFINE_string("data_tokens", "", "data mode: a prepare_data folder to read "
                                   "(data.corpus=tokens) instead of the config's corpus.")
_DATA_BATCH_SIZE = flags.DEFINE_integer("data_batch_size", 0, "data mode: rows per batch (0: the "
                                        "config's train.global_batch_size).", lower_bound=0)
_DATA_SEQ_LEN = flags.DEFINE_integer("data_seq_len", 0, "data mode: tokens per row (0: the "
                                     "config's data.seq_len).", lower_bound=0)
_PREPARE_MB = flags.DEFINE_list("prepare_mb", ["300", "3000"], "prepare mode: input sizes (MB) "
                                "to prepare, generated from the standard library's source.")
_PREPARE_DIR = flags.DEFINE_string("prepare_dir", "~/.cache/jaxlm/prepare_benchmark",
                                   "prepare mode: where the inputs are generated (kept).")
_PREPARE_TOKENIZER = flags.DEFINE_string("prepare_tokenizer", "", "prepare mode: tokenizer file "
                                         "(default: the default run's SentencePiece).")
_PREPARE_WORKERS = flags.DEFINE_integer("prepare_workers", 1, "prepare mode: --workers.",
                                        lower_bound=1)
_PEAK_CACHE = flags.DEFINE_string("peak_cache_dir", "~/.cache/jaxlm",
                                  "where the CPU matmul-probe peak FLOP/s is cached.")


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in MODES:
    raise app.UsageError(f"usage: python -m experiments.benchmark MODE [flags]; MODE is one of "
                         f"{', '.join(MODES)}.")
  common.quiet_logs()
  from jaxlm.bench import machine
  if argv[1] == "generate":
    from jaxlm.bench import generate as generate_benchmark
    rows = generate_benchmark.run_generate_benchmark(
        _GENERATE_CONFIG.value, generate_benchmark.GenerateSettings(
            repeats=_GENERATE_REPEATS.value, uncached_steps=_UNCACHED_STEPS.value))
    for line in machine.machine_lines():
      print(line)
    print(generate_benchmark.format_table(rows))
    return
  if argv[1] == "kv":
    from jaxlm.bench import generate as generate_benchmark
    rows = generate_benchmark.run_kv_benchmark(repeats=_GENERATE_REPEATS.value)
    for line in machine.machine_lines():
      print(line)
    print(generate_benchmark.format_kv_table(rows))
    return
  if argv[1] == "tasks":
    from jaxlm.bench import tasks as tasks_benchmark
    result = tasks_benchmark.run_tasks_benchmark(_TASKS_CONFIG.value, _TASKS_PAIRS.value,
                                                 _TASKS_REPEATS.value, _TASKS_BATCH.value)
    for line in machine.machine_lines():
      print(line)
    print(json.dumps(result))
    return
  if argv[1] == "prepare":
    from jaxlm.bench import prepare as prepare_benchmark
    result = prepare_benchmark.run_prepare_benchmark(
        [int(m) for m in _PREPARE_MB.value], os.path.expanduser(_PREPARE_DIR.value),
        _PREPARE_TOKENIZER.value, _PREPARE_WORKERS.value)
    for line in machine.machine_lines():
      print(line)
    print(prepare_benchmark.format_table(result))
    print(json.dumps(result))
    return
  if argv[1] == "data":
    from jaxlm.bench import data as data_benchmark
    overrides: dict[str, Any] = {}
    if _DATA_TOKENS.value:
      overrides["data"] = {"corpus": "tokens", "tokens": _DATA_TOKENS.value}
    if _DATA_BATCH_SIZE.value:
      overrides["train"] = {"global_batch_size": _DATA_BATCH_SIZE.value, "microbatches": 1}
    if _DATA_SEQ_LEN.value:
      overrides.setdefault("data", {}).update(seq_len=_DATA_SEQ_LEN.value, stride=0)
      overrides["model"] = {"max_seq_len": max(_DATA_SEQ_LEN.value, 1)}
    result = data_benchmark.run_data_benchmark(_DATA_CONFIG.value, _DATA_BATCHES.value,
                                               _DATA_REPEATS.value, overrides)
    for line in machine.machine_lines():
      print(line)
    print(data_benchmark.format_table(result))
    return
  import jax

  from jaxlm.bench import train as train_benchmark
  if _WORKLOAD.value != "all":
    workloads = [_WORKLOAD.value]
  else:
    workloads = list(CPU_WORKLOADS) if jax.default_backend() == "cpu" else ["gpt2_124m"]
  dtype = _DTYPE.value or train_benchmark.default_dtype()
  settings = train_benchmark.TrainSettings(
      steps=_STEPS.value, repeats=_REPEATS.value, warmup=_WARMUP.value, use_torch=_TORCH.value,
      torch_threads=_TORCH_THREADS.value, torch_compile=_TORCH_COMPILE.value, dtype=dtype,
      batch_size=_BATCH.value, peak_cache_dir=_PEAK_CACHE.value)
  rows, peak = train_benchmark.run_train(workloads, settings)
  for line in machine.machine_lines():
    print(line)
  print(f"peak ({dtype}, jaxlm.metrics.peak_flops): {peak / 1e12:.3f} TFLOP/s; data: random "
        f"token ids; {_STEPS.value} steps x {_REPEATS.value} alternating rounds, medians")
  print(train_benchmark.format_table(rows))
  for r in rows:
    print(f"{r.workload}/{r.implementation} tokens/s per block (other processes' CPU share): "
          + ", ".join(f"{x:,.0f} ({load:.0%})"
                      for x, load in zip(r.block_tokens_per_second, r.block_other_load)))
  busiest = max(r.other_load for r in rows)
  print(f"other processes used up to a median {busiest:.0%} of the machine's CPU during the timed "
        f"blocks: {'quiet' if busiest < 0.05 else 'SHARED machine, numbers are noisy'}.")


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
