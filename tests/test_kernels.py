"""The Pallas attention kernels (jaxlm.kernels) in Pallas interpret mode on CPU: the values and
gradients of the written-out reference attention with packed documents, causal and local masks
and grouped-query attention; inside the model, on a mesh and through pipeline stages equal to
one device; refused where they cannot run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import kernels
from jaxlm import model as model_lib
from jaxlm.config import ConfigError
from tests import helpers
from tests.helpers import run_steps

BATCH, LENGTH, HEADS, HEAD_DIM = 2, 256, 4, 16


def inputs(kv_heads: int):
  rng = np.random.default_rng(0)
  normal = lambda heads: jnp.asarray(rng.normal(size=(BATCH, LENGTH, heads, HEAD_DIM)),
                                     jnp.float32)
  # Row 0: three packed documents then padding (segment 0); row 1: one document.
  row0 = np.concatenate([np.full(100, 1), np.full(90, 2), np.full(40, 3), np.zeros(26)])
  segment_ids = jnp.asarray(np.stack([row0, np.ones(LENGTH)]), jnp.int32)
  return normal(HEADS), normal(kv_heads), normal(kv_heads), segment_ids


def reference(query, key, value, segment_ids, window):
  slots = jnp.arange(LENGTH)
  mask = (model_lib.causal_mask(slots, slots, window)
          & model_lib.segment_mask(segment_ids, segment_ids))
  return model_lib.reference_attention(query, key, value, mask)


@pytest.mark.parametrize("impl,kv_heads,window", [
    ("splash", 4, 0), ("splash", 2, 48), ("splash", 1, 0), ("triton", 2, 0)])
def test_kernel_equals_reference_attention_values_and_gradients(impl, kv_heads, window):
  query, key, value, segment_ids = inputs(kv_heads)
  # A loss that weights every output differently, so each gradient entry is tested.
  weights = jnp.asarray(np.random.default_rng(1).normal(size=query.shape), jnp.float32)

  def loss(attention):
    return lambda q, k, v: jnp.sum(attention(q, k, v, segment_ids, window) * weights)

  pallas = lambda q, k, v, ids, w: kernels.attention(impl, q, k, v, ids, window=w)
  np.testing.assert_allclose(jax.jit(pallas, static_argnums=4)(query, key, value, segment_ids,
                                                                 window),
                             reference(query, key, value, segment_ids, window), atol=2e-5)
  got = jax.jit(jax.grad(loss(pallas), argnums=(0, 1, 2)))(query, key, value)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(query, key, value)
  for name, g, w in zip(("query", "key", "value"), got, want):
    np.testing.assert_allclose(g, w, atol=1e-4, err_msg=name)


def test_kernels_take_the_lengths_they_tile():
  assert [kernels.splash_block(n) for n in (128, 384, 1024, 100, 1000)] == [
      128, 128, 512, None, None]
  assert kernels.supports("triton", 64) and kernels.supports("triton", 512)
  assert not kernels.supports("triton", 200) and not kernels.supports("triton", 256, 8)


# The model's attention with GQA, qk-norm and a window inside packed documents, at a length
# the splash kernel tiles; the window on layer 0 only (model.window_layers: the local kernel
# there, the causal one on layer 1).
MODERN = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 32, "mlp_dim": 64,
          "vocab_size": 96, "max_seq_len": 128, "qk_norm": True, "sliding_window": 40,
          "window_layers": "0", "positional": "rope", "norm": "rmsnorm", "mlp": "swiglu",
          "use_bias": False}
TRAIN = {"data": {"seq_len": 128, "stride": 128},
         "train": {"global_batch_size": 8, "num_steps": 10},
         "optim": {"warmup_steps": 1, "learning_rate": 1e-2}}


def kernel_config(mesh=None, train=None, **model):
  return config_lib.validate({**TRAIN, "mesh": mesh or {"data": 1},
                              "train": {**TRAIN["train"], **(train or {})},
                              "model": {**MODERN, **model}})


def packed_batch(config, seed):
  """Random tokens in two packed documents per row (a cut at 50)."""
  return helpers.packed_batch(config, seed, cut=50)


@pytest.fixture(scope="module")
def reference_run():
  return run_steps(kernel_config(attention_impl="reference"), 2, jax.devices()[:1],
                   batch=packed_batch)


@pytest.mark.parametrize("mesh,model", [
    ({"data": 2, "fsdp": 2, "tensor": 2}, {}),
    ({"stage": 2, "tensor": 2}, {"scan_layers": True, "remat_policy": "full"}),
])
def test_splash_training_on_a_mesh_equals_the_reference_on_one_device(reference_run, mesh,
                                                                      model):
  """Splash inside the model under data x fsdp x tensor (heads split over tensor: per-device
  kernels in shard_map), and scanned through pipeline stages with full rematerialization (each
  layer's window flag a scan input: splash runs the local or the causal kernel by it): the
  unscanned reference's losses and parameters."""
  want_state, want_losses = reference_run
  train = {"pipeline_microbatches": 2} if "stage" in mesh else {}
  config = kernel_config(mesh, train, attention_impl="splash", **model)
  devices = jax.devices()[:int(np.prod(list(mesh.values())))]
  state, losses = run_steps(config, 2, devices, batch=packed_batch)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  got, want = state.params, want_state.params
  if model.get("scan_layers"):
    got = model_lib.unstack_layers(jax.device_get(got))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(jax.device_get(want))):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("impl,platform,message", [
    ("splash", "gpu", "needs a TPU"), ("triton", "tpu", "needs an NVIDIA GPU"),
    ("cudnn", "cpu", "needs an NVIDIA GPU")])
def test_a_kernel_on_the_wrong_devices_is_a_one_line_error(impl, platform, message):
  config = config_lib.validate({"model": {"attention_impl": impl}}).model
  with pytest.raises(ConfigError, match=message):
    model_lib.resolve_attention_impl(config, platform)


def test_auto_is_splash_on_tpu_except_when_decoding_or_with_dropout():
  config = config_lib.validate({}).model
  assert model_lib.resolve_attention_impl(config, "tpu") == "splash"
  assert model_lib.resolve_attention_impl(config, "tpu", decoding=True) == "xla"
  dropout = config_lib.validate({"model": {"dropout": 0.1}}).model
  assert model_lib.resolve_attention_impl(dropout, "tpu") == "reference"
  with pytest.raises(ConfigError, match="model.attention_impl='triton' with model.sliding"):
    config_lib.validate({"model": {"attention_impl": "triton", "sliding_window": 8}})
