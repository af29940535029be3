"""Tests for jaxlm/lora.py (and the LoRA path of model.py): numbers, not shapes.

Tiny models (2 layers, 32-64 dims) with random weights of std 0.2, so logits are O(1) and an
adapter that is dropped, doubled or mis-reshaped moves them far past the 1e-5 tolerances.
"""

import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

from jaxlm import config as config_lib
from jaxlm import lora, sharding
from jaxlm import params as params_lib
from jaxlm import steps as steps_lib
from jaxlm.config import ModelConfig
from jaxlm.lora import LoraError
from jaxlm.model import Transformer, count_params, lora_params_per_layer, param_count
from tests.conftest import random_params
from tests.helpers import random_batch

BASE = ModelConfig(num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64, vocab_size=61,
                   max_seq_len=16, positional="learned")
BATCH, LENGTH = 2, 12
# XLA CPU compilation dominates the runtime; optimization level 0 compiles faster and does not
# change what is tested.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def make(**overrides) -> ModelConfig:
  return dataclasses.replace(BASE, **overrides)


def tokens(seed: int = 0) -> jax.Array:
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, BASE.vocab_size, (BATCH, LENGTH)), jnp.int32)


@functools.partial(jit, static_argnums=(0, 3))
def forward(cfg: ModelConfig, params, inputs, deterministic: bool = True, rng=None):
  """logits [batch, length, vocab or num_classes]; dropout on when deterministic=False."""
  rngs = {} if rng is None else {"dropout": rng}
  return Transformer(cfg).apply({"params": params}, inputs, deterministic=deterministic,
                                rngs=rngs)


def abstract_params(cfg: ModelConfig):
  return jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))


def adapted(cfg: ModelConfig):
  """(base params, the same params plus random nonzero adapters) for lora_rank > 0."""
  params = random_params(cfg)
  return split(params)[1], params


def split(params):
  """(adapters, base): the lora_a/lora_b leaves and all others."""
  return params_lib.partition(params, lora.is_adapter_path)


def randomize_adapters(params, seed: int = 2):
  """`params` with every lora_a/lora_b replaced by N(0, 0.2) values."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (jnp.asarray(rng.normal(0.0, 0.2, x.shape).astype(np.float32))
                       if lora.is_adapter_path(path) else x), params)


def flat(params) -> dict[str, object]:
  """{'/'-joined path: leaf}."""
  return {"/".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def names(params) -> set[str]:
  return set(flat(params))


def max_diff(a, b) -> float:
  return float(jnp.max(jnp.abs(a - b)))


# ---------------------------------------------------------------------------------------------
# 1. fresh adapters, split and combine
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan, num_classes", [(False, 0), (True, 3)])
def test_fresh_adapters_are_a_no_op(scan, num_classes):
  cfg = make(scan_layers=scan, num_classes=num_classes, lora_rank=4)
  base_cfg = dataclasses.replace(cfg, lora_rank=0)
  params = nn.unbox(jit(Transformer(cfg).init)(jax.random.key(7), tokens())["params"])
  adapters, base = split(params)
  np.testing.assert_array_equal(forward(cfg, params, tokens()), forward(base_cfg, base, tokens()))
  assert len(names(adapters)) == 2 * 6 * (1 if scan else 2)  # q k v out fc proj, a and b
  prefix = "layers" if scan else "layers_1"
  query = adapters[prefix]["attention"]["query"]
  assert float(jnp.std(query["lora_a"])) > 0.1  # std 1/sqrt(32) = 0.18
  assert not np.any(query["lora_b"])


def test_split_and_combine_are_inverse():
  cfg = make(lora_rank=4, lora_targets=("query", "down", "up"), mlp="swiglu")
  _, params = adapted(cfg)
  adapters, base = split(params)
  assert names(adapters) == {f"layers_{i}/{m}/lora_{x}" for i in (0, 1) for x in "ab"
                             for m in ("attention/query", "mlp/up", "mlp/down")}
  assert not any(lora.is_adapter_path(n) for n in names(base))
  assert names(adapters) | names(base) == names(params)
  combined = params_lib.combine(adapters, base)
  assert jax.tree.structure(combined) == jax.tree.structure(params)
  assert all(a is b for a, b in zip(jax.tree.leaves(combined), jax.tree.leaves(params)))
  with pytest.raises(ValueError, match="in both"):
    params_lib.combine(adapters, params)
  assert lora.is_adapter_path("layers/mlp/up/lora_b")
  assert lora.is_adapter_path(("layers_0", "attention", "out", "lora_a"))
  assert not lora.is_adapter_path("layers_0/attention/out/kernel")
  assert not lora.is_adapter_path("")


# ---------------------------------------------------------------------------------------------
# 2. merge
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("scan", [False, True])
def test_merge_reproduces_the_adapted_model(mlp, scan):
  # alpha / rank = 2: a merge that forgets the scale is off by the whole adapter.
  cfg = make(mlp=mlp, scan_layers=scan, lora_rank=4, lora_alpha=8.0)
  base, params = adapted(cfg)
  merged_cfg, merged = lora.merge(cfg, params)

  assert merged_cfg == dataclasses.replace(cfg, lora_rank=0)
  assert names(merged) == names(base)
  assert not split(merged)[0] and count_params(merged) == param_count(merged_cfg)
  adapted_logits = forward(cfg, params, tokens())
  base_logits = forward(merged_cfg, base, tokens())
  assert max_diff(adapted_logits, base_logits) > 0.1  # the adapters matter
  np.testing.assert_allclose(forward(merged_cfg, merged, tokens()), adapted_logits,
                             rtol=1e-5, atol=1e-5)
  # Only the adapted kernels change; biases, norms and embeddings are the same arrays.
  flat_params = flat(params)
  for name, leaf in flat(merged).items():
    if name.endswith("kernel"):
      assert max_diff(leaf, flat_params[name]) > 1e-3, name
    else:
      assert leaf is flat_params[name], name


def test_merge_one_kernel_by_hand_and_refusals():
  cfg = make(lora_rank=2, lora_alpha=6.0, lora_targets=("out",))
  _, params = adapted(cfg)
  _, merged = lora.merge(cfg, params)
  out = params["layers_1"]["attention"]["out"]  # kernel [heads, head_dim, embed]
  want = out["kernel"] + np.einsum("hdr,re->hde", out["lora_a"], out["lora_b"]) * 3.0
  np.testing.assert_allclose(merged["layers_1"]["attention"]["out"]["kernel"], want,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(merged["layers_1"]["attention"]["query"]["kernel"],
                                params["layers_1"]["attention"]["query"]["kernel"])

  with pytest.raises(LoraError, match="lora_rank=0"):
    lora.merge(dataclasses.replace(cfg, lora_rank=0), params)
  with pytest.raises(LoraError, match="rank 2 but model.lora_rank=4"):
    lora.merge(dataclasses.replace(cfg, lora_rank=4), params)
  with pytest.raises(LoraError, match="hold no lora_a"):
    lora.merge(cfg, split(params)[1])
  # A model without adapters merges to itself, also when its targets do not exist (swiglu
  # has no fc).
  for no_adapters in (dataclasses.replace(cfg, lora_rank=0),
                      make(mlp="swiglu", lora_rank=4, lora_targets=("fc",))):
    plain = random_params(no_adapters)
    assert not split(plain)[0]
    merged_cfg, merged = lora.merge(no_adapters, plain)
    assert merged_cfg == dataclasses.replace(no_adapters, lora_rank=0)
    assert all(a is b for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(plain)))


# ---------------------------------------------------------------------------------------------
# 3. counts
# ---------------------------------------------------------------------------------------------

# (mlp, targets, adapter params per layer at embed 32, mlp 64, rank 4), counted by hand:
# rank * (fan_in + fan_out) per Dense; q/k/v/out are 32 -> 32, fc/gate/up 32 -> 64.
PER_LAYER = [
    ("gelu", ("query", "value"), 2 * 4 * 64),
    ("gelu", config_lib.LORA_TARGETS, 4 * 4 * 64 + 2 * 4 * 96),
    ("swiglu", config_lib.LORA_TARGETS, 4 * 4 * 64 + 3 * 4 * 96),
    ("swiglu", ("out", "down", "fc"), 4 * 64 + 4 * 96),  # fc does not exist in swiglu
]


@pytest.mark.parametrize("num_classes", [0, 5])
@pytest.mark.parametrize("mlp, targets, per_layer", PER_LAYER)
def test_param_count_includes_adapters(mlp, targets, per_layer, num_classes):
  cfg = make(mlp=mlp, lora_rank=4, lora_targets=targets, num_classes=num_classes,
             scan_layers=num_classes > 0)
  params = abstract_params(cfg)
  assert lora_params_per_layer(cfg) == per_layer
  assert count_params(params) == param_count(cfg)
  adapters, base = split(params)
  assert count_params(adapters) == 2 * per_layer
  base_cfg = dataclasses.replace(cfg, lora_rank=0)
  assert count_params(base) == param_count(base_cfg)
  assert param_count(cfg) - param_count(base_cfg) == 2 * per_layer


# ---------------------------------------------------------------------------------------------
# 4. adapter files
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan", [False, True])
def test_save_load_round_trip(tmp_path, scan):
  cfg = make(scan_layers=scan, lora_rank=4, lora_alpha=8.0, lora_dropout=0.1,
             lora_targets=("query", "value", "fc"))
  base, params = adapted(cfg)
  path = str(tmp_path / "adapters.safetensors")
  lora.save_adapters(path, cfg, params)
  assert os.listdir(tmp_path) == ["adapters.safetensors"]  # no temporary file left behind

  saved_adapters = split(params)[0]
  with safetensors.safe_open(path, framework="numpy") as f:  # a plain safetensors file
    metadata = {k: json.loads(v) for k, v in f.metadata().items() if k != "format"}
    assert f.metadata()["format"] == lora.FORMAT
    tensors = {name: f.get_tensor(name) for name in f.keys()}
  assert metadata == {"rank": 4, "alpha": 8.0, "dropout": 0.1,
                      "targets": ["query", "value", "fc"], "scan_layers": scan}

  # The file holds the adapters bit for bit.
  assert set(tensors) == names(saved_adapters)
  for name, leaf in flat(saved_adapters).items():
    np.testing.assert_array_equal(tensors[name], leaf)
  del base


def test_adapter_files_refuse_bad_input(tmp_path):
  cfg = make(lora_rank=4, lora_targets=("query",))
  base, params = adapted(cfg)
  with pytest.raises(LoraError, match="hold no lora_a"):
    lora.save_adapters(str(tmp_path / "x.safetensors"), cfg, base)
  with pytest.raises(LoraError, match="rank 4 but model.lora_rank=8"):
    lora.save_adapters(str(tmp_path / "x.safetensors"), dataclasses.replace(cfg, lora_rank=8),
                       params)
  assert not os.listdir(tmp_path)  # refused before writing


# ---------------------------------------------------------------------------------------------
# 5. LoRA dropout
# ---------------------------------------------------------------------------------------------

def test_lora_dropout_only_in_training_and_only_on_the_adapter_input():
  cfg = make(lora_rank=4, lora_dropout=0.5)
  no_dropout = dataclasses.replace(cfg, lora_dropout=0.0)
  params = random_params(cfg)
  fresh_params = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if path[-1].key == "lora_b" else x, params)
  key1, key2 = jax.random.key(1), jax.random.key(2)

  deterministic = forward(cfg, params, tokens())
  np.testing.assert_array_equal(deterministic, forward(no_dropout, params, tokens()))
  train1 = forward(cfg, params, tokens(), False, key1)
  train2 = forward(cfg, params, tokens(), False, key2)
  assert max_diff(train1, deterministic) > 1e-2
  assert max_diff(train1, train2) > 1e-2
  np.testing.assert_array_equal(train1, forward(cfg, params, tokens(), False, key1))
  # model.dropout is 0, so training mode differs only through the adapters: with lora_b = 0
  # (fresh adapters) or lora_dropout = 0 it is the deterministic model.
  np.testing.assert_array_equal(forward(cfg, fresh_params, tokens(), False, key1),
                                forward(cfg, fresh_params, tokens()))
  np.testing.assert_array_equal(forward(no_dropout, params, tokens(), False, key1),
                                deterministic)


# ---------------------------------------------------------------------------------------------
# 6. sharded
# ---------------------------------------------------------------------------------------------

SHARDED_VALUES = {
    "model": {"num_layers": 2, "num_heads": 4, "embed_dim": 64, "mlp_dim": 128,
              "vocab_size": 128, "max_seq_len": 16, "positional": "learned", "lora_rank": 4,
              "lora_alpha": 8.0},
    "data": {"seq_len": 16, "stride": 16},
    "train": {"global_batch_size": 8},
    "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
}


def test_sharded_lora_forward_matches_one_device():
  config = config_lib.validate(SHARDED_VALUES)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
  steps = steps_lib.make_steps(config, mesh)
  fresh = jax.device_put(nn.unbox(jax.jit(Transformer(config.model).init)(
      jax.random.key(0), tokens())["params"]), steps.state_shardings.params)
  params = jax.device_put(randomize_adapters(fresh), steps.state_shardings.params)
  # Each adapter axis is split like the kernel axis it belongs to (embed: fsdp=2, heads and
  # mlp: tensor=2); the rank axis is never split.
  layer = params["layers_0"]
  shard_shapes = {
      "attention/query/lora_a": (32, 4),       # [embed, rank]
      "attention/query/lora_b": (4, 2, 16),    # [rank, heads, head_dim]
      "attention/out/lora_a": (2, 16, 4),      # [heads, head_dim, rank]
      "attention/out/lora_b": (4, 32),         # [rank, embed]
      "mlp/fc/lora_b": (4, 64),                # [rank, mlp]
      "mlp/proj/lora_a": (64, 4),              # [mlp, rank]
  }
  for name, want in shard_shapes.items():
    leaf = functools.reduce(lambda node, key: node[key], name.split("/"), layer)
    assert leaf.addressable_shards[0].data.shape == want, name
  assert params["layers_0"]["attention"]["query"]["lora_b"].sharding.spec[1] == "tensor"

  batch = random_batch(config)

  def loss(steps_, mesh_, params_):
    sums = steps_.eval(params_, sharding.global_batch(batch, mesh_))
    return float(sums["loss_sum"] / sums["weight_sum"])

  one_config = config_lib.replace(config, mesh={"data": 1, "fsdp": 1, "tensor": 1})
  one_mesh = sharding.make_mesh(one_config.mesh, jax.devices()[:1])
  one_steps = steps_lib.make_steps(one_config, one_mesh)
  host_params = jax.device_get(params)
  sharded_loss = loss(steps, mesh, params)
  assert sharded_loss == pytest.approx(loss(one_steps, one_mesh, host_params), rel=1e-5)
  fresh_loss = loss(one_steps, one_mesh, jax.device_get(fresh))
  assert abs(sharded_loss - fresh_loss) > 1e-2  # the random adapters change the loss

  # merge keeps each leaf's sharding (and merge's numbers on the mesh).
  _, merged = lora.merge(config.model, params)
  _, host_merged = lora.merge(config.model, host_params)
  want_shardings = flat(steps.state_shardings.params)
  for name, leaf in flat(merged).items():
    assert leaf.sharding.is_equivalent_to(want_shardings[name], leaf.ndim), name
    np.testing.assert_allclose(leaf, flat(host_merged)[name], rtol=1e-6, atol=1e-6)


def test_lora_on_grouped_query_attention_shards_the_kv_heads_and_matches_one_device():
  """Adapters of a 4-head model with 2 kv heads on data 2 x fsdp 2 x tensor 2: the key and
  value adapters' kv-head axis splits over the tensor axis like their kernels'; the loss equals
  one device's."""
  config = config_lib.validate(dict(SHARDED_VALUES, model=dict(
      SHARDED_VALUES["model"], num_kv_heads=2, positional="rope", qk_norm=True)))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
  steps = steps_lib.make_steps(config, mesh)
  params = jax.device_put(randomize_adapters(nn.unbox(jax.jit(Transformer(config.model).init)(
      jax.random.key(0), tokens())["params"])), steps.state_shardings.params)
  key = params["layers_0"]["attention"]["key"]
  assert key["kernel"].shape == (64, 2, 16) and key["lora_b"].shape == (4, 2, 16)
  assert key["lora_b"].addressable_shards[0].data.shape == (4, 1, 16)  # [rank, kv_heads, dim]
  batch = random_batch(config)
  one_config = config_lib.replace(config, mesh={"data": 1, "fsdp": 1, "tensor": 1})
  one_mesh = sharding.make_mesh(one_config.mesh, jax.devices()[:1])
  one_steps = steps_lib.make_steps(one_config, one_mesh)
  losses = [float(s["loss_sum"] / s["weight_sum"]) for s in (
      steps.eval(params, sharding.global_batch(batch, mesh)),
      one_steps.eval(jax.device_get(params), sharding.global_batch(batch, one_mesh)))]
  assert losses[0] == pytest.approx(losses[1], rel=1e-5)

