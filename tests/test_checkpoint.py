"""Checkpoints: exact round trip, restore onto another mesh, corruption detected, and resuming
from the newest checkpoint that restores (or a chosen one)."""

import glob
import os

import jax
import numpy as np
import pytest

from jaxlm import checkpoint as ckpt
from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm import steps as steps_lib
from tests.helpers import TINY, damage, random_batch


class _FakeTokenizer:
  """Checkpoints store whatever bytes a tokenizer serializes to."""
  file_name = "tokenizer.model"

  def serialize(self) -> bytes:
    return b"not really a model"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  config = config_lib.validate(TINY)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  steps = steps_lib.make_steps(config, mesh)
  state = steps.init(jax.random.PRNGKey(0))
  state, _ = steps.train(state, sharding.global_batch(random_batch(config), mesh))
  directory = tmp_path_factory.mktemp("ckpt")
  checkpointer = ckpt.Checkpointer(str(directory / "checkpoints"))
  checkpointer.save(1, state, {"next_index": 1}, config_lib.to_dict(config),
                    _FakeTokenizer())
  checkpointer.wait()
  return config, jax.device_get(state), str(directory / "checkpoints")


def test_round_trip_is_exact(trained):
  config, state, directory = trained
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  steps = steps_lib.make_steps(config, mesh)
  restored, data_state, meta = ckpt.Checkpointer(directory).restore(1, steps.abstract_state)
  assert data_state == {"next_index": 1}
  assert meta["config"] == config_lib.to_dict(config)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_restores_onto_another_mesh(trained):
  config, state, directory = trained
  config8 = config_lib.replace(config, mesh={"data": 2, "fsdp": 4, "tensor": 1})
  steps = steps_lib.make_steps(config8, sharding.make_mesh(config8.mesh))
  restored, _, _ = ckpt.Checkpointer(directory).restore(1, steps.abstract_state)
  kernel = restored.params["layers_0"]["mlp"]["fc"]["kernel"]
  assert len(kernel.sharding.device_set) == 8
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_fingerprint_changes_with_any_single_element():
  x = np.linspace(-1, 1, 1000, dtype=np.float32)
  base = ckpt.fingerprints({"x": x})["x"]
  for i in (0, 500, 999):
    y = x.copy()
    y.view(np.uint32)[i] ^= 1 << 7
    assert ckpt.fingerprints({"x": y})["x"] != base
  sharded = jax.device_put(x, jax.sharding.NamedSharding(
      jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,)),
      jax.sharding.PartitionSpec("d")))
  assert ckpt.fingerprints({"x": sharded})["x"] == base
  # Hashed in chunks (big leaves are, to bound their temporaries): the same two numbers, with
  # a tail after the whole chunks or without.
  for chunk in (7, 100, 1000):
    got = jax.jit(ckpt._fingerprint_leaf, static_argnums=1)(x, chunk)
    assert [int(v) for v in got] == base, chunk


def test_flipped_bytes_are_refused(trained, tmp_path):
  config, _, directory = trained
  import shutil
  copy = tmp_path / "checkpoints"
  shutil.copytree(directory, copy)
  files = [f for f in glob.glob(str(copy / "1" / "state" / "**" / "*"), recursive=True)
           if os.path.isfile(f) and os.path.getsize(f) > 4096]
  assert files
  target = max(files, key=os.path.getsize)
  with open(target, "r+b") as f:
    f.seek(os.path.getsize(target) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x55]))
  steps = steps_lib.make_steps(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  with pytest.raises(ckpt.CheckpointError, match="checkpoint .*1"):
    ckpt.Checkpointer(str(copy)).restore(1, steps.abstract_state)


def test_a_checkpoint_from_before_spike_stats_resumes(trained, tmp_path):
  """Runs saved before TrainState carried the spike statistics and the rollback's learning-rate
  window (the four other fields only) restore with those started afresh."""
  config, state, _ = trained
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  steps = steps_lib.make_steps(config, mesh)
  old = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
         "rng": state.rng}
  checkpointer = ckpt.Checkpointer(str(tmp_path / "checkpoints"))
  checkpointer.save(1, old, {"next_index": 1}, config_lib.to_dict(config), _FakeTokenizer())
  checkpointer.wait()
  assert "spike_stats" in ckpt.fingerprints(state)  # what a current checkpoint holds
  restored, _, _ = ckpt.Checkpointer(str(tmp_path / "checkpoints")).restore(
      1, steps.abstract_state)
  assert isinstance(restored, steps_lib.TrainState)
  np.testing.assert_array_equal(restored.spike_stats, np.zeros(3, np.float32))
  assert int(restored.rollback_lr_until) == 0
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  steps.train(restored, sharding.global_batch(random_batch(config), mesh))  # it trains on


# -- resuming from the newest checkpoint that restores -----------------------------------------

@pytest.fixture
def two_steps(trained, tmp_path):
  """A checkpoints/ directory with steps 1 and 2 (data states 1 and 2), and the abstract state."""
  config, state, _ = trained
  checkpointer = ckpt.Checkpointer(str(tmp_path / "checkpoints"))
  for step in (1, 2):
    checkpointer.save(step, state, {"next_index": step}, config_lib.to_dict(config),
                      _FakeTokenizer())
  checkpointer.wait()
  steps = steps_lib.make_steps(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  return tmp_path / "checkpoints", steps.abstract_state


# (tensorstore's reads of a truncated file end as unraisable warnings after the error)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["flipped", "truncated", "no_meta"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(two_steps, how):
  directory, abstract = two_steps
  damage(str(directory / "2"), how)
  warnings = []
  checkpointer = ckpt.Checkpointer(str(directory))
  step, _, data_state = checkpointer.restore_for_resume(abstract, warn=warnings.append)
  assert (step, data_state) == (1, {"next_index": 1})
  assert warnings[0].startswith(f"warning: skipping checkpoint 2: checkpoint {directory / '2'}")
  # The damaged step is kept aside, and the run can save that step again.
  assert checkpointer.all_steps() == [1]
  assert (directory.parent / "checkpoints_discarded" / "2").is_dir()
  assert "checkpoints_discarded" in warnings[-1]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_restorable_checkpoint_is_one_error_and_restore_step_picks_one(two_steps):
  directory, abstract = two_steps
  checkpointer = ckpt.Checkpointer(str(directory))
  with pytest.raises(ckpt.CheckpointError, match=r"--restore_step=5: .* \(available steps: 1, "
                     r"2\)"):
    checkpointer.restore_for_resume(abstract, restore_step=5)
  step, _, data_state = checkpointer.restore_for_resume(abstract, restore_step=1,
                                                        warn=lambda _: None)
  assert (step, data_state) == (1, {"next_index": 1})
  assert checkpointer.all_steps() == [1]  # step 2 (valid) moved aside, not deleted
  assert (directory.parent / "checkpoints_discarded" / "2").is_dir()
  damage(str(directory / "1"), "truncated")
  with pytest.raises(ckpt.CheckpointError) as error:
    checkpointer.restore_for_resume(abstract, warn=lambda _: None)
  assert "none of the 1 checkpoints" in str(error.value) and "\n" not in str(error.value)
  assert checkpointer.all_steps() == [1]  # nothing moved when nothing restores
