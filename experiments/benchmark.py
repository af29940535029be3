r"""Benchmarks: training throughput of jaxlm against a PyTorch reference, in one process;
generation (experiments/generate_benchmark.py); task scoring (experiments/tasks_benchmark.py);
the input pipeline against nanoGPT's get_batch (experiments/data_benchmark.py); token
preparation against the raw tokenizer (experiments/prepare_benchmark.py).

  python -m experiments.benchmark train                       # small + default workloads
  python -m experiments.benchmark train --workload=small --steps=5 --repeats=7
  python -m experiments.benchmark train --workload=gpt2_124m  # GPU/TPU: bf16, batch 16
  python -m experiments.benchmark train --workload=gpt2_124m --batch_size=32
  python -m experiments.benchmark generate
  python -m experiments.benchmark tasks
  python -m experiments.benchmark data
  python -m experiments.benchmark prepare

On a GPU the workload runs in bfloat16 (float32 parameters) with attention_impl=auto (cuDNN),
and the PyTorch peer is transformers.GPT2LMHeadModel with SDPA attention, torch.compile, bf16
autocast and fused AdamW; peak memory is the JAX allocator's peak_bytes_in_use (jaxlm) and
torch.cuda.max_memory_allocated (torch), and the compile column is jaxlm's AOT compile and
torch's first step. For clean memory numbers run one setting per process (JAX's peak is a
process-lifetime peak).

`train` times full training steps (forward + backward + clip + AdamW update) after compilation:
jaxlm's real `steps.make_steps` step on 1 device in float32, and, when `torch` and
`transformers` are importable, `transformers.GPT2LMHeadModel` (eager attention, float32,
torch.optim.AdamW with the same hyperparameters and decay groups, grad-norm clipping) on the
same sizes. The two are measured ALTERNATELY in blocks of --steps steps for --repeats rounds,
so a busy machine slows both alike; the table shows medians over the rounds. Data are random
token ids (throughput does not depend on them).

Columns:
  tokens/s   median over rounds of (steps * batch * seq_len) / wall time of the block.
  MFU        model.flops_per_token (6N + 12 L T d, same for both: same architecture)
             * tokens/s / peak, peak = metrics.peak_flops (CPU: a float32 matmul probe,
             measured once and cached in --peak_cache_dir).
  peak MiB   jaxlm: XLA's memory analysis of the compiled step, i.e. the bytes live at the
             step's peak: arguments (train state + batch) + temporaries + outputs not aliased
             to donated arguments. torch: process peak-RSS growth (VmHWM, reset through
             /proc/self/clear_refs) from just before the model is built to after the warm-up
             steps: parameters, gradients, AdamW moments, activations and allocator overhead.
             torch is set up before jaxlm allocates anything so freed jaxlm memory cannot hide
             torch's growth. The jaxlm RSS growth measured the same way is also shown.

The machine may be shared: each block also records how much CPU other processes used
(/proc/stat), printed under the table. Under load, absolute numbers drop and the ratio
shifts (XLA's thread pool degrades more gracefully than torch's OpenMP threads when a core is
taken), so quote ratios from quiet runs.

No XLA_FLAGS are set here: none of the CPU flags tried (YNNPACK off -> Eigen dots, oneDNN,
XNNPACK, concurrency scheduler off) made the step faster; see docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import json
import os

# jaxlm and torch share one GPU in this process: JAX must not grab 75% of its memory up front
# (its default), and its `peak_bytes_in_use` then counts only what jaxlm's step really holds.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import platform
import statistics
import time
from typing import Any, Callable

from absl import app, flags

from experiments import common

MODES = ("train", "generate", "tasks", "data", "prepare")
WORKLOADS = ("small", "default", "gpt2_124m")
CPU_WORKLOADS = ("small", "default")  # what --workload=all means on a CPU

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
_TASKS_CONFIG = flags.DEFINE_string("tasks_config", "configs/default.py",
                                    "tasks mode: model config (random weights).")
_TASKS_PAIRS = flags.DEFINE_integer("tasks_pairs", 512, "tasks mode: context/continuation pairs.",
                                    lower_bound=1)
_TASKS_REPEATS = flags.DEFINE_integer("tasks_repeats", 3, "tasks mode: alternating rounds.",
                                      lower_bound=1)
_TASKS_BATCH = flags.DEFINE_integer("tasks_batch_size", 16, "tasks mode: rows per batch.",
                                    lower_bound=1)
_DATA_CONFIG = flags.DEFINE_string("data_config", "configs/default.py",
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

MiB = 2**20


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------

SMALL = {"model": {"num_layers": 6, "num_heads": 6, "embed_dim": 384, "mlp_dim": 1536,
                   "vocab_size": 8192, "max_seq_len": 256, "positional": "learned",
                   "norm": "layernorm", "mlp": "gelu", "use_bias": True,
                   "tie_embeddings": True, "dropout": 0.0, "dtype": "float32"},
         "data": {"seq_len": 256, "stride": 256},
         "train": {"global_batch_size": 16, "microbatches": 1}}


def workload_config(name: str, dtype: str = "float32", batch_size: int | None = None):
  """A validated jaxlm Config for a named workload, on a 1-device mesh.

  gpt2_124m: GPT-2 small as nanoGPT benchmarks it (vocabulary padded to 50,304, context 1,024,
  batch 16, learned positions, biases, tied embeddings, attention_impl auto).
  """
  from jaxlm import config as config_lib
  if name == "gpt2_124m":
    values = config_lib.gpt2_config_dict("124m").to_dict()
    values["model"]["vocab_size"] = 50304
    values["train"]["global_batch_size"] = 16
  elif name == "small":
    values = config_lib.default_config_dict().to_dict()
    for section, updates in SMALL.items():
      values[section].update(updates)
  elif name == "default":
    values = config_lib.load_file(os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py"))
  else:
    raise ValueError(f"unknown workload {name!r}; one of {', '.join(WORKLOADS)}.")
  values["mesh"] = {"data": 1, "fsdp": 1, "tensor": 1}
  values["model"]["dtype"] = dtype
  values["train"]["microbatches"] = 1
  if batch_size is not None:
    values["train"]["global_batch_size"] = batch_size
  return config_lib.validate(values)


def random_batch(config, seed: int = 0) -> dict[str, Any]:
  """Random token ids (throughput does not depend on them), the batch dict of data.py."""
  import numpy as np
  rng = np.random.default_rng(seed)
  batch, length = config.train.global_batch_size, config.data.seq_len
  tokens = rng.integers(0, config.model.vocab_size, size=(batch, length + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1].copy(), "targets": tokens[:, 1:].copy(),
          "weights": np.ones((batch, length), np.float32),
          "segment_ids": np.ones((batch, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()}


# ---------------------------------------------------------------------------------------------
# Memory helpers (Linux /proc; elsewhere RSS numbers are NaN)
# ---------------------------------------------------------------------------------------------

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


def _release_freed_memory() -> None:
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


# ---------------------------------------------------------------------------------------------
# The two implementations: each is (setup -> run(n) that runs n steps and waits for them)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Runner:
  name: str
  run: Callable[[int], None]          # runs n training steps, returns when they are done
  memory_bytes: float                 # see the module docstring
  memory_method: str
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def jaxlm_runner(config, warmup: int) -> Runner:
  """jaxlm's real train step on one device, compiled ahead of time (the compile is timed).

  Memory: on GPU/TPU the device allocator's `peak_bytes_in_use` after the warm-up steps (a
  process-lifetime peak: run one jaxlm setting per process to compare settings); on CPU XLA's
  memory analysis of the compiled step (the CPU client keeps no allocator statistics).
  """
  import jax

  from jaxlm import sharding
  from jaxlm import steps as steps_lib

  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  steps = steps_lib.make_steps(config, mesh)
  start = time.perf_counter()
  compiled = steps.compile_train(steps.abstract_state, steps_lib.abstract_batch(config, mesh))
  compile_seconds = time.perf_counter() - start
  device = jax.devices()[0]
  with RssPeak() as rss:
    state = steps.init(jax.random.PRNGKey(config.seed))
    batch = sharding.global_batch(random_batch(config), mesh)
    holder = {"state": state}

    def run(n: int) -> None:
      state = holder["state"]
      for _ in range(n):
        state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      holder["state"] = state

    run(max(warmup, 1))
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    memory, method = float(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  else:
    memory = float(steps_lib.step_bytes(compiled))
    method = "XLA memory analysis (args+temp+out-alias)"
  return Runner("jaxlm", run, memory, method,
                {"rss_bytes": rss.bytes, "compile_seconds": compile_seconds})


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    return True
  except ImportError:
    return False


def torch_runner(config, warmup: int, threads: int, compile_model: bool | None = None
                 ) -> Runner:
  """transformers.GPT2LMHeadModel on the same shapes: the strongest PyTorch setup the test
  requirements allow. On a GPU: SDPA attention, `torch.compile`, bf16 autocast (when the
  compute dtype is bfloat16), fused AdamW, memory from `torch.cuda.max_memory_allocated`. On
  a CPU: eager attention, float32, peak-RSS growth. The first step (with torch.compile: the
  compilation) is timed as `compile_seconds`."""
  import torch
  import transformers

  torch.set_num_threads(threads)
  torch.manual_seed(config.seed)
  m, o = config.model, config.optim
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  compile_model = cuda if compile_model is None else compile_model
  autocast_dtype = torch.bfloat16 if m.dtype == "bfloat16" else None
  batch = random_batch(config)
  inputs = torch.from_numpy(batch["inputs"]).long().to(device)
  targets = torch.from_numpy(batch["targets"]).long().to(device)
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  with RssPeak() as rss:
    attention = "sdpa" if cuda else "eager"
    hf_config = transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.max_seq_len, n_embd=m.embed_dim,
        n_layer=m.num_layers, n_head=m.num_heads, n_inner=m.mlp_dim,
        activation_function="gelu_new", resid_pdrop=m.dropout, embd_pdrop=m.dropout,
        attn_pdrop=m.dropout, layer_norm_epsilon=m.norm_eps, tie_word_embeddings=True,
        use_cache=False, attn_implementation=attention, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(hf_config).to(device=device, dtype=torch.float32)
    model.train()
    assert model.config._attn_implementation == attention, model.config._attn_implementation
    forward = torch.compile(model) if compile_model else model
    # The same decay split as jaxlm.optim.decay_mask: matrices decay, biases and norms do not.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps, fused=cuda)

    def step() -> None:
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast(device.type, dtype=autocast_dtype,
                          enabled=autocast_dtype is not None):
        logits = forward(input_ids=inputs).logits            # [batch, length, vocab]
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
      loss.backward()
      if o.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
      optimizer.step()

    def run(n: int) -> None:
      for _ in range(n):
        step()
      if cuda:
        torch.cuda.synchronize()

    start = time.perf_counter()
    run(1)
    compile_seconds = time.perf_counter() - start
    run(max(warmup - 1, 0))
  if cuda:
    memory, method = float(torch.cuda.max_memory_allocated()), "torch max_memory_allocated"
  else:
    memory, method = rss.bytes, "peak RSS growth (VmHWM)"
  return Runner("torch", run, memory, method,
                {"threads": threads, "rss_bytes": rss.bytes, "compile_seconds": compile_seconds,
                 "setup": f"{attention}{', torch.compile' if compile_model else ''}"
                          f"{', bf16 autocast' if autocast_dtype else ''}"
                          f"{', fused AdamW' if cuda else ''}"})


# ---------------------------------------------------------------------------------------------
# Measurement and table
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
  workload: str
  implementation: str
  tokens_per_second: float
  mfu: float
  peak_memory_mib: float
  memory_method: str
  ratio: float | None             # jaxlm / torch tokens/s (on the jaxlm row)
  rss_growth_mib: float           # peak-RSS growth over setup + warm-up (both implementations)
  block_tokens_per_second: list[float]
  other_load: float               # median share of the machine's CPU used by other processes
  block_other_load: list[float]   # that share per block
  compile_seconds: float          # jaxlm: compiling the step; torch: the first step
  setup: str                      # how the implementation ran (dtype, attention, compile)


def measure_train(workload: str, config, *, steps: int, repeats: int, warmup: int,
                  use_torch: bool, torch_threads: int, peak: float,
                  torch_compile: bool | None = None) -> list[Row]:
  """Alternates blocks of `steps` steps of each implementation for `repeats` rounds."""
  from jaxlm.model import flops_per_token
  tokens_per_step = config.train.global_batch_size * config.data.seq_len
  flops = flops_per_token(config.model, config.data.seq_len)
  runners = []
  _release_freed_memory()
  if use_torch:  # first, so jaxlm's freed buffers cannot hide torch's RSS growth
    runners.append(torch_runner(config, warmup, torch_threads, torch_compile))
  runners.insert(0, jaxlm_runner(config, warmup))
  rates: dict[str, list[float]] = {r.name: [] for r in runners}
  loads: dict[str, list[float]] = {r.name: [] for r in runners}
  for round_index in range(repeats):
    order = runners if round_index % 2 == 0 else runners[::-1]
    for runner in order:
      with OtherLoad() as load:
        start = time.perf_counter()
        runner.run(steps)
        rates[runner.name].append(steps * tokens_per_step / (time.perf_counter() - start))
      loads[runner.name].append(load.fraction)
  medians = {name: statistics.median(values) for name, values in rates.items()}
  rows = []
  for runner in runners:
    ratio = None
    if runner.name == "jaxlm" and "torch" in medians:
      ratio = medians["jaxlm"] / medians["torch"]
    rows.append(Row(workload, runner.name, medians[runner.name],
                    flops * medians[runner.name] / peak, runner.memory_bytes / MiB,
                    runner.memory_method, ratio, runner.extra["rss_bytes"] / MiB,
                    rates[runner.name], statistics.median(loads[runner.name]),
                    loads[runner.name], runner.extra["compile_seconds"],
                    runner.extra.get("setup", f"{config.model.dtype}, attention "
                                     f"{_attention(config)}")))
  return rows


def machine_lines() -> list[str]:
  import jax
  import jaxlib
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


def format_table(rows: list[Row]) -> str:
  header = ("workload", "implementation", "setup", "tokens/s", "MFU", "jaxlm/torch",
            "peak MiB", "peak MiB measured as", "RSS growth MiB", "compile s")
  lines = [header]
  for r in rows:
    lines.append((r.workload, r.implementation, r.setup, f"{r.tokens_per_second:,.0f}",
                  f"{r.mfu:.1%}", "" if r.ratio is None else f"{r.ratio:.2f}",
                  f"{r.peak_memory_mib:,.0f}", r.memory_method, f"{r.rss_growth_mib:,.0f}",
                  f"{r.compile_seconds:.1f}"))
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                   for line in lines)


def default_dtype() -> str:
  """float32 on CPU, bfloat16 on accelerators (the issue's GPU comparison)."""
  import jax
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _attention(config) -> str:
  import jax

  from jaxlm.model import resolve_attention_impl
  return resolve_attention_impl(config.model, jax.default_backend())


def run_train(workloads: list[str], *, steps: int, repeats: int, warmup: int = 2,
              use_torch: bool = True, torch_threads: int = 2,
              peak_cache_dir: str | None = "~/.cache/jaxlm",
              configs: dict[str, Any] | None = None, dtype: str | None = None,
              batch_size: int | None = None, torch_compile: bool | None = None
              ) -> tuple[list[Row], float]:
  """Rows of the train table for `workloads` (names, or keys of `configs`), and the peak
  FLOP/s of the compute dtype (data sheet on known accelerators, else a matmul probe)."""
  from jaxlm import metrics
  use_torch = use_torch and torch_available()
  dtype = dtype or default_dtype()
  cache = os.path.expanduser(peak_cache_dir) if peak_cache_dir else None
  peak = metrics.peak_flops(dtype, cache)
  rows = []
  for name in workloads:
    config = (configs or {}).get(name) or workload_config(name, dtype, batch_size)
    rows.extend(measure_train(name, config, steps=steps, repeats=repeats, warmup=warmup,
                              use_torch=use_torch, torch_threads=torch_threads, peak=peak,
                              torch_compile=torch_compile))
  return rows, peak


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in MODES:
    raise app.UsageError(f"usage: python -m experiments.benchmark MODE [flags]; MODE is one of "
                         f"{', '.join(MODES)}.")
  common.quiet_logs()
  if argv[1] == "generate":
    from experiments import generate_benchmark
    rows = generate_benchmark.run_generate_benchmark(
        _GENERATE_CONFIG.value, repeats=_GENERATE_REPEATS.value,
        uncached_steps=_UNCACHED_STEPS.value)
    for line in machine_lines():
      print(line)
    print(generate_benchmark.format_table(rows))
    return
  if argv[1] == "tasks":
    from experiments import tasks_benchmark
    result = tasks_benchmark.run_tasks_benchmark(_TASKS_CONFIG.value, _TASKS_PAIRS.value,
                                                 _TASKS_REPEATS.value, _TASKS_BATCH.value)
    for line in machine_lines():
      print(line)
    print(json.dumps(result))
    return
  if argv[1] == "prepare":
    from experiments import prepare_benchmark
    result = prepare_benchmark.run_prepare_benchmark(
        [int(m) for m in _PREPARE_MB.value], os.path.expanduser(_PREPARE_DIR.value),
        _PREPARE_TOKENIZER.value, _PREPARE_WORKERS.value)
    for line in machine_lines():
      print(line)
    print(prepare_benchmark.format_table(result))
    print(json.dumps(result))
    return
  if argv[1] == "data":
    from experiments import data_benchmark
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
    for line in machine_lines():
      print(line)
    print(data_benchmark.format_table(result))
    return
  import jax
  if _WORKLOAD.value != "all":
    workloads = [_WORKLOAD.value]
  else:
    workloads = list(CPU_WORKLOADS) if jax.default_backend() == "cpu" else ["gpt2_124m"]
  dtype = _DTYPE.value or default_dtype()
  rows, peak = run_train(workloads, steps=_STEPS.value, repeats=_REPEATS.value,
                         warmup=_WARMUP.value, use_torch=_TORCH.value,
                         torch_threads=_TORCH_THREADS.value, peak_cache_dir=_PEAK_CACHE.value,
                         dtype=dtype, batch_size=_BATCH.value,
                         torch_compile=_TORCH_COMPILE.value)
  for line in machine_lines():
    print(line)
  print(f"peak ({dtype}, jaxlm.metrics.peak_flops): {peak / 1e12:.3f} TFLOP/s; data: random "
        f"token ids; {_STEPS.value} steps x {_REPEATS.value} alternating rounds, medians")
  print(format_table(rows))
  for r in rows:
    print(f"{r.workload}/{r.implementation} tokens/s per block (other processes' CPU share): "
          + ", ".join(f"{x:,.0f} ({load:.0%})"
                      for x, load in zip(r.block_tokens_per_second, r.block_other_load)))
  busiest = max(r.other_load for r in rows)
  print(f"other processes used up to a median {busiest:.0%} of the machine's CPU during the timed "
        f"blocks: {'quiet' if busiest < 0.05 else 'SHARED machine, numbers are noisy'}.")


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
