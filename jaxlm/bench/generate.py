r"""Generation benchmark: KV-cache decoding vs full recompute, and time per token over a long
generation, on a named config with random weights.

  python -m experiments.benchmark generate                 # configs/gpt2_124m.py
  python -m experiments.benchmark generate --generate_repeats=2 --uncached_steps=3   # quicker

Measured (cached and uncached alternate within each repeat; medians over repeats; compilation
is excluded by a warm-up run of each program):
  * throughput: batch 1 and 8, 200 new tokens after a 16-token prompt;
  * 512 total tokens (16 + 496), batch 1: the issue's >= 5x target for the cache;
  * time per token (cached) at the start vs the end of a 1,000-token generation, in
    chunks of 16 steps: the issue's <= 50% growth target.
The uncached path (full recompute over the whole [batch, prompt + new] buffer each step) costs
the same every step, so it is timed over `uncached_steps` steps and extrapolated: running it
for 200 tokens of GPT-2 small on a 2-core CPU would take many minutes.

`run_generate_benchmark(config_path, GenerateSettings(...))` returns the rows (dicts) and
`format_table(rows)` prints them.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import config as config_lib
from jaxlm import generate as gen
from jaxlm.config import ConfigError, ModelConfig
from jaxlm.model import Transformer, init_cache


def load_model_config(path: str):
  return config_lib.validate(config_lib.load_file(path)).model


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
  """The measurements: throughput at each batch size with `new_tokens` after `prompt_tokens`;
  a generation of `total_tokens` (0: skipped); time per token over `long_tokens` (0: skipped);
  medians over `repeats`; the uncached path timed over `uncached_steps` and extrapolated."""
  batch_sizes: Sequence[int] = (1, 8)
  prompt_tokens: int = 16
  new_tokens: int = 200
  total_tokens: int = 512
  long_tokens: int = 1000
  repeats: int = 3
  uncached_steps: int = 8
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class _Model:
  config: Any    # ModelConfig
  params: Any


def random_params(model_config, seed: int = 0) -> Any:
  """Params with the model's tree and N(0, init_std) values (norm scales 1), on device."""
  shapes = jax.eval_shape(lambda: Transformer(model_config).init(
      jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"])
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(shapes))
  values = []
  for path, s in leaves:
    if "scale" in jax.tree_util.keystr(path):
      values.append(jnp.ones(s.shape, s.dtype))
    else:
      values.append(jnp.asarray(rng.normal(0.0, model_config.init_std, s.shape)
                                .astype(np.float32)))
  return jax.tree_util.tree_unflatten(treedef, values)


def _decode(model: _Model, batch: int, prompt_tokens: int, new_tokens: int, *, kv_cache: bool,
            chunk_size: int, max_steps: int | None = None):
  """One greedy generation -> (prefill seconds, [(steps, seconds)] per chunk after it).

  Stops after `max_steps` generated tokens when given (the buffer stays sized for
  `new_tokens`, so every step costs what it would in the full generation)."""
  rng = np.random.default_rng(1)
  rows = rng.integers(4, model.config.vocab_size, (batch, prompt_tokens)).tolist()
  chunks = gen.decode_tokens(model.config, model.params, rows,
                             gen.SamplingParams(max_new_tokens=new_tokens, temperature=0.0),
                             gen.TokenIds(eos_id=-1, pad_id=0),
                             gen.DecodeOptions(chunk_size=chunk_size, kv_cache=kv_cache))
  start = time.perf_counter()
  done = next(chunks).shape[1]
  prefill = time.perf_counter() - start
  timings = []
  while max_steps is None or done < max_steps:
    start = time.perf_counter()
    try:
      steps = next(chunks).shape[1]
    except StopIteration:
      break
    timings.append((steps - done, time.perf_counter() - start))
    done = steps
  chunks.close()
  return prefill, timings


def _throughput(model: _Model, batch: int, new_tokens: int, settings: GenerateSettings,
                label: str) -> list[dict]:
  """Cached vs uncached, alternating; rows with medians."""
  prompt_tokens, repeats = settings.prompt_tokens, settings.repeats
  uncached_steps = settings.uncached_steps
  measured = {True: [], False: []}
  settings = {True: dict(chunk_size=new_tokens),
              False: dict(chunk_size=uncached_steps, max_steps=1 + uncached_steps)}
  for kv_cache in (True, False):  # warm-up: compile both programs
    _decode(model, batch, prompt_tokens, new_tokens, kv_cache=kv_cache,
            **dict(settings[kv_cache], max_steps=2, chunk_size=1))
  for _ in range(repeats):
    for kv_cache in (True, False):
      prefill, timings = _decode(model, batch, prompt_tokens, new_tokens,
                                 kv_cache=kv_cache, **settings[kv_cache])
      steps = sum(n for n, _ in timings)
      per_step = sum(t for _, t in timings) / steps
      measured[kv_cache].append((prefill, per_step, steps))
  rows = []
  for kv_cache in (True, False):
    prefill = statistics.median(m[0] for m in measured[kv_cache])
    per_step = statistics.median(m[1] for m in measured[kv_cache])
    total = prefill + per_step * (new_tokens - 1)   # first token comes from the prefill
    rows.append({"measurement": label, "batch": batch, "prompt_tokens": prompt_tokens,
                 "new_tokens": new_tokens, "kv_cache": kv_cache,
                 "prefill_ms": 1e3 * prefill, "ms_per_step": 1e3 * per_step,
                 "tokens_per_second": batch * new_tokens / total,
                 "measured_steps": measured[kv_cache][0][2], "repeats": repeats})
  rows[0]["speedup"] = rows[0]["tokens_per_second"] / rows[1]["tokens_per_second"]
  return rows


def _growth(model: _Model, settings: GenerateSettings, chunk: int = 16) -> list[dict]:
  """Cached time per token in the first and last full chunks of a long generation."""
  prompt_tokens, long_tokens = settings.prompt_tokens, settings.long_tokens
  repeats = settings.repeats
  _decode(model, 1, prompt_tokens, long_tokens, kv_cache=True, chunk_size=chunk,
          max_steps=1 + chunk)  # warm-up
  first, last, totals = [], [], []
  for _ in range(repeats):
    prefill, timings = _decode(model, 1, prompt_tokens, long_tokens,
                               kv_cache=True, chunk_size=chunk)
    full = [t / n for n, t in timings if n == chunk]
    first.append(full[0])
    last.append(full[-1])
    totals.append(prefill + sum(t for _, t in timings))
  # Chunks start after the prefill's token: steps 2..17 and the last 16 before the end.
  end = 1 + chunk * ((long_tokens - 1) // chunk)
  start_ms, end_ms = 1e3 * statistics.median(first), 1e3 * statistics.median(last)
  return [
      {"measurement": "time per token", "batch": 1, "prompt_tokens": prompt_tokens,
       "new_tokens": long_tokens, "kv_cache": True, "tokens": f"{2}-{1 + chunk}",
       "ms_per_step": start_ms, "repeats": repeats},
      {"measurement": "time per token", "batch": 1, "prompt_tokens": prompt_tokens,
       "new_tokens": long_tokens, "kv_cache": True, "tokens": f"{end - chunk + 1}-{end}",
       "ms_per_step": end_ms, "growth": end_ms / start_ms - 1.0,
       "tokens_per_second": long_tokens / statistics.median(totals), "repeats": repeats},
  ]


def run_generate_benchmark(config_path: str = "configs/gpt2_124m.py",
                           settings: GenerateSettings = GenerateSettings(), log=None
                           ) -> list[dict]:
  """All measurements as rows (see the module doc). `log(message)` reports progress."""
  log = log or (lambda message: print(message, file=sys.stderr, flush=True))
  model_config = load_model_config(config_path)
  s = settings
  longest = s.prompt_tokens + max(s.new_tokens, s.total_tokens - s.prompt_tokens, s.long_tokens)
  if longest > model_config.max_seq_len:  # (positions past it are meaningless)
    raise ConfigError(f"{config_path}: model.max_seq_len={model_config.max_seq_len} is shorter "
                      f"than the benchmark's longest generation ({longest} tokens); pass a "
                      f"--generate_config with a longer context (e.g. configs/gpt2_124m.py).")
  model = _Model(model_config, random_params(model_config, s.seed))
  rows = []
  for batch in s.batch_sizes:
    log(f"throughput: batch {batch}, {s.prompt_tokens} + {s.new_tokens} tokens")
    rows += _throughput(model, batch, s.new_tokens, s, "throughput")
  if s.total_tokens:
    log(f"{s.total_tokens} total tokens, batch 1")
    rows += _throughput(model, 1, s.total_tokens - s.prompt_tokens, s,
                        f"{s.total_tokens} total tokens")
  if s.long_tokens:
    log(f"time per token over {s.long_tokens} tokens")
    rows += _growth(model, s)
  return rows


_COLUMNS = (("measurement", "{}"), ("batch", "{}"), ("kv_cache", "{}"),
            ("prompt_tokens", "{}"), ("new_tokens", "{}"), ("tokens", "{}"),
            ("prefill_ms", "{:.0f}"), ("ms_per_step", "{:.1f}"),
            ("tokens_per_second", "{:.1f}"), ("speedup", "{:.1f}x"), ("growth", "{:+.0%}"),
            ("measured_steps", "{}"), ("repeats", "{}"))


def format_table(rows: Sequence[dict]) -> str:
  """A Markdown table of the rows (columns that no row has are left out)."""
  columns = [(name, fmt) for name, fmt in _COLUMNS if any(name in r for r in rows)]
  lines = ["| " + " | ".join(name for name, _ in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for r in rows:
    cells = [fmt.format(r[name]) if name in r else "" for name, fmt in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


# -- Grouped-query and sliding-window attention against multi-head ---------------------------------

# The same model three ways: multi-head attention, 2 key/value heads of 8, and those with a
# 256-token window (a ring cache of 256 slots).
KV_MODEL = ModelConfig(num_layers=4, num_heads=8, embed_dim=512, mlp_dim=1376, vocab_size=4096,
                       max_seq_len=4096, positional="rope", norm="rmsnorm", mlp="swiglu",
                       use_bias=False, tie_embeddings=False)


def kv_variants(model: ModelConfig = KV_MODEL, kv_heads: int = 2, window: int = 256
                ) -> dict[str, ModelConfig]:
  """`model` with multi-head attention, `kv_heads` key/value heads, and those with a window."""
  grouped = f"grouped-query {kv_heads}/{model.num_heads}"
  return {"multi-head": model,
          grouped: dataclasses.replace(model, num_kv_heads=kv_heads),
          f"{grouped}, window {window}": dataclasses.replace(model, num_kv_heads=kv_heads,
                                                             sliding_window=window)}


def cache_bytes(model_config, slots: int, batch: int = 1) -> int:
  """Bytes of the KV cache `generate` allocates for `slots` sequence slots (its arrays)."""
  cache = nn.unbox(init_cache(model_config, batch, slots))
  return sum(x.nbytes for x in jax.tree.leaves(cache))


def run_kv_benchmark(new_tokens: int = 1024, chunk: int = 64, repeats: int = 3,
                     log=None, variants: dict[str, ModelConfig] | None = None) -> list[dict]:
  """Per variant: KV-cache bytes at 1,040 and 4,096 slots, and greedy ms per token in the
  first and the last full chunk of a `new_tokens` generation (batch 1, 16-token prompt; the
  variants alternate, medians over `repeats` after a compiling run of each)."""
  log = log or (lambda message: print(message, file=sys.stderr, flush=True))
  variants = variants or kv_variants()
  models = {name: _Model(cfg, random_params(cfg)) for name, cfg in variants.items()}
  for name, model in models.items():
    log(f"compiling {name}")
    _decode(model, 1, 16, new_tokens, kv_cache=True, chunk_size=chunk, max_steps=1 + chunk)
  timings: dict[str, list] = {name: [] for name in models}
  for round_index in range(repeats):
    order = list(models) if round_index % 2 == 0 else list(models)[::-1]
    for name in order:
      _, chunks = _decode(models[name], 1, 16, new_tokens, kv_cache=True, chunk_size=chunk)
      timings[name].append([1e3 * t / n for n, t in chunks if n == chunk])
  return [{"attention": name, "cache_mib_1040": cache_bytes(variants[name], 1040) / 2**20,
           "cache_mib_4096": cache_bytes(variants[name], 4096) / 2**20,
           "ms_per_token_first": statistics.median(t[0] for t in timings[name]),
           "ms_per_token_last": statistics.median(t[-1] for t in timings[name]),
           "new_tokens": new_tokens, "repeats": repeats} for name in models]


def format_kv_table(rows: Sequence[dict]) -> str:
  lines = ["| attention | KV cache, 1,040 slots | KV cache, 4,096 slots | ms/token, first chunk "
           "| ms/token, last chunk |", "|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['attention']} | {r['cache_mib_1040']:.2f} MiB | "
                 f"{r['cache_mib_4096']:.2f} MiB | {r['ms_per_token_first']:.2f} | "
                 f"{r['ms_per_token_last']:.2f} |")
  return "\n".join(lines)
