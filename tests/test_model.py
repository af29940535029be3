"""Tests for jaxlm/model.py: numbers, not shapes.

A tiny model (2 layers, 32 dims) with random parameters larger than a fresh init's, so logits
are O(1) and attention is far from uniform: a masking or caching bug then moves the logits far
past the 1e-5 tolerances used below.
"""

import dataclasses
import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import optim as optim_lib
from jaxlm.config import ModelConfig
from jaxlm.model import Transformer
from tests.conftest import random_params as unboxed_random_params

BASE = ModelConfig(num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64, vocab_size=61,
                   max_seq_len=16, positional="learned")
BATCH, LENGTH = 2, 12
# XLA CPU compilation dominates this file's runtime; backend optimization level 0 compiles ~40%
# faster and does not change what is tested.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
ONES = jnp.ones((BATCH, LENGTH), jnp.int32)
# Boxed: these tests read the params' logical axes too.
random_params = functools.partial(unboxed_random_params, boxed=True)
ARANGE = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), (BATCH, LENGTH))


def make(**overrides) -> ModelConfig:
  return dataclasses.replace(BASE, **overrides)


def random_tokens(seed: int = 0, shape=(BATCH, LENGTH), vocab: int = BASE.vocab_size):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def random_normal(seed: int, shape, dtype=jnp.float32):
  # numpy, not jax.random: each new shape would compile another threefry program.
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def cross_entropy(logits, targets):
  logprobs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logprobs, targets[..., None], axis=-1))


# Jitted entry points with the config static: tests that use the same config and shapes share
# one compilation.
@functools.partial(jit, static_argnums=0)
def forward(cfg, params, tokens, positions, segment_ids):
  return Transformer(cfg).apply({"params": params}, tokens, positions=positions,
                                segment_ids=segment_ids)


@functools.partial(jit, static_argnums=0)
def decode_step(cfg, params, cache, tokens, positions, segment_ids):
  logits, variables = Transformer(cfg).apply(
      {"params": params, "cache": cache}, tokens, positions=positions, segment_ids=segment_ids,
      decode=True, mutable=["cache"])
  return logits, variables["cache"]


def assert_trees_close(a, b, atol, msg=""):
  a, b = nn.unbox(a), nn.unbox(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=msg + jax.tree_util.keystr(path))


# --- attention ------------------------------------------------------------------------------

@jit
def reference_and_jax_attention(q, k, v, segments):
  """Pairs (ours, jax.nn.dot_product_attention) for: causal, causal + segments, and a decode
  shape (3 queries at slots 5..7 against 10 cache slots). One jit: one compile."""
  slots = jnp.arange(q.shape[1])
  causal = model_lib.causal_mask(slots, slots)
  same_segment = model_lib.segment_mask(segments, segments)
  decode_mask = model_lib.causal_mask(5 + jnp.arange(3), slots)
  return [
      (model_lib.reference_attention(q, k, v, causal),
       jax.nn.dot_product_attention(q, k, v, is_causal=True)),
      (model_lib.reference_attention(q, k, v, causal & same_segment),
       jax.nn.dot_product_attention(q, k, v, mask=same_segment, is_causal=True)),
      (model_lib.reference_attention(q[:, 5:8], k, v, decode_mask),
       jax.nn.dot_product_attention(q[:, 5:8], k, v, mask=decode_mask)),
  ]


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_reference_attention_matches_jax(dtype, atol):
  q, k, v = (random_normal(i, (2, 10, 4, 16), dtype) * 2 for i in range(3))
  segments = jnp.array([[1] * 4 + [2] * 6, [1] * 10])
  for ours, theirs in reference_and_jax_attention(q, k, v, segments):
    assert ours.dtype == dtype
    np.testing.assert_allclose(ours.astype(jnp.float32), theirs.astype(jnp.float32), atol=atol)


def test_reference_attention_matches_numpy_loop():
  """An independent per-head, per-query loop, so the reference is not only checked against jax."""
  q, k, v = (np.random.default_rng(i).normal(size=(1, 5, 2, 8)) for i in range(3))
  ours = np.asarray(jit(model_lib.reference_attention)(
      q, k, v, model_lib.causal_mask(jnp.arange(5), jnp.arange(5))))
  for h in range(2):
    for t in range(5):
      scores = k[0, :t + 1, h] @ q[0, t, h] / np.sqrt(8)
      probs = np.exp(scores - scores.max())
      probs /= probs.sum()
      np.testing.assert_allclose(ours[0, t, h], probs @ v[0, :t + 1, h], atol=1e-5)


def test_rope_depends_on_relative_position_only():
  q, k = (random_normal(i, (1, 1, 2, 16)) for i in range(2))

  @jit
  def score(pq, pk):
    rq = model_lib.apply_rope(q, jnp.full((1, 1), pq), 10000.0)
    rk = model_lib.apply_rope(k, jnp.full((1, 1), pk), 10000.0)
    return jnp.sum(rq * rk, axis=-1)

  np.testing.assert_allclose(score(7, 3), score(107, 103), rtol=1e-4)
  assert np.abs(score(7, 3) - score(7, 5)).max() > 1e-3
  rotated = jit(model_lib.apply_rope)(q, jnp.full((1, 1), 11), 10000.0)
  np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(q, axis=-1),
                             rtol=1e-5)


# --- the model: masking ---------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [make(positional="rope"), make(attention_impl="xla")],
                         ids=["reference-rope", "xla-learned"])
def test_causality_and_packed_documents(cfg):
  """Each row packs document A (5 tokens) then B (7 tokens), positions restarting at B."""
  params = random_params(cfg)
  tokens = random_tokens()
  a, b = tokens[:, :5], tokens[:, 5:]
  packed_segments = jnp.array([[1] * 5 + [2] * 7] * BATCH, jnp.int32)
  packed_positions = jnp.array([list(range(5)) + list(range(7))] * BATCH, jnp.int32)
  packed = forward(cfg, params, tokens, packed_positions, packed_segments)

  # Causality, in one unpacked sequence: changing tokens 7.. leaves logits 0..6 unchanged.
  plain = forward(cfg, params, tokens, ARANGE, ONES)
  changed = forward(cfg, params, tokens.at[:, 7:].set((tokens[:, 7:] + 1) % cfg.vocab_size),
                    ARANGE, ONES)
  np.testing.assert_allclose(plain[:, :7], changed[:, :7], atol=1e-6)
  assert np.abs(plain[:, 7:] - changed[:, 7:]).max() > 0.1  # ... and the future does change

  # RoPE sees only relative positions: shifting all positions changes nothing (this fails if
  # either q or k misses its rotation); learned positions do change the logits.
  shifted = forward(cfg, params, tokens, ARANGE + 3, ONES)
  if cfg.positional == "rope":
    np.testing.assert_allclose(shifted, plain, atol=1e-5)
  else:
    assert np.abs(shifted - plain).max() > 0.1

  # Packed A equals A alone (the start of the unpacked sequence).
  np.testing.assert_allclose(packed[:, :5], plain[:, :5], atol=1e-5)
  # Packed B equals B alone: B placed first in another sequence (then A, packed after it).
  swapped_positions = jnp.array([list(range(7)) + list(range(5))] * BATCH, jnp.int32)
  swapped_segments = jnp.array([[1] * 7 + [2] * 5] * BATCH, jnp.int32)
  swapped = forward(cfg, params, jnp.concatenate([b, a], axis=1), swapped_positions,
                    swapped_segments)
  np.testing.assert_allclose(packed[:, 5:], swapped[:, :7], atol=1e-5)
  # And packing really isolates B from A: without segment ids B's logits differ.
  assert np.abs(packed[:, 5:] - plain[:, 5:]).max() > 0.1


# --- scan and remat -------------------------------------------------------------------------

def loss_fn(cfg, params, tokens, positions, segment_ids):
  logits = Transformer(cfg).apply({"params": params}, tokens, positions=positions,
                                  segment_ids=segment_ids)
  return cross_entropy(logits, jnp.roll(tokens, -1, axis=1)), logits


VARIANTS = [(False, policy, 1) for policy in config_lib.REMAT_POLICIES] + [
    (True, "none", 1), (True, "full", 1), (True, "none", BASE.num_layers)]  # (scan, remat, unroll)


def test_scan_and_remat_match_plain_model():
  """Every remat policy, and scan with and without remat: same loss, logits and gradients.

  All variants live in one jitted function: one XLA compilation instead of eight.
  """
  cfg = make(positional="rope")
  params = nn.unbox(random_params(cfg))
  tokens = random_tokens()
  segment_ids = jnp.array([[1] * 5 + [2] * 7, [1] * 12], jnp.int32)
  positions = jnp.array([list(range(5)) + list(range(7)), list(range(12))], jnp.int32)

  @jit
  def all_variants(params):
    results = []
    for scan, policy, unroll in VARIANTS:
      variant = dataclasses.replace(cfg, scan_layers=scan, remat_policy=policy,
                                    scan_unroll=unroll)
      variant_params = model_lib.stack_layers(params) if scan else params
      (loss, logits), grads = jax.value_and_grad(
          functools.partial(loss_fn, variant), has_aux=True)(
              variant_params, tokens, positions, segment_ids)
      results.append((loss, logits, model_lib.unstack_layers(grads) if scan else grads))
    return results

  results = all_variants(params)
  loss, logits, grads = results[0]  # (False, 'none'): the plain model
  assert VARIANTS[0] == (False, "none", 1)
  for (scan, policy, unroll), (other_loss, other_logits, other_grads) in zip(
      VARIANTS[1:], results[1:]):
    msg = f"scan={scan} remat_policy={policy} unroll={unroll}: "
    np.testing.assert_allclose(loss, other_loss, atol=1e-6, err_msg=msg)
    np.testing.assert_allclose(logits, other_logits, atol=1e-5, err_msg=msg)
    assert_trees_close(grads, other_grads, atol=1e-5, msg=msg)


def test_stack_and_unstack_layers():
  params = random_params(BASE)
  stacked = model_lib.stack_layers(params)
  kernel = stacked["layers"]["attention"]["query"]["kernel"]
  assert kernel.names == ("layers", "embed", "heads", "head_dim")
  np.testing.assert_array_equal(kernel.value[1],
                                params["layers_1"]["attention"]["query"]["kernel"].value)
  scanned_shapes = jax.eval_shape(
      lambda: Transformer(make(scan_layers=True)).init(jax.random.key(0), ONES)["params"])
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(stacked)) ==
          jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(scanned_shapes)))
  assert nn.get_partition_spec(stacked) == nn.get_partition_spec(scanned_shapes)
  unstacked = model_lib.unstack_layers(stacked)
  assert jax.tree.structure(unstacked) == jax.tree.structure(params)
  assert_trees_close(unstacked, params, atol=0)
  # Plain arrays work too (checkpoint conversion, gradients).
  assert_trees_close(model_lib.stack_layers(nn.unbox(params)), stacked, atol=0)


def residual_bytes(cfg, params):
  """Bytes that the backward pass keeps from the forward pass (traced, not compiled)."""
  tokens = random_tokens()
  loss = lambda p: loss_fn(cfg, p, tokens, ARANGE, ONES)[0]
  vjp_fn = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp_fn))


def test_remat_policies_save_what_they_say():
  params = nn.unbox(random_params(BASE))
  saved = {policy: residual_bytes(make(remat_policy=policy), params)
           for policy in config_lib.REMAT_POLICIES}
  assert (saved["full"] < saved["save_attention_out"] < saved["minimal"]
          < saved["dots_saveable"] <= saved["none"]), saved
  assert saved["dots_with_no_batch_dims_saveable"] < saved["dots_saveable"], saved


# --- KV cache -------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    make(positional="learned"), make(positional="sinusoidal"), make(positional="rope"),
    make(positional="none"), make(positional="learned", scan_layers=True),
    make(positional="rope", attention_impl="xla"),
    make(positional="rope", num_kv_heads=2, qk_norm=True, sliding_window=4),
    make(positional="rope", num_kv_heads=1, sliding_window=3, attention_impl="xla"),
    make(positional="rope", num_kv_heads=2, sliding_window=4, window_layers="0"),
    make(positional="rope", num_kv_heads=2, sliding_window=4, window_layers="0",
         scan_layers=True, attention_impl="xla"),
    make(positional="rope", num_kv_heads=2, x0_skip=True, value_embed=True, scan_layers=True),
    make(positional="rope", num_kv_heads=2, sliding_window=4, prefix_length=3, scan_layers=True,
         attention_impl="xla")],
    ids=["learned", "sinusoidal", "rope", "none", "learned-scan", "rope-xla", "gqa-window",
         "mqa-window-xla", "window-on-layer-0", "window-on-layer-0-scan-xla", "skips-gqa-scan",
         "prefix-gqa-window-scan-xla"])
def test_cached_decoding_matches_full_forward(cfg):
  """Prefill 5 tokens, then 7 one-token steps == one forward pass over all 12.

  No segment ids: decoding defaults them to 1 (the left-padding test passes them)."""
  params = random_params(cfg)
  tokens = random_tokens()
  # The expected logits come from the unscanned reference model (shares its compilation with
  # other tests, and checks scan / xla against it on the way).
  plain = dataclasses.replace(cfg, scan_layers=False, attention_impl="reference")
  plain_params = model_lib.unstack_layers(params) if cfg.scan_layers else params
  full = forward(plain, plain_params, tokens, ARANGE, ONES)

  cache = model_lib.init_cache(cfg, BATCH, cfg.max_seq_len)
  prefill = 5
  logits, cache = decode_step(cfg, params, cache, tokens[:, :prefill], ARANGE[:, :prefill],
                              None)
  outputs = [logits]
  for t in range(prefill, LENGTH):
    logits, cache = decode_step(cfg, params, cache, tokens[:, t:t + 1], ARANGE[:, t:t + 1],
                                None)
    outputs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=1e-5)
  attention_cache = nn.unbox(cache)["layers" if cfg.scan_layers else "layers_1"]["attention"]
  np.testing.assert_array_equal(attention_cache["cache_index"], LENGTH)
  # A sliding window keeps a ring of `window` slots (of the 16 the cache was made for), in the
  # layers that have it (model.window_layers; scanned layers that differ share the full cache).
  for layer in range(cfg.num_layers if not cfg.scan_layers else 0):
    slots = cfg.layer_window(layer) or cfg.max_seq_len
    layer_cache = nn.unbox(cache)[f"layers_{layer}"]["attention"]["cached_key"]
    assert layer_cache.shape == (BATCH, slots, cfg.kv_heads, cfg.head_dim), layer
  slots = cfg.layer_window(1) or cfg.max_seq_len
  assert attention_cache["cached_key"].shape[-4:] == (BATCH, slots, cfg.kv_heads, cfg.head_dim)


def test_cached_decoding_with_left_padding():
  """Row 1 holds a 3-token prompt left-padded to 5 (segment 0), its positions starting at 0.

  The prompt passes segment ids; the steps do not (they default to 1, so never see padding)."""
  cfg = make(positional="rope")
  params = random_params(cfg)
  tokens = random_tokens()
  pad, prompt = 2, 5
  segment_ids = jnp.array([[1] * prompt, [0] * pad + [1] * (prompt - pad)], jnp.int32)
  positions = jnp.array([list(range(prompt)), [0] * pad + list(range(prompt - pad))], jnp.int32)

  cache = model_lib.init_cache(cfg, BATCH, cfg.max_seq_len)
  logits, cache = decode_step(cfg, params, cache, tokens[:, :prompt], positions, segment_ids)
  outputs = [logits]
  for t in range(prompt, LENGTH):
    step_positions = jnp.array([[t], [t - pad]], jnp.int32)
    logits, cache = decode_step(cfg, params, cache, tokens[:, t:t + 1], step_positions, None)
    outputs.append(logits)
  decoded = jnp.concatenate(outputs, axis=1)

  # The same rows without padding (row 1 shifted left, any filler after it: causal).
  unpadded = tokens.at[1].set(jnp.roll(tokens[1], -pad))
  full = forward(cfg, params, unpadded, ARANGE, ONES)
  np.testing.assert_allclose(decoded[0], full[0], atol=1e-5)
  np.testing.assert_allclose(decoded[1, pad:], full[1, :LENGTH - pad], atol=1e-5)


def test_init_cache_matches_model_init():
  cfg = make(scan_layers=True)
  tokens = jnp.zeros((3, 9), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(9), (3, 9))
  from_init = jax.eval_shape(lambda: Transformer(cfg).init(
      jax.random.key(0), tokens, positions=positions, decode=True)["cache"])
  cache = model_lib.init_cache(cfg, 3, 9)
  describe = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(tree))
  assert describe(cache) == describe(from_init)
  assert nn.get_partition_spec(cache) == nn.get_partition_spec(from_init)
  assert cache["layers"]["attention"]["cached_key"].names == (
      "layers", "batch", "length", "kv_heads", "head_dim")
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(nn.unbox(cache)))
  bf16 = nn.unbox(model_lib.init_cache(cfg, 3, 9, dtype=jnp.bfloat16))["layers"]["attention"]
  assert bf16["cached_value"].dtype == jnp.bfloat16
  assert bf16["cache_index"].dtype == jnp.int32


def test_decode_requires_positions():
  with pytest.raises(ValueError, match="positions"):
    jax.eval_shape(lambda: Transformer(BASE).init(jax.random.key(0), ONES, decode=True))


# --- dropout, dtype, init -------------------------------------------------------------------

@functools.partial(jit, static_argnums=0)
def dropout_outputs(cfg, params, tokens, key, other_key):
  """Logits with dropout from `key` and `other_key`, deterministic=True (with `key`), and the
  xla attention path with dropout from `key`: one program, one compile."""
  apply = lambda cfg, deterministic, key: Transformer(cfg).apply(
      {"params": params}, tokens, deterministic=deterministic, rngs={"dropout": key})
  xla = dataclasses.replace(cfg, attention_impl="xla")
  return (apply(cfg, False, key), apply(cfg, False, other_key), apply(cfg, True, key),
          apply(xla, False, key))


@pytest.mark.parametrize("scan", [False, True])
def test_dropout(scan):
  cfg = make(dropout=0.2, scan_layers=scan)
  params = random_params(cfg)
  tokens = random_tokens()
  k1, k2 = jax.random.key(10), jax.random.key(11)
  a, c, deterministic, xla = dropout_outputs(cfg, params, tokens, k1, k2)
  again = dropout_outputs(cfg, params, tokens, k1, k2)[0]
  np.testing.assert_array_equal(a, again)  # reproducible from the key
  assert np.abs(a - c).max() > 0.1
  # deterministic=True ignores the rng: the same logits as the model without dropout.
  no_dropout = forward(dataclasses.replace(cfg, dropout=0.0), params, tokens, ARANGE, ONES)
  np.testing.assert_allclose(deterministic, no_dropout, atol=1e-5)
  assert np.abs(a - no_dropout).max() > 0.1
  # The xla path has no attention-probability dropout; the other dropout masks are the same.
  assert np.abs(a - xla).max() > 1e-3


def test_bfloat16_compute_close_to_float32():
  cfg = make(positional="learned")
  params = random_params(cfg)
  tokens = random_tokens()
  f32 = forward(cfg, params, tokens, ARANGE, ONES)
  bf16 = forward(dataclasses.replace(cfg, dtype="bfloat16"), params, tokens, ARANGE, ONES)
  assert bf16.dtype == jnp.float32  # logits stay float32
  assert np.abs(f32 - bf16).max() < 0.05 * np.abs(f32).max()


def test_init():
  """GPT-2 init: N(0, init_std), residual projections / sqrt(2 * layers), zero biases, unit
  scales; float32 params; scanned layers get different values (params rng split per layer)."""
  cfg = make(embed_dim=64, mlp_dim=256, max_seq_len=64, scan_layers=True, init_std=0.02)
  # The 'rbg' PRNG compiles much faster than threefry; the initializers are what is tested.
  params = jit(Transformer(cfg).init)(jax.random.key(0, impl="rbg"), ONES)["params"]
  assert params["layers"]["mlp"]["fc"]["kernel"].names == ("layers", "embed", "mlp")
  params = nn.unbox(params)
  layers = params["layers"]
  std = lambda x: float(np.std(np.asarray(x)))
  residual_std = 0.02 / np.sqrt(2 * cfg.num_layers)
  np.testing.assert_allclose(std(params["token_embed"]), 0.02, rtol=0.05)
  np.testing.assert_allclose(std(params["position_embed"]), 0.02, rtol=0.05)
  for i in range(cfg.num_layers):
    np.testing.assert_allclose(std(layers["attention"]["query"]["kernel"][i]), 0.02, rtol=0.05)
    np.testing.assert_allclose(std(layers["mlp"]["fc"]["kernel"][i]), 0.02, rtol=0.05)
    np.testing.assert_allclose(std(layers["attention"]["out"]["kernel"][i]), residual_std,
                               rtol=0.05)
    np.testing.assert_allclose(std(layers["mlp"]["proj"]["kernel"][i]), residual_std, rtol=0.05)
  fc = layers["mlp"]["fc"]["kernel"]
  assert np.abs(fc[0] - fc[1]).max() > 0.01
  np.testing.assert_array_equal(layers["attention"]["out"]["bias"], 0.0)
  np.testing.assert_array_equal(layers["attention_norm"]["scale"], 1.0)
  np.testing.assert_array_equal(params["final_norm"]["bias"], 0.0)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_zero_init_residual_starts_every_block_as_the_identity():
  """model.zero_init_residual: attention out and MLP proj/down kernels start at zero (the other
  kernels as usual), so the initial logits are the embeddings through the final norm alone."""
  for mlp, out_names in (("gelu", ("proj",)), ("swiglu", ("down",))):
    cfg = make(zero_init_residual=True, mlp=mlp, positional="rope")
    params = nn.unbox(model_lib.init_params(Transformer(cfg), jax.random.key(0, impl="rbg"),
                                            ONES))
    for i in range(cfg.num_layers):
      layer = params[f"layers_{i}"]
      assert not np.any(layer["attention"]["out"]["kernel"])
      assert all(not np.any(layer["mlp"][name]["kernel"]) for name in out_names)
      assert np.std(np.asarray(layer["attention"]["query"]["kernel"])) > 0.01
    tokens = random_tokens()
    hidden = jnp.take(params["token_embed"], tokens, axis=0)
    norm = model_lib.Norm(cfg)
    final = norm.apply({"params": params["final_norm"]}, hidden)
    np.testing.assert_allclose(forward(cfg, params, tokens, ARANGE, ONES),
                               final @ params["token_embed"].T, atol=1e-5)


def test_skips_start_where_modded_nanogpt_starts_them_and_learn_their_mix():
  """model.x0_skip starts as the plain model (a = 1, b = 0); model.value_embed's table is an
  'embed' parameter mixed in at 0.5 / 0.5; every new parameter gets a gradient."""
  cfg = make(positional="rope", num_kv_heads=2)
  tokens = random_tokens()
  skipped = dataclasses.replace(cfg, x0_skip=True, value_embed=True)
  params = nn.unbox(Transformer(skipped).init(jax.random.key(0), tokens)["params"])
  for layer in ("layers_0", "layers_1"):
    np.testing.assert_array_equal(params[layer]["x0_skip_scale"], [1.0, 0.0])
    np.testing.assert_array_equal(params[layer]["attention"]["value_embed_scale"], [0.5, 0.5])
  assert params["value_embed"].shape == (cfg.vocab_size, 2, cfg.head_dim)
  assert optim_lib.group_of(["value_embed"]) == "embed"
  assert optim_lib.group_of(["layers_0", "x0_skip_scale"]) == "vectors"
  # Without the value table, the x0 skip at its init is the plain model.
  x0_only = dataclasses.replace(cfg, x0_skip=True)
  plain_params = {k: v for k, v in params.items() if k != "value_embed"}
  for layer in ("layers_0", "layers_1"):
    plain_params[layer] = dict(plain_params[layer], attention={
        k: v for k, v in params[layer]["attention"].items() if k != "value_embed_scale"})
  with_skip = forward(x0_only, plain_params, tokens, ARANGE, ONES)
  without = {k: ({n: p for n, p in v.items() if n != "x0_skip_scale"} if k.startswith("layers")
                 else v) for k, v in plain_params.items()}
  np.testing.assert_allclose(with_skip, forward(cfg, without, tokens, ARANGE, ONES), atol=1e-6)

  grads = jax.grad(lambda p: loss_fn(skipped, p, tokens, ARANGE, ONES)[0])(
      nn.unbox(random_params(skipped)))
  for layer in ("layers_0", "layers_1"):
    assert np.all(np.abs(grads[layer]["x0_skip_scale"]) > 0)
    assert np.all(np.abs(grads[layer]["attention"]["value_embed_scale"]) > 0)
  seen = np.unique(np.asarray(tokens))
  assert np.all(np.abs(grads["value_embed"][seen]).sum(axis=(1, 2)) > 0)
  assert not np.any(np.delete(np.asarray(grads["value_embed"]), seen, axis=0))


def test_prefix_slots_are_the_keys_and_values_of_virtual_tokens():
  """model.prefix_length: slots holding the keys/values that each layer computes for P real
  tokens make the model continue after those tokens exactly (the tokens' queries come after
  them, positions P..); every segment of a packed row sees the prefix."""
  cfg = make(positional="rope", num_kv_heads=2)
  prefixed, length = dataclasses.replace(cfg, prefix_length=3), 3
  params = nn.unbox(random_params(cfg))
  context, tokens = random_tokens(1, (BATCH, length)), random_tokens(2)
  _, cache = decode_step(cfg, params, model_lib.init_cache(cfg, BATCH, cfg.max_seq_len), context,
                         ARANGE[:, :length], None)
  slots = nn.unbox(cache)
  prefix_params = dict(params)
  for layer in ("layers_0", "layers_1"):
    attention = slots[layer]["attention"]
    prefix_params[layer] = dict(params[layer], attention=dict(
        params[layer]["attention"], prefix_key=attention["cached_key"][0, :length],
        prefix_value=attention["cached_value"][0, :length]))
  context = jnp.broadcast_to(context[:1], context.shape)  # (the slots are row 0's)
  full = forward(cfg, params, jnp.concatenate([context, tokens], axis=1)[:, :LENGTH],
                 ARANGE, ONES)
  after = forward(prefixed, prefix_params, tokens[:, :LENGTH - length], ARANGE[:, length:],
                  ONES[:, length:])
  np.testing.assert_allclose(after, full[:, length:], atol=1e-5)
  assert not np.allclose(after, forward(cfg, params, tokens[:, :LENGTH - length],
                                        ARANGE[:, :LENGTH - length], ONES[:, length:]), atol=1e-3)
  # A packed row: its second segment, positions from 0, equals that segment alone.
  half = LENGTH // 2
  packed = forward(prefixed, prefix_params, tokens,
                   jnp.concatenate([ARANGE[:, :half]] * 2, axis=1),
                   jnp.concatenate([ONES[:, :half], 2 * ONES[:, half:]], axis=1))
  alone = forward(prefixed, prefix_params, tokens[:, half:], ARANGE[:, :half], ONES[:, :half])
  np.testing.assert_allclose(packed[:, half:], alone, atol=1e-5)
  assert optim_lib.group_of(["layers_0", "attention", "prefix_key"]) == "embed"


def test_relu2_mlp_is_fc_relu_squared_proj():
  cfg = make(mlp="relu2", num_layers=1)
  mlp = model_lib.Mlp(cfg)
  x = random_normal(3, (BATCH, LENGTH, cfg.embed_dim))
  params = mlp.init(jax.random.key(0), x)["params"]
  params = nn.unbox(params)
  fc, proj = params["fc"], params["proj"]
  hidden = np.maximum(np.asarray(x) @ np.asarray(fc["kernel"]) + np.asarray(fc["bias"]), 0) ** 2
  np.testing.assert_allclose(mlp.apply({"params": params}, x),
                             hidden @ np.asarray(proj["kernel"]) + np.asarray(proj["bias"]),
                             rtol=1e-5, atol=1e-5)
  assert model_lib.param_count(cfg) == model_lib.count_params(random_params(cfg))


def test_logical_axes():
  cfg = make(mlp="swiglu", tie_embeddings=False)
  specs = nn.get_partition_spec(random_params(cfg))
  P = jax.sharding.PartitionSpec
  assert specs["token_embed"] == P("vocab", "embed")
  assert specs["position_embed"] == P(None, "embed")
  assert specs["lm_head"] == P("embed", "vocab")
  attention = specs["layers_0"]["attention"]
  assert attention["query"]["kernel"] == P("embed", "heads", "head_dim")
  assert attention["key"]["kernel"] == P("embed", "kv_heads", "head_dim")
  assert attention["key"]["bias"] == P("kv_heads", "head_dim")
  assert attention["out"]["kernel"] == P("heads", "head_dim", "embed")
  assert specs["layers_0"]["mlp"]["gate"]["kernel"] == P("embed", "mlp")
  assert specs["layers_0"]["mlp"]["down"]["kernel"] == P("mlp", "embed")
  assert specs["layers_0"]["mlp_norm"]["scale"] == P("embed")


# --- grouped-query, sliding-window and qk-norm attention --------------------------------------

def test_grouped_query_attention_equals_multi_head_with_shared_kv_heads():
  """num_kv_heads=2 of 4 heads == multi-head attention whose key/value kernels repeat each kv
  head for its two query heads (Hugging Face's repeat_kv), with every attention_impl; the
  cache holds the kv heads only."""
  gqa = make(positional="rope", num_kv_heads=2, qkv_bias=True, use_bias=False)
  params = random_params(gqa)
  mha = make(positional="rope", qkv_bias=True, use_bias=False)
  widened = jax.tree.map(lambda x: x, nn.unbox(params))
  for i in range(gqa.num_layers):
    attention = widened[f"layers_{i}"]["attention"]
    for name in ("key", "value"):  # kernel [embed, kv_heads, head_dim], bias [kv_heads, head_dim]
      attention[name] = {"kernel": jnp.repeat(attention[name]["kernel"], 2, axis=1),
                         "bias": jnp.repeat(attention[name]["bias"], 2, axis=0)}
  tokens = random_tokens()
  expected = forward(mha, widened, tokens, ARANGE, ONES)
  for impl in ("reference", "xla"):
    got = forward(dataclasses.replace(gqa, attention_impl=impl), params, tokens, ARANGE, ONES)
    np.testing.assert_allclose(got, expected, atol=1e-5)
  cache = model_lib.init_cache(gqa, BATCH, gqa.max_seq_len)
  assert nn.unbox(cache)["layers_0"]["attention"]["cached_key"].shape == (BATCH, 16, 2, 8)
  assert model_lib.param_count(gqa) == model_lib.count_params(params)


def test_sliding_window_attends_to_the_last_window_tokens_only():
  """A token's output depends on the tokens inside its window and on no token before it (here
  through one layer), and the window applies inside each packed document."""
  cfg = make(positional="rope", num_layers=1, sliding_window=3)
  params = random_params(cfg)
  tokens = random_tokens()
  base = forward(cfg, params, tokens, ARANGE, ONES)
  changed = forward(cfg, params, tokens.at[:, 4].set((tokens[:, 4] + 1) % 61), ARANGE, ONES)
  moved = np.any(np.abs(np.asarray(changed - base)) > 1e-6, axis=(0, 2))   # [length]
  assert list(np.nonzero(moved)[0]) == [4, 5, 6]   # itself and the next window - 1 tokens
  # Equal to the plain model on windows of the sequence: position t sees t-2..t.
  whole = forward(make(positional="rope", num_layers=1), params, tokens[:, 5:8],
                  ARANGE[:, :3], ONES[:, :3])
  np.testing.assert_allclose(base[:, 7], whole[:, 2], atol=1e-5)
  for impl in ("xla",):
    other = forward(dataclasses.replace(cfg, attention_impl=impl), params, tokens, ARANGE, ONES)
    np.testing.assert_allclose(other, base, atol=1e-5)
  segments = jnp.array([[1] * 6 + [2] * 6, [1] * 12])
  packed = forward(cfg, params, tokens, ARANGE, segments)
  alone = forward(cfg, params, tokens[:, 6:], ARANGE[:, :6], ONES[:, :6])
  np.testing.assert_allclose(packed[0, 6:], alone[0], atol=1e-5)


def test_qk_norm_normalizes_each_head_of_queries_and_keys():
  cfg = make(positional="rope", qk_norm=True, norm="rmsnorm")
  params = random_params(cfg)
  attention = nn.unbox(params)["layers_0"]["attention"]
  assert attention["query_norm"]["scale"].shape == (8,) == attention["key_norm"]["scale"].shape
  assert params["layers_0"]["attention"]["key_norm"]["scale"].names == ("head_dim",)
  assert model_lib.param_count(cfg) == model_lib.count_params(params)
  # Scaling the query and key kernels changes nothing: the norm removes it.
  scaled = jax.tree.map(lambda x: x, nn.unbox(params))
  for name in ("query", "key"):
    scaled["layers_0"]["attention"][name]["kernel"] *= 3.0
    scaled["layers_0"]["attention"][name]["bias"] *= 3.0
  tokens = random_tokens()
  np.testing.assert_allclose(forward(cfg, scaled, tokens, ARANGE, ONES),
                             forward(cfg, nn.unbox(params), tokens, ARANGE, ONES), atol=1e-4)


@pytest.mark.parametrize("overrides, match", [
    ({"num_kv_heads": 3}, r"model.num_kv_heads=3 does not divide model.num_heads=4"),
    ({"num_kv_heads": -1}, r"model.num_kv_heads=-1 must be >= 0"),
    ({"sliding_window": -2}, r"model.sliding_window=-2 must be >= 0"),
    ({"window_layers": "1"}, r"model.window_layers='1' chooses the layers that use "
                             r"model.sliding_window, which is 0"),
    ({"sliding_window": 4, "window_layers": "1;2"}, r"write layer indices and ranges separated "
                                                    r"by commas, e.g. 0,2,4-7"),
    ({"sliding_window": 4, "window_layers": "2-9"}, r"names layer 4, but model.num_layers=4"),
    ({"head_size": -8}, r"model.head_size=-8 must be >= 0")])
def test_bad_attention_shapes_are_one_line(overrides, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate({"model": overrides})


# --- parameter counts and FLOPs -------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    {}, {"tie_embeddings": False}, {"mlp": "swiglu"}, {"use_bias": False},
    {"norm": "rmsnorm"}, {"positional": "rope"}, {"positional": "sinusoidal"},
    {"positional": "none", "norm": "rmsnorm", "mlp": "swiglu", "use_bias": False,
     "tie_embeddings": False, "scan_layers": True},
    {"num_kv_heads": 1, "head_size": 16, "qk_norm": True, "qkv_bias": True, "use_bias": False,
     "norm": "rmsnorm", "mlp": "swiglu", "positional": "rope"},
    {"num_kv_heads": 2, "x0_skip": True, "value_embed": True},
    {"num_kv_heads": 2, "prefix_length": 5, "num_classes": 3}])
def test_param_count_formula(overrides):
  cfg = make(**overrides)
  assert model_lib.param_count(cfg) == model_lib.count_params(random_params(cfg))


def file_config(name: str) -> ModelConfig:
  return config_lib.validate(importlib.import_module(f"configs.{name}").get_config()).model


def abstract_params(cfg: ModelConfig):
  return jax.eval_shape(lambda: Transformer(cfg).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


@pytest.mark.parametrize("name,expected", [
    ("gpt2_124m", 124_439_808), ("gpt2_355m", 354_823_168), ("gpt2_774m", 774_030_080),
    ("gpt2_1558m", 1_557_611_200)])
def test_gpt2_config_param_counts(name, expected):
  cfg = file_config(name)
  assert model_lib.param_count(cfg) == expected
  # Tracing a scanned model is much cheaper for deep models; the count is the same.
  assert model_lib.count_params(abstract_params(
      dataclasses.replace(cfg, scan_layers=True))) == expected
  if name == "gpt2_124m":
    assert model_lib.count_params(abstract_params(cfg)) == expected


def test_llama_small_config():
  cfg = file_config("llama_small")
  assert (cfg.positional, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu")
  assert not cfg.use_bias and not cfg.tie_embeddings
  count = model_lib.count_params(abstract_params(cfg))
  assert count == model_lib.param_count(cfg) < 10_000_000


def test_flops_per_token():
  cfg = file_config("gpt2_124m")
  matmul_params = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 50257
  assert model_lib.flops_per_token(cfg, 1024) == 6 * matmul_params + 12 * 12 * 1024 * 768
  # A 256-token window on 4 of the 12 layers: their queries see 256 keys, the others 1,024.
  windowed = dataclasses.replace(cfg, positional="rope", sliding_window=256,
                                 window_layers="0,4-5,11")
  assert model_lib.flops_per_token(windowed, 1024) == 6 * matmul_params + 12 * (
      4 * 256 + 8 * 1024) * 768


def test_flops_per_token_matches_xla_count():
  """XLA's own FLOP count of a training step (from the lowered program, not compiled), on a
  model where matmuls dominate. The reference attention computes the full square, as counted."""
  cfg = make(embed_dim=128, mlp_dim=512, vocab_size=256, max_seq_len=64)
  params = nn.unbox(random_params(cfg))
  tokens = random_tokens(shape=(2, 64), vocab=256)
  grad = jax.grad(lambda p: cross_entropy(Transformer(cfg).apply({"params": p}, tokens), tokens))
  xla_flops = jit(grad).lower(params).cost_analysis()["flops"] / tokens.size
  np.testing.assert_allclose(xla_flops, model_lib.flops_per_token(cfg, 64), rtol=0.03)


def test_sinusoidal_positions_start_at_the_token_embeddings_scale():
  # Unscaled sin/cos codes (RMS 0.71) would be ~35x the tokens' RMS (init_std 0.02) and drown
  # them; the model adds them at the tokens' scale, as learned positions start.
  config = ModelConfig(embed_dim=128, init_std=0.02, positional="sinusoidal")
  codes = model_lib.sinusoidal_positions(jnp.arange(256)[None], config)  # [1, 256, 128]
  rms = float(jnp.sqrt(jnp.mean(jnp.square(codes))))
  assert abs(rms - 0.02) < 0.002, rms
  params = Transformer(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  token_rms = float(jnp.sqrt(jnp.mean(jnp.square(nn.unbox(params)["token_embed"]))))
  assert 0.5 < rms / token_rms < 2.0


def test_masked_softmax_gradient_and_saved_residuals():
  """masked_softmax equals where + softmax in value and gradient (a fully masked row included)
  and keeps only the probabilities as a [batch, heads, q, kv] residual."""
  rng = np.random.default_rng(0)
  scores = jnp.asarray(rng.normal(size=(2, 3, 5, 5)), jnp.float32)
  mask = model_lib.causal_mask(jnp.arange(5), jnp.arange(5)) & (
      jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]) > 0)[:, None, :, None]
  cotangent = jnp.asarray(rng.normal(size=scores.shape), jnp.float32)
  written_out = lambda s: jax.nn.softmax(jnp.where(mask, s, jnp.finfo(jnp.float32).min))
  ours = lambda s: model_lib.masked_softmax(s, mask)
  value, vjp = jax.vjp(ours, scores)
  value_ref, vjp_ref = jax.vjp(written_out, scores)
  np.testing.assert_allclose(value, value_ref, rtol=1e-6)
  np.testing.assert_allclose(vjp(cotangent)[0], vjp_ref(cotangent)[0], rtol=1e-5, atol=1e-7)
  big = [leaf for leaf in jax.tree.leaves(vjp)  # the VJP closure is a pytree of residuals
         if hasattr(leaf, "shape") and leaf.shape == scores.shape]
  assert len(big) == 1


def test_auto_attention_decodes_with_xla_on_gpu():
  config = config_lib.validate({"model": {"dtype": "bfloat16"}}).model
  assert model_lib.resolve_attention_impl(config, "gpu", decoding=True) == "xla"
  assert model_lib.resolve_attention_impl(config, "cpu", decoding=True) == "reference"


@pytest.mark.parametrize("platform, overrides, expected", [
    ("gpu", {"dtype": "bfloat16"}, "cudnn"),
    ("gpu", {"dtype": "float32"}, "xla"),          # cuDNN flash attention is bf16/fp16 only
    ("gpu", {"dtype": "bfloat16", "embed_dim": 40, "num_heads": 4}, "xla"),  # head_dim 10
    ("gpu", {"dtype": "bfloat16", "dropout": 0.1}, "reference"),
    ("tpu", {"dtype": "bfloat16"}, "splash"),   # the Pallas kernel (tests/test_kernels.py)
    ("cpu", {}, "reference"),
    ("gpu", {"attention_impl": "reference", "dtype": "bfloat16"}, "reference"),
])
def test_auto_attention_picks_an_exact_kernel_per_platform(platform, overrides, expected):
  config = config_lib.validate({"model": {"attention_impl": "auto", **overrides}}).model
  assert model_lib.resolve_attention_impl(config, platform) == expected
