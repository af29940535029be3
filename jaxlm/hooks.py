"""Periodic work of the training loop as hooks: `Hook(fn, every=N)` runs `fn(info)` after every
N-th step (levanter's `trainer.add_hook(fn, every=N)`).

The loop registers its own (layer statistics, logging, evaluation, samples, checkpoints, the
profiler window) in that order, then the task's and the caller's:

  def print_loss(info):
    print(info.step, float(info.metrics["train_loss"]))
  pretrain.train(config, workdir, hooks=[Hook(print_loss, every=100)])

A hook sees the state after its step and that step's metrics (device arrays: reading one waits
for the step). Hooks other than logging and layer statistics stop the throughput clock while
they run: their time is not training time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """What a hook sees after step `step` (steps done so far)."""
  step: int
  last: bool                       # the run's last step (train.num_steps)
  state: Any                       # the TrainState after the step
  metrics: Mapping[str, Any]       # the step's metrics (train_loss, grad_norm, ...; on device)
  data_state: Any                  # the data position after the step's batch


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(info)` after every `every`-th step (0: never periodically), and after the last step
  with `at_end`. `when(step, last)`, if given, decides instead."""
  fn: Callable[[StepInfo], Any]
  every: int = 1
  at_end: bool = False
  when: Callable[[int, bool], bool] | None = None
  pauses_clock: bool = True        # its time is not counted as training time

  def due(self, step: int, last: bool) -> bool:
    if self.when is not None:
      return self.when(step, last)
    return (self.every > 0 and step % self.every == 0) or (self.at_end and last)


def run_due(hooks: Sequence[Hook], info: StepInfo) -> bool:
  """Runs the hooks due after `info.step`, in order; whether one of them paused the clock."""
  paused = False
  for hook in hooks:
    if hook.due(info.step, info.last):
      hook.fn(info)
      paused |= hook.pauses_clock
  return paused


def profiler_hooks(trace_dir: str, window: tuple[int, int] | None, next_step: int = 1
                   ) -> list[Hook]:
  """Hooks that trace steps START .. END-1 of `window` (config.profile_window) with
  `jax.profiler` into `trace_dir` (TensorBoard's profile plugin or Perfetto read it); none for
  None. If START is `next_step` (the step the run is about to take) the trace starts now. A run
  that ends inside the window stops the trace at its last step; one that resumes past START
  traces nothing."""
  if window is None:
    return []
  import jax  # pylint: disable=import-outside-toplevel
  tracing = []

  def start(info: StepInfo) -> None:
    jax.block_until_ready(info.metrics)
    jax.profiler.start_trace(trace_dir)
    tracing.append(True)

  def stop(info: StepInfo) -> None:
    jax.block_until_ready(info.metrics)
    jax.profiler.stop_trace()
    tracing.clear()

  first, end = window
  if first == next_step:
    jax.profiler.start_trace(trace_dir)
    tracing.append(True)
  return [Hook(start, when=lambda step, _: step == first - 1),  # (after the step before it)
          Hook(stop, when=lambda step, last: bool(tracing) and (step == end - 1 or last))]
