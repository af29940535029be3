"""GPT-3's batch-size warmup (Brown et al. 2020, appendix B): the batch grows from
train.batch_warmup_start rows to train.global_batch_size over the first
train.batch_warmup_tokens training tokens, so early updates are many and cheap.

The sizes form a ladder of doublings, start, 2 x start, ..., global_batch_size (each one a
compiled step shape). The loader still draws full global batches, in the same order as without
warmup; while a smaller size k applies, each drawn batch is split into n = global / k steps,
step i taking rows i, i + n, i + 2n, ... (strided, so a process's local rows split the same way
and a multi-process run takes the same rows per step as one process). The size for a drawn
batch is the largest ladder step at or below the linear ramp at the tokens drawn before it, so
the schedule is a function of the batch number alone, and the iterator's state (the loader's
state at the batch being split, which part comes next) is checkpointed and resumed exactly.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxlm.config import TrainConfig


def ladder(train: TrainConfig) -> list[int]:
  """The batch sizes the warmup passes through, smallest first (config.check has verified that
  global_batch_size / batch_warmup_start is a power of two)."""
  sizes = [train.batch_warmup_start]
  while sizes[-1] < train.global_batch_size:
    sizes.append(sizes[-1] * 2)
  return sizes


def rows_for_batch(train: TrainConfig, seq_len: int, batch: int) -> int:
  """The step size (rows) while drawn global batch number `batch` (0-based) is consumed."""
  full = train.global_batch_size
  if not train.batch_warmup_tokens:
    return full
  tokens_before = batch * full * seq_len
  if tokens_before >= train.batch_warmup_tokens:
    return full
  start = train.batch_warmup_start
  ramp = start + (full - start) * tokens_before / train.batch_warmup_tokens
  return max(size for size in ladder(train) if size <= ramp)


def rows_of_last_step(train: TrainConfig, seq_len: int, state: Mapping[str, Any]) -> int:
  """The rows of the step that left the iterator in `state` (a WarmupBatches state)."""
  drawn, part = int(state["warmup_drawn"]), int(state["warmup_part"])
  return rows_for_batch(train, seq_len, drawn if part else max(drawn - 1, 0))


class WarmupBatches:
  """Wraps a train iterator of full global batches (next, get_state, set_state; e.g. a
  loader.Loader) into the warmup's smaller steps. Each yielded batch is the drawn batch's rows
  [part::parts] (this process's rows, for its share of the global step)."""

  def __init__(self, inner: Any, train: TrainConfig, seq_len: int):
    self.inner, self.train, self.seq_len = inner, train, seq_len
    self.drawn = 0          # global batches drawn from `inner` so far
    self.batch = None       # the drawn batch being split (host arrays)
    self.batch_state = None  # inner's state before it was drawn
    self.part, self.parts = 0, 1

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.batch is None or self.part == self.parts:
      self._draw(0)
    rows = {key: value[self.part::self.parts] for key, value in self.batch.items()}
    self.part += 1
    return rows

  def _draw(self, part: int) -> None:
    self.batch_state = self.inner.get_state()
    self.parts = self.train.global_batch_size // rows_for_batch(self.train, self.seq_len,
                                                                 self.drawn)
    self.batch, self.part = next(self.inner), part
    self.drawn += 1

  def get_state(self) -> dict[str, Any]:
    """The inner state at the batch being split and the next part of it, or (between drawn
    batches) the inner state and part 0."""
    if self.batch is not None and self.part < self.parts:
      return {**self.batch_state, "warmup_drawn": self.drawn - 1, "warmup_part": self.part}
    return {**self.inner.get_state(), "warmup_drawn": self.drawn, "warmup_part": 0}

  def set_state(self, state: Mapping[str, Any]) -> None:
    inner = {k: v for k, v in state.items() if k not in ("warmup_drawn", "warmup_part")}
    self.inner.set_state(inner)
    drawn = state.get("warmup_drawn", state.get("batch", 0))  # (a Loader's state: batches drawn)
    self.drawn, self.batch, self.part, self.parts = int(drawn), None, 0, 1
    if int(state.get("warmup_part", 0)):  # mid-batch: draw it again, go on at that part
      self._draw(int(state["warmup_part"]))
