"""Held-out metrics: mean loss, perplexity, and bits per UTF-8 byte.

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes of the text the scored tokens
stand for, so runs with different tokenizers (and gzip/xz) compare on one scale.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxlm import sharding
from jaxlm.data import Batch


def target_bytes(batch: Batch, byte_lengths: np.ndarray) -> float:
  """UTF-8 bytes represented by the weighted targets of a batch."""
  return float(np.sum(byte_lengths[batch["targets"]] * batch["weights"]))


def summarize(loss_sum: float, weight_sum: float, num_bytes: float) -> dict[str, float]:
  loss = loss_sum / max(weight_sum, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
          "bits_per_byte": loss_sum / math.log(2) / max(num_bytes, 1.0),
          "tokens": int(weight_sum)}


def evaluate(eval_step: Callable[[Any, dict], dict], params: Any, batches: Sequence[Batch],
             byte_lengths: np.ndarray, mesh) -> dict[str, float]:
  """Runs the jitted `eval_step` over this process's share of each global batch.

  Byte counts are summed over all processes' rows, like the loss.
  """
  results = [eval_step(params, sharding.global_batch(b, mesh)) for b in batches]
  local_bytes = np.float64(sum(target_bytes(b, byte_lengths) for b in batches))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    num_bytes = float(np.sum(multihost_utils.process_allgather(local_bytes)))
  else:
    num_bytes = float(local_bytes)
  sums = jax.device_get(results)
  return summarize(sum(float(r["loss_sum"]) for r in sums),
                   sum(float(r["weight_sum"]) for r in sums), num_bytes)
