"""What every script shares (experiments/common.py): errors reach the user as one line."""

import re
import subprocess
import sys

import jax
import pytest

from experiments import common
from jaxlm.config import ConfigError
from tests.conftest import REPO


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


@pytest.mark.e2e
def test_a_config_file_that_cannot_be_loaded_is_one_line(tmp_path):
  """ml_collections loads --config while absl parses the flags: a file that is missing (with an
  override), does not parse, raises, has no get_config() or one that returns no ConfigDict
  (a dict, None) is one line, exit 2, nothing written."""
  (tmp_path / "syntax.py").write_text("def get_config(:\n")
  (tmp_path / "raises.py").write_text("def get_config():\n  raise RuntimeError('boom')\n")
  (tmp_path / "none.py").write_text("x = 1\n")
  (tmp_path / "dict.py").write_text("def get_config():\n  return {'model': {}}\n")
  (tmp_path / "nothing.py").write_text("def get_config():\n  pass\n")
  for name, expected in [("syntax.py", r"SyntaxError: .*syntax\.py, line 1\)"),
                         ("dict.py", r"get_config\(\) returned dict, not an ml_collections"),
                         ("nothing.py", r"get_config\(\) returned NoneType, not an"),
                         ("raises.py", r"RuntimeError: boom"),
                         ("none.py", r"defines no get_config\(\)"),
                         ("missing.py", r"OSError: .*missing\.py")]:
    override = [] if name in ("dict.py", "nothing.py") else ["--config.train.num_steps=6"]
    result = subprocess.run(
        [sys.executable, "-m", "experiments.pretrain", f"--config={tmp_path / name}",
         *override, f"--workdir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.strip().splitlines()  # (ml_collections' warning)
             if not ("did you forget a return" in line or "Logging before flag parsing" in line)]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert re.match(r"error: (the --config file cannot be loaded: )?.*" + expected, lines[0]), (
        lines[0])
  assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_help_lists_every_flag_of_the_script_and_exits_0():
  """absl lists only the main module's flags and exits 1: --config, --restore_step and the
  distributed flags (defined in experiments/common.py) were missing from --help."""
  for script, flag, expected in [
      ("pretrain", "--help", ("--config:", "(default: 'configs/default.py')", "--workdir:",
                              "--restore_step:", "--coordinator_address:")),
      ("finetune_instruct", "-h", ("--config: override fields", "--init:", "--data:"))]:
    result = subprocess.run([sys.executable, "-m", f"experiments.{script}", flag], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for text in expected:
      assert text in result.stdout, (script, text, result.stdout)
    assert "corpus: pystdlib" not in result.stdout  # (the schema's defaults are not the run's)


@pytest.mark.e2e
def test_an_unknown_override_is_named_in_full():
  """ml_collections names only the unknown part ('foo' for --config.model.foo); a valid key
  with the same last part is not the one named, and ml_collections' did-you-mean stays."""
  for args, expected in [
      (["--config.model.foo=1"], "error: unknown config key 'model.foo'"),
      (["--config.data.seq_len=128", "--config.model.seq_len=128"],
       "error: unknown config key 'model.seq_len'; Did you mean \"max_seq_len\" instead of "
       "\"seq_len\"?"),
      (["--config.modle.num_layers=2"], "error: unknown config key 'modle.num_layers'; Did you "
                                        "mean \"model\" instead of \"modle\"?")]:
    result = subprocess.run([sys.executable, "-m", "experiments.finetune_instruct", *args],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [expected], result.stderr
