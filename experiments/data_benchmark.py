r"""Input-pipeline benchmark: how fast the training loader delivers batches.

  python -m experiments.benchmark data                     # configs/default.py's train split
  python -m experiments.benchmark data --data_config=configs/small.py --data_batches=500

jaxlm's loader (`jaxlm.data.train_dataset` + `train_iterator`: grain, windows shuffled without
replacement, per-window targets, weights, segment ids and positions, a checkpointable position,
prefetched by 2 reader threads) against nanoGPT's `get_batch` (random offsets into the token
array, inputs and targets only, cast to int64 as nanoGPT does), on the same token array: the
config's real train split, tokenized by its real tokenizer (both prepared on first use and
cached under data.data_dir). Blocks of `batches` batches alternate between the two loaders,
after a warm-up of each; tokens/s are medians over the rounds. jaxlm's reader threads refill
its prefetch buffer (8 batches) while the other loader runs, so each of its blocks starts with
up to 8 batches ready: under 1% of the default block of 1,000.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np


def _seconds(next_batch: Callable[[], Any], batches: int) -> float:
  started = time.perf_counter()
  for _ in range(batches):
    next_batch()
  return time.perf_counter() - started


def run_data_benchmark(config_path: str = "configs/default.py", batches: int = 1000,
                       repeats: int = 5) -> dict[str, Any]:
  """{tokens_per_second of each loader, their ratio, what was loaded}."""
  from jaxlm import config as config_lib
  from jaxlm import data as data_lib
  from jaxlm import tokenizer as tokenizer_lib

  config = config_lib.validate(config_lib.load_file(config_path))
  config_lib.check_training_data(config.data)
  tokenizer, _ = tokenizer_lib.get_tokenizer(config.data, config.model.vocab_size)
  tokens = data_lib.load_tokens(config.data, "train", tokenizer)
  data_lib.check_enough_tokens(tokens, config.data, "train", 1)
  size, seq_len = config.train.global_batch_size, config.data.seq_len
  jaxlm_batches = data_lib.train_iterator(
      data_lib.train_dataset(tokens, config, tokenizer.eos_id))
  rng = np.random.default_rng(0)

  def get_batch() -> tuple[np.ndarray, np.ndarray]:  # nanoGPT's, on the same array
    starts = rng.integers(len(tokens) - seq_len, size=size)
    x = np.stack([tokens[i:i + seq_len].astype(np.int64) for i in starts])
    y = np.stack([tokens[i + 1:i + 1 + seq_len].astype(np.int64) for i in starts])
    return x, y

  loaders = {"jaxlm": lambda: next(jaxlm_batches), "nanogpt_get_batch": get_batch}
  for load in loaders.values():  # warm-up: threads started, pages of the array read
    _seconds(load, min(batches, 20))
  seconds: dict[str, list[float]] = {name: [] for name in loaders}
  for _ in range(repeats):
    for name, load in loaders.items():
      seconds[name].append(_seconds(load, batches))
  per_block = batches * size * seq_len
  speed = {name: per_block / statistics.median(s) for name, s in seconds.items()}
  return {"config": config_path, "train_tokens": len(tokens), "global_batch_size": size,
          "seq_len": seq_len, "batches": batches, "repeats": repeats,
          "jaxlm_tokens_per_second": speed["jaxlm"],
          "nanogpt_get_batch_tokens_per_second": speed["nanogpt_get_batch"],
          "jaxlm_over_nanogpt": speed["jaxlm"] / speed["nanogpt_get_batch"]}


def format_table(result: dict[str, Any]) -> str:
  r = result
  lines = [f"{r['config']}: train split of {r['train_tokens']:,} tokens; batches of "
           f"{r['global_batch_size']} x {r['seq_len']}; {r['batches']} batches x {r['repeats']} "
           f"alternating rounds, medians",
           "| loader | tokens/s | batches/s |", "|---|---:|---:|"]
  for name, key in (("jaxlm (grain, shuffled, checkpointable)", "jaxlm_tokens_per_second"),
                    ("nanoGPT get_batch (random offsets)", "nanogpt_get_batch_tokens_per_second")):
    per_batch = r["global_batch_size"] * r["seq_len"]
    lines.append(f"| {name} | {r[key]:,.0f} | {r[key] / per_batch:,.1f} |")
  lines.append(f"jaxlm / nanoGPT: {r['jaxlm_over_nanogpt']:.2f}")
  return "\n".join(lines)
