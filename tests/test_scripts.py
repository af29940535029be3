"""What every script shares (experiments/common.py): errors reach the user as one line."""

import jax
import pytest

from experiments import common
from jaxlm.config import ConfigError


def failing_main(error: Exception):
  @common.exit_on_user_error
  def main(argv):
    raise error
  return main


def test_user_errors_and_running_out_of_device_memory_are_one_line(capsys):
  for error, expected in [
      (ConfigError("model.embed_dim=0 must be positive."), "error: model.embed_dim=0 must be"),
      # What XLA raises when an allocation fails on a GPU (on a TPU: "RESOURCE_EXHAUSTED: XLA:TPU
      # compile permanent error. Ran out of memory in memory space hbm ...").
      (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                  "25769803776 bytes.\nBufferAssignment OOM Debugging."),
       "error: the device ran out of memory (RESOURCE_EXHAUSTED: Out of memory while trying to "
       "allocate 25769803776 bytes. BufferAssignment")]:
    with pytest.raises(SystemExit) as exit_info:
      failing_main(error)([])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines
  assert "--config.train.global_batch_size" in lines[0] and "--batch_size" in lines[0]


def test_other_errors_keep_their_traceback():
  for error in (jax.errors.JaxRuntimeError("INTERNAL: a compiler bug"), KeyError("x")):
    with pytest.raises(type(error)):
      failing_main(error)([])
