"""What the loop does about bad steps: non-finite losses and loss spikes (detected inside the
step by `steps.spike_update`), read one step late so the host never waits for the device.

Non-finite steps are skipped in the step and counted here: more than
train.max_nonfinite_steps in a row stop the run. A spike (train.spike_action) is reported with
its batch's data position and the step's layer statistics; `halt` stops the run, `skip` stops
it after train.max_spike_steps skips in a row, `rollback` raises `Rollback` for the loop to go
back to its newest checkpoint and on past the spike's batch.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import jax

from jaxlm.config import Config
from jaxlm.errors import UserError


class TrainingDiverged(UserError):
  """Too many non-finite or spiking steps in a row, or a spike under spike_action=halt."""


class Rollback(Exception):
  """A spike under spike_action=rollback: `fit` rolls back and goes on."""

  def __init__(self, step: int, record: dict[str, Any], data_after: Any, batches_after: int):
    super().__init__(step)
    self.step, self.record = step, record
    self.data_after, self.batches_after = data_after, batches_after  # after the spike's batch


class SpikeWatch:
  """The flags of each finished step, read while the next one runs (`settle`)."""

  def __init__(self, config: Config, writer, log: Callable[[str], None]):
    self.config, self.writer, self.log = config, writer, log
    self.restart(0, None)

  def restart(self, step: int, data_state: Any) -> None:
    """At the start of the steps (and again after a rollback): nothing pending or in a row;
    `data_state` is the position of step `step + 1`'s batch."""
    self.pending: tuple[int, Mapping[str, Any]] | None = None
    self.in_a_row = {"nonfinite": 0, "spike": 0}
    self.positions = {step + 1: data_state}  # step -> the data position of its batch

  def step_done(self, step: int, metrics: Mapping[str, Any]) -> None:
    self.pending = (step, metrics)

  def next_batch(self, step: int, data_state: Any) -> None:
    """The batch of step `step` starts at `data_state` (recent steps are kept)."""
    self.positions = {s: p for s, p in self.positions.items() if s >= step - 2}
    self.positions[step] = data_state

  def settle(self, step: int, data_state: Any, batches: int, saved_step: int) -> None:
    """Counts and reports the pending step's non-finite loss or spike, if any; raises
    TrainingDiverged past the limits (or at a spike under halt), Rollback under rollback.
    step, data_state, batches: where the run is now; saved_step: its newest checkpoint."""
    if self.pending is None:
      return
    (done_step, metrics), self.pending = self.pending, None
    t = self.config.train
    flags = jax.device_get({k: metrics[k] for k in ("nonfinite", "spike")})
    self.in_a_row["nonfinite"] = self.in_a_row["nonfinite"] + 1 if flags["nonfinite"] else 0
    if flags["nonfinite"]:
      self.log(f"step {done_step}: non-finite loss or gradient; update skipped "
               f"({self.in_a_row['nonfinite']} in a row)")
      if self.in_a_row["nonfinite"] > t.max_nonfinite_steps:
        raise TrainingDiverged(
            f"training diverged: {self.in_a_row['nonfinite']} non-finite steps in a row at step "
            f"{done_step} (train.max_nonfinite_steps={t.max_nonfinite_steps}); lower "
            f"optim.learning_rate or raise optim.warmup_steps, and {restart_advice(saved_step)}.")
    self.in_a_row["spike"] = self.in_a_row["spike"] + 1 if flags["spike"] else 0
    if flags["spike"]:  # its values fetched only then: two scalars per step otherwise
      record = self._report(done_step, jax.device_get(metrics), self.positions.get(done_step),
                            saved_step)
      if t.spike_action == "rollback":
        after = self.positions.get(done_step + 1, data_state)  # (done_step is the last)
        raise Rollback(done_step, record, after, batches - (step - done_step))

  def _report(self, step: int, values: Mapping[str, Any], position: Any, saved_step: int
              ) -> dict[str, Any]:
    """Logs a spike (stderr, metrics.jsonl, TensorBoard) with the data position of its batch
    and the step's per-layer statistics (if train.layer_stats_every); returns its record."""
    t, in_a_row = self.config.train, self.in_a_row["spike"]
    loss_ratio = float(values["train_loss"]) / max(float(values["loss_mean"]), 1e-30)
    grad_ratio = float(values["grad_norm"]) / max(float(values["grad_norm_mean"]), 1e-30)
    record = {"spike": 1, "spike_loss": values["train_loss"], "spike_loss_ratio": loss_ratio,
              "spike_grad_norm": values["grad_norm"], "spike_grad_norm_ratio": grad_ratio,
              "spike_action": t.spike_action, "spike_batch_position": position,
              **values.get("layer_stats", {})}
    self.writer.write(step, record)
    applied = {"log": "update applied", "rollback": "update not applied; rolling back"}.get(
        t.spike_action, "update not applied")
    self.log(f"step {step}: loss spike ({t.spike_action}): loss "
             f"{float(values['train_loss']):.4g} = {loss_ratio:.2f}x its running mean, gradient "
             f"norm {float(values['grad_norm']):.4g} = {grad_ratio:.2f}x; {applied}; the "
             f"batch's data position: {json.dumps(position)}")
    if t.spike_action == "halt":
      raise TrainingDiverged(
          f"loss spike at step {step} (train.spike_action=halt): loss {loss_ratio:.2f}x, "
          f"gradient norm {grad_ratio:.2f}x their running means; {restart_advice(saved_step)}, "
          f"with train.spike_action=skip or a lower optim.learning_rate.")
    if t.spike_action == "skip" and in_a_row > t.max_spike_steps:
      raise TrainingDiverged(
          f"{in_a_row} spikes in a row at step {step} (train.max_spike_steps="
          f"{t.max_spike_steps}): the loss has moved for good, which skipping cannot fix; lower "
          f"optim.learning_rate, or raise train.spike_loss_ratio / train.spike_grad_ratio, and "
          f"{restart_advice(saved_step)}.")
    return record


def restart_advice(saved_step: int) -> str:
  """How a stopped run goes on: from its newest checkpoint, or from the start if it has none."""
  if saved_step:
    return f"rerun to resume from the last checkpoint (step {saved_step})"
  return "rerun to start over (no checkpoint was saved yet)"
