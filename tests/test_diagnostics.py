"""Per-layer statistics (jaxlm/diagnostics.py, train.layer_stats_every): their values against
numpy and the plain forward pass, scanned layers equal to unscanned ones, and the step
computing them exactly at the steps that report them and at spikes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import diagnostics, sharding
from jaxlm import steps as steps_lib
from jaxlm.model import Transformer, attention_logit_max, stack_layers
from tests.conftest import random_params
from tests.helpers import pattern_batch, step_config

MODEL = {"num_layers": 2, "num_heads": 2, "embed_dim": 32, "mlp_dim": 64, "vocab_size": 64,
         "max_seq_len": 16}


def lm_config(**model):
  return config_lib.validate({"model": dict(MODEL, **model), "data": {"seq_len": 16},
                              "train": {"global_batch_size": 4, "loss_chunk_size": 8}})


def test_stats_match_numpy_and_the_plain_forward_and_scanning_changes_nothing():
  config = lm_config()
  params = random_params(config.model)
  grads = jax.tree.map(lambda p: 0.5 * p, params)
  updates = jax.tree.map(lambda p: -0.01 * p, params)
  batch = {k: jnp.asarray(v) for k, v in pattern_batch(-1).items()}
  batch["weights"] = batch["weights"].at[:, :3].set(0.0)  # the largest logit skips these
  stats = jax.jit(lambda p, g, u: diagnostics.layer_stats(
      Transformer(config.model), config, p, batch, g, u))(params, grads, updates)

  layer_0 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params["layers_0"])])
  assert float(stats["param_rms/layer_0"]) == pytest.approx(np.sqrt(np.mean(layer_0**2)), 1e-5)
  assert float(stats["grad_rms/layer_0"]) == pytest.approx(0.5 * np.sqrt(np.mean(layer_0**2)),
                                                           1e-5)
  logits = Transformer(config.model).apply({"params": params}, batch["inputs"],
                                           positions=batch["positions"],
                                           segment_ids=batch["segment_ids"])
  assert float(stats["max_logit"]) == pytest.approx(float(jnp.max(logits[:, 3:])), 1e-5)
  assert sorted(k for k in stats if k.startswith("attention_logit_max/")) == [
      "attention_logit_max/layer_0", "attention_logit_max/layer_1"]
  assert {k.split("/")[1] for k in stats if k.startswith("param_rms/")} == {
      "token_embed", "layer_0", "layer_1", "final_norm"}

  scanned = lm_config(scan_layers=True)
  scanned_stats = jax.jit(lambda p, g, u: diagnostics.layer_stats(
      Transformer(scanned.model), scanned, p, batch, g, u))(
          stack_layers(params), stack_layers(grads), stack_layers(updates))
  assert sorted(scanned_stats) == sorted(stats)
  for name, value in stats.items():
    assert float(scanned_stats[name]) == pytest.approx(float(value), rel=1e-5), name


def test_attention_logit_max_in_query_chunks_equals_the_whole_score_matrix():
  rng = np.random.default_rng(0)
  query, key = (jnp.asarray(rng.normal(size=(2, 256, 3, 8)), jnp.float32) for _ in range(2))
  mask = jnp.asarray(rng.random((2, 1, 256, 256)) < 0.3)
  scores = np.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(8)
  want = np.max(np.where(np.broadcast_to(mask, scores.shape), scores, -np.inf))
  assert float(attention_logit_max(query, key, mask)) == pytest.approx(want, rel=1e-6)
  assert float(attention_logit_max(query, key, mask, query_chunk=256)) == pytest.approx(
      want, rel=1e-6)


def test_the_step_computes_them_at_due_steps_and_at_spikes_only():
  config = step_config("skip", layer_stats_every=3)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  steps = steps_lib.make_steps(config, mesh)
  state = steps.init(jax.random.PRNGKey(0))
  clean = sharding.global_batch(pattern_batch(-1), mesh)
  computed = []
  for _ in range(9):
    state, metrics = steps.train(state, clean)
    computed.append(float(metrics["layer_stats"]["param_rms/layer_0"]) > 0)
  assert computed == [False, False, True] * 3  # steps 3, 6, 9
  state, metrics = steps.train(state, sharding.global_batch(pattern_batch(60), mesh))
  assert int(metrics["spike"]) == 1 and float(metrics["layer_stats"]["grad_rms/layer_0"]) > 0
  assert all(np.isfinite(v) for v in jax.device_get(metrics["layer_stats"]).values())
