r"""Input-pipeline benchmark: how fast the training loader delivers batches.

  python -m experiments.benchmark data                     # configs/default.py's train split
  python -m experiments.benchmark data --data_config=configs/small.py --data_batches=500
  python -m experiments.benchmark data --data_tokens=/data/fineweb \
      --data_batch_size=16 --data_seq_len=1024       # prepared shards, nanoGPT's GPT-2 shape

Loaders, on the same token array (the config's real train split as training reads it: the
array its corpus is encoded into, or the largest shard of prepared shards) and batch shape:
  jaxlm        `jaxlm.loader.Loader`: windows shuffled without replacement, targets, weights,
               segment ids and positions, a resumable position (what training draws)
  get_batch    nanoGPT's `get_batch` in numpy: random offsets, inputs and targets cast to int64,
               on an array opened once (the stricter reference: nanoGPT's own reopens its
               memmap every call)
  verbatim     nanoGPT's `get_batch` as written (np.memmap reopened each call, torch.randint,
               torch.stack of int64), where torch is installed and the array is a file
With several shards, the jaxlm loader over all of them is timed too (a row of its own).
Blocks of `batches` batches alternate between the loaders after a warm-up of each; tokens/s are
medians over the rounds.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np

from jaxlm import config as config_lib
from jaxlm import loader, pretrain, shards
from jaxlm import tokenizer as tokenizer_lib


def _seconds(next_batch: Callable[[], Any], batches: int) -> float:
  started = time.perf_counter()
  for _ in range(batches):
    next_batch()
  return time.perf_counter() - started


def _verbatim_get_batch(tokens: np.ndarray, size: int, seq_len: int) -> Callable[[], Any] | None:
  """nanoGPT train.py's get_batch, on the file behind `tokens` (a memory-mapped .npy)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel  (test-time extra)
  except ImportError:
    return None
  if not isinstance(tokens, np.memmap) or tokens.filename is None:
    return None
  path, dtype, offset = tokens.filename, tokens.dtype, tokens.offset

  def get_batch():
    data = np.memmap(path, dtype=dtype, mode="r", offset=offset)  # (nanoGPT: "recreate ...")
    ix = torch.randint(len(data) - seq_len, (size,))
    x = torch.stack([torch.from_numpy((data[i:i + seq_len]).astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + seq_len]).astype(np.int64))
                     for i in ix])
    return x, y
  return get_batch


def run_data_benchmark(config_path: str = "configs/default.py", batches: int = 1000,
                       repeats: int = 5, overrides: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
  """{tokens/s of each loader, ratios to get_batch, what was loaded}."""

  values = config_lib.apply_overrides(config_lib.load_file(config_path), overrides or {})
  config = config_lib.validate(values)
  if config.data.corpus == "tokens":  # (the model is not built: any vocabulary size fits)
    vocab = max(shards.load_manifest(folder, key)["vocab_size"]
                for _, folder, _, key in shards.token_folders(config.data))
    config = config_lib.replace(config, model={"vocab_size": max(vocab,
                                                                 config.model.vocab_size)})
  config_lib.check_training_data(config.data)
  tokenizer, _ = tokenizer_lib.get_tokenizer(config.data, config.model.vocab_size)
  train, _ = pretrain.data_sources(config, tokenizer)
  arrays = [a for s in train for a in s.windows.arrays]
  tokens = max(arrays, key=len)  # the one token file both loaders read
  size, seq_len = config.train.global_batch_size, config.data.seq_len
  one_file = loader.Loader([loader.Source("one", loader.Windows([tokens], seq_len,
                                                                config.data.window_stride))],
                           config.seed, size, tokenizer.eos_id)
  rng = np.random.default_rng(0)

  def get_batch() -> tuple[np.ndarray, np.ndarray]:  # nanoGPT's, on the same array
    starts = rng.integers(len(tokens) - seq_len, size=size)
    x = np.stack([tokens[i:i + seq_len].astype(np.int64) for i in starts])
    y = np.stack([tokens[i + 1:i + 1 + seq_len].astype(np.int64) for i in starts])
    return x, y

  loaders = {"jaxlm": lambda: next(one_file), "nanogpt_get_batch": get_batch}
  verbatim = _verbatim_get_batch(tokens, size, seq_len)
  if verbatim is not None:
    loaders["nanogpt_verbatim"] = verbatim
  if len(arrays) > 1:
    every = loader.Loader(train, config.seed, size, tokenizer.eos_id)
    loaders["jaxlm_all_shards"] = lambda: next(every)
  for load in loaders.values():  # warm-up: pages of the array read
    _seconds(load, min(batches, 20))
  seconds: dict[str, list[float]] = {name: [] for name in loaders}
  for _ in range(repeats):
    for name, load in loaders.items():
      seconds[name].append(_seconds(load, batches))
  per_block = batches * size * seq_len
  speed = {name: per_block / statistics.median(s) for name, s in seconds.items()}
  reference = speed["nanogpt_get_batch"]
  return {"config": config_path, "corpus": config.data.corpus, "train_tokens": len(tokens),
          "shards": len(arrays), "global_batch_size": size, "seq_len": seq_len,
          "batches": batches, "repeats": repeats,
          **{f"{name}_tokens_per_second": value for name, value in speed.items()},
          "jaxlm_over_nanogpt": speed["jaxlm"] / reference}


_ROWS = (("jaxlm", "jaxlm loader (shuffled, segment ids, resumable)"),
         ("nanogpt_get_batch", "nanoGPT get_batch in numpy (random offsets)"),
         ("nanogpt_verbatim", "nanoGPT get_batch verbatim (memmap per call, torch)"),
         ("jaxlm_all_shards", "jaxlm loader over all shards"))


def format_table(result: dict[str, Any]) -> str:
  r = result
  lines = [f"{r['config']} (corpus {r['corpus']}): a train array of {r['train_tokens']:,} tokens"
           + (f" (the largest of {r['shards']} shards)" if r["shards"] > 1 else "")
           + f"; batches of {r['global_batch_size']} x {r['seq_len']}; {r['batches']} batches "
           f"x {r['repeats']} alternating rounds, medians",
           "| loader | tokens/s | batches/s | vs get_batch |", "|---|---:|---:|---:|"]
  per_batch = r["global_batch_size"] * r["seq_len"]
  reference = r["nanogpt_get_batch_tokens_per_second"]
  for key, name in _ROWS:
    value = r.get(f"{key}_tokens_per_second")
    if value is not None:
      lines.append(f"| {name} | {value:,.0f} | {value / per_batch:,.1f} | "
                   f"{value / reference:.2f}x |")
  lines.append(f"jaxlm / nanoGPT get_batch: {r['jaxlm_over_nanogpt']:.2f}")
  return "\n".join(lines)
