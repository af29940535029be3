"""Checkpoints: exact round trip, restore onto another mesh, corruption detected."""

import glob
import os

import jax
import numpy as np
import pytest

from jaxlm import checkpoint as ckpt
from jaxlm import config as config_lib
from jaxlm import sharding, train
from tests.test_train import TINY, random_batch


class _FakeTokenizer:
  """Checkpoints store whatever bytes a tokenizer serializes to."""
  file_name = "tokenizer.model"

  def serialize(self) -> bytes:
    return b"not really a model"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  config = config_lib.validate(TINY)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  steps = train.make_steps(config, mesh)
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
  steps = train.make_steps(config, mesh)
  restored, data_state, meta = ckpt.Checkpointer(directory).restore(1, steps.abstract_state)
  assert data_state == {"next_index": 1}
  assert meta["config"] == config_lib.to_dict(config)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_restores_onto_another_mesh(trained):
  config, state, directory = trained
  config8 = config_lib.replace(config, mesh={"data": 2, "fsdp": 4, "tensor": 1})
  steps = train.make_steps(config8, sharding.make_mesh(config8.mesh))
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
  steps = train.make_steps(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  with pytest.raises(ckpt.CheckpointError, match="checkpoint .*1"):
    ckpt.Checkpointer(str(copy)).restore(1, steps.abstract_state)


def test_a_checkpoint_from_before_spike_stats_resumes(trained, tmp_path):
  """Runs saved before TrainState carried the spike statistics (the four other fields only)
  restore with the statistics started afresh."""
  config, state, _ = trained
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  steps = train.make_steps(config, mesh)
  old = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
         "rng": state.rng}
  checkpointer = ckpt.Checkpointer(str(tmp_path / "checkpoints"))
  checkpointer.save(1, old, {"next_index": 1}, config_lib.to_dict(config), _FakeTokenizer())
  checkpointer.wait()
  assert "spike_stats" in ckpt.fingerprints(state)  # what a current checkpoint holds
  restored, _, _ = ckpt.Checkpointer(str(tmp_path / "checkpoints")).restore(
      1, steps.abstract_state)
  assert isinstance(restored, train.TrainState)
  np.testing.assert_array_equal(restored.spike_stats, np.zeros(3, np.float32))
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  steps.train(restored, sharding.global_batch(random_batch(config), mesh))  # it trains on
