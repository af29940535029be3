"""optim.name (jaxlm/optimizers/): AdamW, Muon, Adafactor and Lion each learn, give one
device's numbers on a data x fsdp x tensor mesh with their state sharded like the params;
Muon sees the attention kernels as the matrices they multiply by; parameter groups'
learning-rate multipliers and weight decay; a checkpoint of one optimizer is refused by another."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import optim
from jaxlm import run as run_lib
from jaxlm.optimizers import muon
from tests.helpers import run_steps

TINY = {"model": {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 32,
                  "mlp_dim": 64, "vocab_size": 64, "max_seq_len": 16, "positional": "rope",
                  "norm": "rmsnorm", "mlp": "swiglu", "use_bias": False},
        "data": {"seq_len": 16, "stride": 16},
        "train": {"global_batch_size": 8, "num_steps": 40},
        "optim": {"warmup_steps": 2}}
# A learning rate for each that memorizes 8 rows in 40 steps (final losses measured 0.48,
# 0.63, 0.58, 0.28 of 4.18; Lion at 1e-3 / 3e-3 only reached 3.47 / 2.35 on this tiny model).
RATES = {"adamw": 1e-2, "muon": 2e-2, "adafactor": 1e-2, "lion": 1e-2}


def config_for(name, mesh=None, **optim_values):
  values = {k: dict(v) for k, v in TINY.items()}
  values["optim"].update(name=name, learning_rate=RATES[name], **optim_values)
  values["mesh"] = mesh or {"data": 1}
  return config_lib.validate(values)


def fixed_batch(config, step):
  """The same 8 rows every step: a model memorizes them, so every optimizer must cut the loss."""
  del step
  rng = np.random.default_rng(0)
  shape = (config.train.global_batch_size, config.data.seq_len)
  tokens = rng.integers(0, config.model.vocab_size, size=(shape[0], shape[1] + 1))
  return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
          "weights": np.ones(shape, np.float32), "segment_ids": np.ones(shape, np.int32),
          "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()}


@pytest.mark.parametrize("name", config_lib.OPTIMIZERS)
def test_each_optimizer_learns(name):
  """40 steps on 8 fixed rows: the loss falls to a third (from ln 64 = 4.16)."""
  _, losses = run_steps(config_for(name), 40, batch=fixed_batch)
  assert losses[-1] < losses[0] / 3, (name, losses[0], losses[-1])


# AdamW, the default, runs on every mesh in test_sharding.py, and Lion keeps one moment shaped
# like each parameter, as AdamW does; Muon's state is an optax.partition of two optimizers',
# Adafactor's partly factored statistics.
@pytest.mark.parametrize("name", ["muon", "adafactor"])
def test_optimizer_state_is_sharded_like_the_params_and_matches_one_device(name):
  """The first 3 steps on data 2 x fsdp 2 x tensor 2 give one device's losses and parameters;
  every optimizer-state array shaped like a parameter is sharded like it (fsdp/tensor)."""
  want_state, want = run_steps(config_for(name), 3, batch=fixed_batch)
  state, got = run_steps(config_for(name, {"data": 2, "fsdp": 2, "tensor": 2}), 3,
                         jax.devices()[:8], batch=fixed_batch)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, atol=2e-5)
  specs = {np.shape(p): p.sharding.spec for p in jax.tree.leaves(state.params)}
  same_shape = [(x.shape, x.sharding.spec) for x in jax.tree.leaves(state.opt_state)
                if np.ndim(x) and x.shape in specs]
  assert same_shape and all(spec == specs[shape] for shape, spec in same_shape), name


@pytest.mark.parametrize("scanned", [False, True])
def test_muon_orthogonalizes_each_attention_kernel_as_one_matrix(scanned):
  """A query kernel [embed, heads, head_dim] is one [embed, heads x head_dim] matrix to Muon
  (per layer when scanned): its first update has near-equal singular values (Newton-Schulz
  orthogonalization, x the width factor), which it would not have, orthogonalized per head;
  the embeddings, norms and head go to AdamW."""
  params = {"layers_0": {"attention": {"query": {"kernel": jnp.zeros((32, 4, 8))},
                                       "out": {"kernel": jnp.zeros((4, 8, 32))}},
                         "mlp": {"up": {"kernel": jnp.zeros((32, 64))}},
                         "attention_norm": {"scale": jnp.zeros(32)}},
            "token_embed": jnp.zeros((64, 32)), "lm_head": jnp.zeros((32, 64))}
  if scanned:
    params = {"layers": jax.tree.map(lambda x: jnp.stack([x, x]), params["layers_0"]),
              "token_embed": params["token_embed"], "lm_head": params["lm_head"]}
  labels = muon.labels(params)
  layer = labels["layers" if scanned else "layers_0"]
  assert layer["attention"]["query"]["kernel"] == layer["attention"]["out"]["kernel"] == "muon"
  assert layer["mlp"]["up"]["kernel"] == "muon" and layer["attention_norm"]["scale"] == "adam"
  assert labels["token_embed"] == labels["lm_head"] == "adam"
  # optim.muon_groups: the token table [vocab, embed] and the head [embed, vocab] may join.
  wider = muon.labels(params, frozenset({"matrices", "embed", "head"}))
  assert wider["token_embed"] == wider["lm_head"] == "muon"
  assert wider["layers" if scanned else "layers_0"]["attention_norm"]["scale"] == "adam"

  config = config_lib.validate({"optim": {"name": "muon", "learning_rate": 1.0,
                                          "warmup_steps": 0, "schedule": "constant",
                                          "weight_decay": 0.0, "grad_clip": 0.0}})
  transform = optim.make_optimizer(config.optim, 10)
  grads = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(x.size).normal(
      size=x.shape), jnp.float32), params)
  updates, _ = transform.update(grads, transform.init(params), params)
  query = updates["layers" if scanned else "layers_0"]["attention"]["query"]["kernel"]
  for matrix in np.asarray(query).reshape(-1, 32, 32):  # [embed, heads x head_dim] per layer
    singular = np.linalg.svd(matrix, compute_uv=False)
    # Newton-Schulz (Muon's quintic) lands singular values in roughly [0.7, 1.2].
    assert 0.5 < singular.min() and singular.max() < 1.5, singular

  # With optim.muon_groups=matrices,embed,head the tables are orthogonalized too, as
  # [vocab, embed] and [embed, vocab] maps (x the width factor sqrt(max(1, out / in))).
  wide = config_lib.validate({"optim": {**config.optim.__dict__,
                                        "muon_groups": "matrices,embed,head"}})
  transform = optim.make_optimizer(wide.optim, 10)
  updates, _ = transform.update(grads, transform.init(params), params)
  for name, factor in (("token_embed", 1.0), ("lm_head", 2 ** 0.5)):
    singular = np.linalg.svd(np.asarray(updates[name]) / factor, compute_uv=False)
    assert 0.5 < singular.min() and singular.max() < 1.5, (name, singular)


def test_group_learning_rate_multipliers_and_weight_decay():
  """optim.lr_multipliers='embed=0' freezes the token table; weight decay applies to the named
  groups only (a zero gradient still moves decaying matrices, never norm scales)."""
  config = config_for("adamw", lr_multipliers="embed=0")
  trained, _ = run_steps(config, 2, batch=fixed_batch)
  start, _ = run_steps(config, 0, batch=fixed_batch)
  np.testing.assert_array_equal(trained.params["token_embed"], start.params["token_embed"])
  assert np.abs(np.asarray(trained.params["layers_0"]["mlp"]["up"]["kernel"])
                - np.asarray(start.params["layers_0"]["mlp"]["up"]["kernel"])).max() > 1e-4

  groups = optim.ParamGroups(config_lib.validate(
      {"optim": {"weight_decay_groups": "matrices"}}).optim)
  params = {"layers_0": {"mlp": {"up": {"kernel": jnp.ones((4, 4))}},
                         "mlp_norm": {"scale": jnp.ones(4)}},
            "token_embed": jnp.ones((8, 4)), "classifier": {"bias": jnp.ones(2)}}
  assert groups.labels(params) == {
      "layers_0": {"mlp": {"up": {"kernel": "matrices"}}, "mlp_norm": {"scale": "vectors"}},
      "token_embed": "embed", "classifier": {"bias": "vectors"}}
  assert groups.decays(params) == {
      "layers_0": {"mlp": {"up": {"kernel": True}}, "mlp_norm": {"scale": False}},
      "token_embed": False, "classifier": {"bias": False}}


@pytest.mark.parametrize("values, message", [
    ({"lr_multipliers": "embeddings=0.5"}, r"optim.lr_multipliers='embeddings=0.5': "
                                           r"'embeddings' is not a parameter group; use embed"),
    ({"lr_multipliers": "head=fast"}, r"'head=fast' needs a number >= 0"),
    ({"weight_decay_groups": "matrices,norms"}, r"optim.weight_decay_groups=.*'norms' is not"),
    ({"name": "sgd"}, r"optim.name='sgd'"),
    ({"muon_beta": 1.0}, r"optim.muon_beta"),
    ({"muon_ns_steps": 0}, r"optim.muon_ns_steps"),
    ({"muon_groups": "matrices,vectors"},
     r"optim.muon_groups='matrices,vectors': Muon takes matrices and optionally embed and head, "
     r"not vectors"),
    ({"muon_groups": "embed"}, r"optim.muon_groups='embed': .* lacks matrices"),
])
def test_bad_optimizer_settings_are_one_line(values, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate({"optim": values})


def test_a_checkpoint_of_one_optimizer_is_refused_by_another():
  saved = config_lib.to_dict(config_for("adamw"))
  assert run_lib.incompatible_keys(saved, config_lib.to_dict(config_for("muon"))) == [
      "optim.name"]
  assert run_lib.incompatible_keys(saved, config_lib.to_dict(config_for("adamw"))) == []
  adafactor = config_lib.to_dict(config_for("adafactor"))
  assert run_lib.incompatible_keys(adafactor, config_lib.to_dict(
      config_for("adafactor", adafactor_momentum=0.9))) == ["optim.adafactor_momentum"]
