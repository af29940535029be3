r"""Task-scoring benchmark: is `jaxlm.tasks` bound by the model or by Python?

  python -m experiments.benchmark tasks                    # configs/default.py, 512 pairs
  python -m experiments.benchmark tasks --tasks_config=configs/gpt2_124m.py --tasks_pairs=64

Scores multiple-choice requests (random-word contexts of 20-120 words, four 2-12-word endings:
HellaSwag's shape) end to end with `tasks.loglikelihoods` -- tokenizing, sorting, bucketing,
padding, the sharded scorer, the host transfers -- and, alternately, runs the model's plain
jitted forward pass (logits only) over the very same padded batches, already on the device.
Both count the padded batch tokens; medians over repeats after a warm-up of each (compiles
excluded). `scoring / forward` near 1 means the scorer is model-bound.

The model has random weights and a SentencePiece tokenizer trained on this Python's `json`
package source (a few seconds), so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Any

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import run as run_lib
from jaxlm import sharding, tasks
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.bench.generate import random_params
from jaxlm.model import Transformer

WORDS = ("the a man woman dog runs quickly slowly into house garden then picks up ball and "
         "throws it over fence while sun sets behind hills children laugh").split()


def _text(rng: np.random.Generator, low: int, high: int) -> str:
  return " ".join(rng.choice(WORDS, int(rng.integers(low, high))))


def run_tasks_benchmark(config_path: str, num_pairs: int, repeats: int, batch_size: int
                        ) -> dict[str, Any]:



  config = config_lib.validate(config_lib.load_file(config_path))
  source = os.path.dirname(json.__file__)
  documents = [open(os.path.join(source, name)).read() for name in sorted(os.listdir(source))
               if name.endswith(".py")]
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = tokenizer_lib.train_sentencepiece(
        documents, min(config.model.vocab_size, 1000), os.path.join(tmp, "t.model"),
        max_sentences=5000)
  config = config_lib.replace(config, model={"vocab_size": max(config.model.vocab_size,
                                                               tokenizer.vocab_size)})
  mesh = run_lib.default_mesh(config)
  params = random_params(config.model)
  rng = np.random.default_rng(0)
  pairs = []
  while len(pairs) < num_pairs:
    context = _text(rng, 20, 120)
    pairs += [(context, " " + _text(rng, 2, 12)) for _ in range(4)]
  pairs = pairs[:num_pairs]

  scorer = tasks.Scorer(config, params, tokenizer, mesh, batch_size)
  batches = tasks.request_batches(scorer, pairs)
  device_batches = [sharding.global_batch(b, mesh) for _, b in batches]
  padded_tokens = sum(b["inputs"].size for _, b in batches)
  model = Transformer(config.model)
  forward = jax.jit(lambda p, b: model.apply({"params": p}, b["inputs"],
                                             positions=b["positions"],
                                             segment_ids=b["segment_ids"]))

  def score() -> None:
    tasks.loglikelihoods(scorer, pairs)

  def plain() -> None:
    with jax.set_mesh(mesh), sharding.axis_rules():
      jax.block_until_ready([forward(params, b) for b in device_batches])

  score(), plain()  # compile every bucket of both
  rates: dict[str, list[float]] = {"scoring": [], "forward": []}
  for _ in range(repeats):
    for name, fn in (("scoring", score), ("forward", plain)):
      start = time.perf_counter()
      fn()
      rates[name].append(padded_tokens / (time.perf_counter() - start))
  medians = {k: statistics.median(v) for k, v in rates.items()}
  return {"pairs": len(pairs), "batches": len(batches), "padded_tokens": padded_tokens,
          "scoring_tokens_per_second": medians["scoring"],
          "forward_tokens_per_second": medians["forward"],
          "scoring_over_forward": medians["scoring"] / medians["forward"],
          "model": f"{config.model.num_layers} layers x {config.model.embed_dim}, vocabulary "
                   f"{config.model.vocab_size}, context {config.model.max_seq_len}"}
