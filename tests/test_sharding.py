"""Meshes: data / FSDP / tensor parallel give the single-device numbers; FSDP really shards."""

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm import steps as steps_lib
from jaxlm.config import ConfigError
from tests.helpers import random_batch

MESH_VALUES = {
    # No biases: a key bias gets an exactly-zero gradient in theory, so Adam turns its ~1e-9
    # rounding noise into lr-sized steps that differ between meshes; every other parameter
    # has a real gradient and must agree to 1e-5.
    "model": {"num_layers": 2, "num_heads": 8, "embed_dim": 64, "mlp_dim": 128,
              "vocab_size": 128, "max_seq_len": 16, "use_bias": False,
              "positional": "learned"},
    "data": {"seq_len": 16, "stride": 16},
    "train": {"global_batch_size": 16, "num_steps": 10},
    "optim": {"warmup_steps": 2, "learning_rate": 1e-2},
}


def run(mesh_shape, num_steps=5, model=None):
  data, fsdp, tensor = mesh_shape
  values = {**MESH_VALUES, "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor}}
  if model:
    values["model"] = dict(MESH_VALUES["model"], **model)
  config = config_lib.validate(values)
  devices = jax.devices()[:data * fsdp * tensor]
  mesh = sharding.make_mesh(config.mesh, devices)
  steps = steps_lib.make_steps(config, mesh)
  state = steps.init(jax.random.PRNGKey(0))
  losses = []
  for i in range(num_steps):
    state, metrics = steps.train(state, sharding.global_batch(random_batch(config, i), mesh))
    losses.append(float(metrics["train_loss"]))
  return losses, state


@pytest.fixture(scope="module")
def single_device():
  losses, state = run((1, 1, 1))
  return losses, jax.device_get(state.params)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 4, 2)])
def test_mesh_matches_single_device(mesh_shape, single_device):
  want_losses, want_params = single_device
  losses, state = run(mesh_shape)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# Grouped-query attention (2 kv heads for 8 query heads), qk-norm and a sliding window.
MODERN = {"num_kv_heads": 2, "qk_norm": True, "sliding_window": 5, "positional": "rope",
          "norm": "rmsnorm", "mlp": "swiglu"}


def test_grouped_query_attention_with_a_window_matches_single_device_on_a_mesh():
  want_losses, state = run((1, 1, 1), num_steps=3, model=MODERN)
  want_params = jax.device_get(state.params)
  losses, state = run((2, 2, 2), num_steps=3, model=MODERN)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  key = state.params["layers_0"]["attention"]["key"]["kernel"]   # [embed, kv_heads, head_dim]
  assert key.shape == (64, 2, 8)
  assert tuple(key.sharding.spec) == ("fsdp", "tensor", None)


def test_fsdp_shards_params_and_optimizer_state():
  _, state = run((1, 8, 1), num_steps=1)
  arrays = [x for x in jax.tree.leaves((state.params, state.opt_state)) if hasattr(x, "sharding")]
  total = sum(x.nbytes for x in arrays)
  per_device = {}
  for x in arrays:
    for shard in x.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  assert len(per_device) == 8
  assert max(per_device.values()) <= total / 8 * 1.05, (max(per_device.values()), total)


def test_mesh_product_must_match_devices():
  with pytest.raises(ConfigError, match="8 are available"):
    sharding.make_mesh(config_lib.MeshConfig(data=2, fsdp=2, tensor=1))
  with pytest.raises(ConfigError, match="does not divide"):
    sharding.make_mesh(config_lib.MeshConfig(data=-1, fsdp=3, tensor=1))


def test_batch_must_split_over_data_and_fsdp():
  values = {**MESH_VALUES, "mesh": {"data": 4, "fsdp": 2, "tensor": 1},
            "train": {"global_batch_size": 12}}
  config = config_lib.validate(values)
  with pytest.raises(ConfigError, match="data x fsdp = 8"):
    steps_lib.make_steps(config, sharding.make_mesh(config.mesh))


@pytest.mark.parametrize("field, value, mesh_values, match", [
    ("num_heads", 2, {"data": 2, "tensor": 4},
     "model.num_heads=2 is not divisible by mesh.tensor=4"),
    ("mlp_dim", 102, {"data": 2, "tensor": 4}, "model.mlp_dim=102"),
    ("vocab_size", 50257, {"data": 4, "tensor": 2}, "vocab_size=50258"),
    ("embed_dim", 60, {"data": 1, "fsdp": 8}, "model.embed_dim=60 is not divisible by mesh.fsdp"),
    ("num_kv_heads", 2, {"data": 2, "tensor": 4},
     "model.num_kv_heads=2 is not divisible by mesh.tensor=4"),
])
def test_dimensions_must_divide_their_mesh_axes(field, value, mesh_values, match):
  model = dict(MESH_VALUES["model"], **{field: value})
  if field == "embed_dim":
    model["num_heads"] = 4
  values = {**MESH_VALUES, "model": model, "mesh": {"data": 1, "fsdp": 1, "tensor": 1,
                                                    **mesh_values}}
  config = config_lib.validate(values)
  with pytest.raises(ConfigError, match=match):
    steps_lib.make_steps(config, sharding.make_mesh(config.mesh))


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_splits_the_optimizer_state_over_data_and_matches_one_device(stage, single_device):
  """train.zero_stage on mesh.data=8: parameters stay replicated, each optimizer-state array is
  split 8 ways (a device holds an eighth of AdamW's moments); the losses and parameters are one
  device's (ZeRO-2 also constrains the gradients to those shards)."""
  want_losses, want_params = single_device
  values = {**MESH_VALUES, "mesh": {"data": 8, "fsdp": 1, "tensor": 1},
            "train": {**MESH_VALUES["train"], "zero_stage": stage}}
  config = config_lib.validate(values)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
  steps = steps_lib.make_steps(config, mesh)
  state = steps.init(jax.random.PRNGKey(0))
  losses = []
  for i in range(5):
    state, metrics = steps.train(state, sharding.global_batch(random_batch(config, i), mesh))
    losses.append(float(metrics["train_loss"]))
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(jax.device_get(state.params)),
                       jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
  moments = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) >= 1]
  per_device = sum(x.addressable_shards[0].data.nbytes for x in moments)
  assert per_device <= sum(x.nbytes for x in moments) / 8 * 1.02, per_device
