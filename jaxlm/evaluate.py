"""Held-out metrics: mean loss, perplexity, and bits per UTF-8 byte.

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes of the text the scored tokens
stand for, so runs with different tokenizers (and gzip/xz) compare on one scale.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import sharding
from jaxlm import steps as steps_lib
from jaxlm.data import Batch
from jaxlm.errors import UserError


def evaluate(eval_step: Callable[[Any, dict], dict], params: Any, batches: Sequence[Batch],
             byte_lengths: np.ndarray, mesh) -> dict[str, float]:
  """Runs the jitted `eval_step` over this process's share of each global batch.

  Byte counts are summed over all rows of the global batches, like the loss.
  """
  results = [eval_step(params, sharding.global_batch(b, mesh)) for b in batches]
  # The UTF-8 bytes that the weighted targets stand for.
  num_bytes = sum(float(np.sum(byte_lengths[b["targets"]] * b["weights"])) for b in batches)
  if jax.process_count() > 1:  # each group of processes reading the same rows counts them once
    share = num_bytes / sharding.processes_in_group(mesh)
    num_bytes = float(np.sum(multihost_utils.process_allgather(share)))
  sums = jax.device_get(results)
  loss_sum = sum(float(r["loss_sum"]) for r in sums)
  weight_sum = sum(float(r["weight_sum"]) for r in sums)
  loss = loss_sum / max(weight_sum, 1.0)
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
          "bits_per_byte": loss_sum / math.log(2) / max(num_bytes, 1.0), "tokens": int(weight_sum)}


# -- Documents: sliding windows, each token scored once -----------------------------------------

class EvaluationError(UserError):
  """Evaluation cannot run as asked; the message names the flag and the fix."""


def document_windows(ids: Sequence[int], seq_len: int, stride: int, eos_id: int,
                     pad_id: int) -> list[Batch]:
  """Rows of [seq_len] arrays that score every token of one document exactly once.

  The document is read as x = [eos] + ids, so its first token is scored too (after the start of
  text, as documents follow EOS in training). Window k covers inputs x[k*stride : k*stride +
  seq_len] and predicts the next token at each place; only targets no earlier window scored get
  weight 1, so with stride < seq_len every scored token after the first window sees at least
  seq_len - stride tokens of context. Padding has weight 0 and segment id 0.
  """
  if not 0 < stride <= seq_len:
    raise EvaluationError(f"stride={stride} must be in [1, seq_len={seq_len}].")
  x = np.concatenate([[eos_id], np.asarray(ids, np.int64)]).astype(np.int32)
  rows, begin, scored_until = [], 0, 0  # targets x[j] with j <= scored_until are scored
  while scored_until < len(x) - 1:
    end = min(begin + seq_len, len(x) - 1)  # inputs x[begin:end], targets x[begin+1:end+1]
    rows.append(data_lib.lm_row(x[begin:end + 1], seq_len, pad_id, end - scored_until))
    scored_until, begin = end, begin + stride
  return rows


def evaluate_documents(config, params: Any, tokenizer, documents: Sequence[str], *,
                       seq_len: int, stride: int, batch_size: int, mesh) -> dict[str, float]:
  """Loss, perplexity, bits per byte and token count of `documents` under `params`.

  Each document is scored on its own (sliding windows, see `document_windows`); bits per byte
  count the UTF-8 bytes of the scored text.
  """
  model = config_lib.language_model(config, "evaluation")
  if isinstance(documents, str):  # (a document per character otherwise)
    raise EvaluationError("documents is one string; pass a list of documents, e.g. [text].")
  if not 1 <= seq_len <= model.max_seq_len:
    raise EvaluationError(f"--seq_len={seq_len} must be in [1, model.max_seq_len="
                          f"{model.max_seq_len}] (the context this model is built for).")
  if not 0 < stride <= seq_len:
    raise EvaluationError(f"--stride={stride} must be in [1, --seq_len={seq_len}].")
  if batch_size < 1:
    raise EvaluationError(f"--batch_size={batch_size} must be positive.")
  batch_size = data_lib.round_to_devices(batch_size, mesh)
  if not documents:
    raise EvaluationError("no documents to evaluate: the files or split are empty.")
  rows = [row for ids in tokenizer.encode_batch(list(documents))
          for row in document_windows(ids, seq_len, stride, tokenizer.eos_id, tokenizer.pad_id)]
  if not rows:  # (all empty: no token to score, which would read as a perfect loss of 0)
    raise EvaluationError("the documents hold no text to score (every one is empty).")
  eval_step = steps_lib.make_eval_step(model, mesh, steps_lib.lm_loss())
  result = evaluate(eval_step, params, data_lib.stack_rows(rows, batch_size),
                    tokenizer.byte_lengths(), mesh)
  return dict(result, documents=len(documents))
