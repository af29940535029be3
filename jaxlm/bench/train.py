r"""Training-step benchmark: jaxlm's train step against the PyTorch reference, side by side.

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

On a GPU the workload runs in bfloat16 (float32 parameters) with attention_impl=auto (cuDNN),
and the PyTorch peer is transformers.GPT2LMHeadModel with SDPA attention, torch.compile, bf16
autocast and fused AdamW; peak memory is the JAX allocator's peak_bytes_in_use (jaxlm) and
torch.cuda.max_memory_allocated (torch), and the compile column is jaxlm's AOT compile and
torch's first step. For clean memory numbers run one setting per process (JAX's peak is a
process-lifetime peak).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import metrics, sharding
from jaxlm import steps as steps_lib
from jaxlm.bench.machine import OtherLoad, RssPeak, release_freed_memory, torch_available
from jaxlm.model import flops_per_token, resolve_attention_impl

MiB = 2**20
WORKLOADS = ("small", "default", "gpt2_124m")
CPU_WORKLOADS = ("small", "default")  # what --workload=all means on a CPU
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
  if name == "gpt2_124m":
    values = config_lib.gpt2_config_dict("124m").to_dict()
    values["model"]["vocab_size"] = 50304
    values["train"]["global_batch_size"] = 16
  elif name == "small":
    values = config_lib.default_config_dict().to_dict()
    for section, updates in SMALL.items():
      values[section].update(updates)
  elif name == "default":
    values = config_lib.load_file(os.path.join(REPO, "configs", "default.py"))
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
  rng = np.random.default_rng(seed)
  batch, length = config.train.global_batch_size, config.data.seq_len
  tokens = rng.integers(0, config.model.vocab_size, size=(batch, length + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1].copy(), "targets": tokens[:, 1:].copy(),
          "weights": np.ones((batch, length), np.float32),
          "segment_ids": np.ones((batch, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy()}


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


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """How the train benchmark measures: blocks of `steps` timed steps per implementation,
  alternating for `repeats` rounds after `warmup` untimed steps; the PyTorch reference when
  `use_torch` (and importable) on `torch_threads` threads (`torch_compile`: None = on a GPU);
  the compute `dtype` (None: float32 on CPU, bfloat16 on accelerators), a global `batch_size`
  overriding the workload's; where the CPU's probed peak FLOP/s is cached."""
  steps: int = 5
  repeats: int = 5
  warmup: int = 2
  use_torch: bool = True
  torch_threads: int = 2
  torch_compile: bool | None = None
  dtype: str | None = None
  batch_size: int | None = None
  peak_cache_dir: str | None = "~/.cache/jaxlm"


def measure_train(workload: str, config, settings: TrainSettings, peak: float) -> list[Row]:
  """Alternates blocks of `settings.steps` steps of each implementation for
  `settings.repeats` rounds."""
  steps, warmup = settings.steps, settings.warmup
  tokens_per_step = config.train.global_batch_size * config.data.seq_len
  flops = flops_per_token(config.model, config.data.seq_len)
  runners = []
  release_freed_memory()
  if settings.use_torch:  # first, so jaxlm's freed buffers cannot hide torch's RSS growth
    runners.append(torch_runner(config, warmup, settings.torch_threads, settings.torch_compile))
  runners.insert(0, jaxlm_runner(config, warmup))
  rates: dict[str, list[float]] = {r.name: [] for r in runners}
  loads: dict[str, list[float]] = {r.name: [] for r in runners}
  for round_index in range(settings.repeats):
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
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _attention(config) -> str:

  return resolve_attention_impl(config.model, jax.default_backend())


def run_train(workloads: list[str], settings: TrainSettings = TrainSettings(),
              configs: dict[str, Any] | None = None) -> tuple[list[Row], float]:
  """Rows of the train table for `workloads` (names, or keys of `configs`), and the peak
  FLOP/s of the compute dtype (data sheet on known accelerators, else a matmul probe)."""
  settings = dataclasses.replace(settings, use_torch=settings.use_torch and torch_available(),
                                 dtype=settings.dtype or default_dtype())
  cache = os.path.expanduser(settings.peak_cache_dir) if settings.peak_cache_dir else None
  peak = metrics.peak_flops(settings.dtype, cache)
  rows = []
  for name in workloads:
    config = ((configs or {}).get(name)
              or workload_config(name, settings.dtype, settings.batch_size))
    rows.extend(measure_train(name, config, settings, peak))
  return rows, peak
