"""A GPT-style decoder in Flax linen, written out from scratch.

Read top to bottom: numerics helpers (positions, norms), the attention core, the modules
(Dense -> Norm -> CausalSelfAttention -> Mlp -> Block -> Transformer), then helpers that other
modules need (parameter counts, FLOPs, layer stacking for `scan_layers`, KV cache).

Conventions (see docs/architecture.md):
  * Parameters are float32 and carry logical axis names (`nn.with_logical_partitioning`):
    `vocab, embed, heads, head_dim, mlp` (+ `layers` when scanned). Compute runs in `config.dtype`;
    attention scores, softmax, norm statistics and logits are float32.
  * Activations get `nn.with_logical_constraint` at block boundaries; without a mesh and rules
    these are no-ops, so plain `model.init` / `model.apply` work anywhere.
  * Shapes use the letters batch, length, heads, head_dim, embed, mlp, vocab.

Parameter tree (unscanned; with `scan_layers=True`, `layers_0 .. layers_{n-1}` become one
`layers` subtree whose arrays have a leading [num_layers] axis named 'layers'):

  token_embed            [vocab, embed]            ('vocab', 'embed')
  position_embed         [max_seq_len, embed]      (None, 'embed')        positional='learned'
  layers_{i}/
    attention_norm/scale [embed]                   ('embed',)
    attention_norm/bias  [embed]                   ('embed',)             layernorm + use_bias
    attention/{query,key,value}/kernel [embed, heads, head_dim]  ('embed', 'heads', 'head_dim')
    attention/{query,key,value}/bias   [heads, head_dim]         ('heads', 'head_dim')
    attention/out/kernel [heads, head_dim, embed]  ('heads', 'head_dim', 'embed')
    attention/out/bias   [embed]                   ('embed',)
    mlp_norm/{scale,bias}                          as attention_norm
    mlp/fc/kernel        [embed, mlp]              ('embed', 'mlp')       mlp='gelu'
    mlp/proj/kernel      [mlp, embed]              ('mlp', 'embed')
    mlp/{gate,up}/kernel [embed, mlp]              ('embed', 'mlp')       mlp='swiglu'
    mlp/down/kernel      [mlp, embed]              ('mlp', 'embed')
    (every Dense has a bias over its output axes when use_bias)
  final_norm/{scale,bias}
  lm_head                [embed, vocab]            ('embed', 'vocab')     tie_embeddings=False
  classifier/kernel      [embed, num_classes]      ('embed', None)        num_classes > 0
  classifier/bias        [num_classes]                                    (instead of lm_head)
  .../{query,...}/lora_a [*kernel inputs, rank]    (input axes, None)     lora_rank > 0, on the
  .../{query,...}/lora_b [rank, *kernel outputs]   (None, output axes)    lora_targets
  layers_{i}/attention/prefix_{key,value} [prefix_length, kv_heads, head_dim]
                         (None, 'kv_heads', 'head_dim')                  prefix_length > 0

The LM head never has a bias (as in GPT-2 / nanoGPT).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxlm import kernels, pipeline
from jaxlm.config import ConfigError, ModelConfig

Array = jax.Array
PyTree = Any

# Logical axis names of the activations we constrain.
ACTIVATION_AXES = ("batch", "length", "embed")
HEADS_AXES = ("batch", "length", "heads", "head_dim")
KV_HEADS_AXES = ("batch", "length", "kv_heads", "head_dim")
# The KV cache is [batch, max_len, kv_heads, head_dim] per layer.
CACHE_AXES = KV_HEADS_AXES

# `remat_policy` -> what jax.checkpoint may keep from the forward pass (everything else is
# recomputed in the backward pass). The names are set with `checkpoint_name` below.
#   full: keep nothing but the block inputs (least memory, ~1 extra forward).
#   dots_saveable: keep every matmul output (incl. attention scores: O(length^2) memory).
#   dots_with_no_batch_dims_saveable: keep the projection matmuls, not the attention einsums.
#   save_attention_out: keep only the attention output (before its output projection).
#   minimal: keep q, k, v, the attention output and the MLP input projections (like MaxText's
#     "minimal"): recompute only norms, attention scores/softmax and activations.
_MINIMAL_NAMES = ("query", "key", "value", "attention_out", "mlp_in")
CHECKPOINT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
    "minimal": jax.checkpoint_policies.save_only_these_names(*_MINIMAL_NAMES),
}


def _normal(std: float, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


# ---------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------

def sinusoidal_positions(positions: Array, config: ModelConfig) -> Array:
  """What `positional='sinusoidal'` adds to the token embeddings: fixed sin/cos codes (Vaswani
  et al.), positions [batch, length] -> [batch, length, embed] float32: first half sin, second
  half cos, with frequencies 1 / 10000^(2i/embed). An odd embed gets a zero last channel.

  The codes are scaled to the token embeddings' initial RMS (init_std; a sin/cos code has RMS
  1/sqrt(2)), as learned positions start. Unscaled codes (RMS 0.7) would be ~35x larger than
  tokens initialised with std 0.02 and drown them: measured on configs/small.py, such a model
  stays at ~7.1 nats/token for 300 steps while rope/none reach ~5.3. (Vaswani et al. balance the
  two the other way, multiplying embeddings initialised at std d^-1/2 by sqrt(d).)
  """
  half = config.embed_dim // 2
  inv_freq = 10000.0 ** (-np.arange(half, dtype=np.float32) / half)  # [half]
  angles = positions[..., None].astype(jnp.float32) * inv_freq        # [batch, length, half]
  codes = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  if config.embed_dim % 2:
    codes = jnp.pad(codes, ((0, 0), (0, 0), (0, 1)))
  return codes * (config.init_std * math.sqrt(2.0))


def rope_frequencies(config: ModelConfig) -> np.ndarray:
  """The rotation speed of each channel pair [head_dim / 2], float32: theta^(-2i/head_dim),
  with Llama 3's long-context scaling when config.rope_scaling='llama3' (as transformers'
  `_compute_llama3_parameters`)."""
  half = config.head_dim // 2
  inv_freq = config.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
  if config.rope_scaling == "llama3":
    factor, old_len = config.rope_scaling_factor, config.rope_original_max_len
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray | float) -> Array:
  """Rotary position embedding, "rotate half" layout (GPT-NeoX / Hugging Face LLaMA).

  x [batch, length, heads, head_dim], positions [batch, length] -> same shape and dtype as x.
  Channel i of the first half and channel i of the second half form a pair rotated by the
  angle position * inv_freq[i] (`rope_frequencies`; a number is taken as theta: theta^(-2i/
  head_dim)). Computed in float32.
  """
  half = x.shape[-1] // 2
  if np.ndim(inv_freq) == 0:  # (theta may be traced)
    inv_freq = jnp.asarray(inv_freq, jnp.float32) ** (-jnp.arange(half, dtype=jnp.float32)
                                                      / half)                   # [half]
  angles = positions[..., None].astype(jnp.float32) * inv_freq        # [batch, length, half]
  sin = jnp.sin(angles)[:, :, None, :]                                # [batch, length, 1, half]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)               # [..., half] each
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Attention core
# ---------------------------------------------------------------------------------------------

def causal_mask(q_slots: Array, k_slots: Array, window: int = 0,
                windowed: Array | None = None) -> Array:
  """Causal mask: True where a query may attend to a key.

  q_slots [q_len], k_slots [kv_len]: index of each token in the sequence (or in the KV cache);
  a query sees keys at the same or earlier slots, and with a sliding `window` > 0 only the
  last `window` of them (its own included). `windowed`: a traced bool scalar that switches
  the window on (a scanned layer of a model whose layers differ: model.window_layers).
  -> [1, 1, q_len, kv_len] (broadcasts over batch and heads).
  """
  distance = q_slots[:, None] - k_slots[None, :]
  allowed = distance >= 0
  if window:
    inside = distance < window
    allowed &= inside if windowed is None else inside | ~windowed
  return allowed[None, None]


def segment_mask(q_segment_ids: Array, k_segment_ids: Array) -> Array:
  """True where query and key belong to the same segment (packed documents, padding).

  q_segment_ids [batch, q_len], k_segment_ids [batch, kv_len] -> [batch, 1, q_len, kv_len].
  """
  return (q_segment_ids[:, :, None] == k_segment_ids[:, None, :])[:, None]


@jax.custom_vjp
def masked_softmax(scores: Array, mask: Array) -> Array:
  """softmax(where(mask, scores, most negative float)) over the last axis, float32.

  scores [batch, heads, q_len, kv_len] float32; mask bool, broadcastable to it. The same
  values as writing it out, but its VJP keeps only the probabilities (and the unbroadcast
  mask) for the backward pass: autodiff of where + softmax keeps the masked scores, their exp
  and the probabilities, three [batch, heads, q_len, kv_len] float32 arrays per layer (for GPT-2
  at batch 8 x 1,024 that was 1.2 GB per layer of the step's 26.7 GB of temporaries on CPU).
  """
  # The most negative float, not -inf: a fully masked row (a padding query) then gives a
  # uniform distribution instead of NaN.
  return jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)


def _masked_softmax_fwd(scores, mask):
  probs = masked_softmax(scores, mask)
  return probs, (probs, mask)


def _masked_softmax_bwd(residuals, d_probs):
  probs, mask = residuals
  # d softmax: probs * (d_probs - <d_probs, probs>); masked scores were replaced by a constant.
  d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
  return jnp.where(mask, d_scores, 0.0), None


masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


def reference_attention(query: Array, key: Array, value: Array, mask: Array, *,
                        dropout_rate: float = 0.0, dropout_rng: Array | None = None) -> Array:
  """Multi-head scaled dot-product attention, written out.

  query [batch, q_len, heads, head_dim], key/value [batch, kv_len, kv_heads, head_dim] (kv_heads
  divides heads: query head h reads key/value head h // (heads / kv_heads), as grouped-query
  attention and Hugging Face's repeat_kv do), mask bool broadcastable to [batch, heads, q_len,
  kv_len] -> [batch, q_len, heads, head_dim]. Scores and softmax are float32; the weighted sum
  runs in the input dtype. Dropout on the attention probabilities happens only when
  `dropout_rng` is given.
  """
  group = query.shape[2] // key.shape[2]
  if group > 1:  # [batch, kv_len, heads, head_dim]: each kv head serves `group` query heads
    key, value = jnp.repeat(key, group, axis=2), jnp.repeat(value, group, axis=2)
  scale = 1.0 / math.sqrt(query.shape[-1])
  scores = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                      preferred_element_type=jnp.float32) * scale    # [batch, heads, q, kv]
  probs = masked_softmax(scores, mask)
  if dropout_rng is not None and dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(value.dtype), value)


def attention_logit_max(query: Array, key: Array, mask: Array, query_chunk: int = 128
                        ) -> Array:
  """The largest attention logit q.k / sqrt(head_dim) that a query may see: float32 scalar.

  query [batch, q_len, heads, head_dim], key [batch, kv_len, heads, head_dim], mask bool
  broadcastable to [batch, heads, q_len, kv_len]. Queries go in chunks of `query_chunk` (when
  it divides q_len), so [batch, heads, chunk, kv_len] scores exist at a time, whatever the
  attention kernel. A diagnostic (train.layer_stats_every): no gradient.
  """
  query, key = jax.lax.stop_gradient(query), jax.lax.stop_gradient(key)
  key = jnp.repeat(key, query.shape[2] // key.shape[2], axis=2)  # (grouped-query attention)
  q_len = query.shape[1]
  chunk = query_chunk if q_len % query_chunk == 0 else q_len
  mask = jnp.broadcast_to(mask, mask.shape[:2] + (q_len, key.shape[1]))
  scale = 1.0 / math.sqrt(query.shape[-1])

  def chunk_max(start: Array) -> Array:
    q = jax.lax.dynamic_slice_in_dim(query, start, chunk, axis=1)
    m = jax.lax.dynamic_slice_in_dim(mask, start, chunk, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, key, preferred_element_type=jnp.float32)
    return jnp.max(jnp.where(m, scores * scale, -jnp.inf))

  return jnp.max(jax.lax.map(chunk_max, jnp.arange(0, q_len, chunk)))


# attention_impl -> the platforms it runs on (besides CPU, where Pallas kernels interpret).
_IMPL_PLATFORMS = {"cudnn": ("gpu", "cuda"), "triton": ("gpu", "cuda", "cpu"),
                   "splash": ("tpu", "cpu")}


def resolve_attention_impl(config: ModelConfig, platform: str | None = None,
                           decoding: bool = False) -> str:
  """The implementation `attention_impl='auto'` stands for on `platform` (default: JAX's
  default backend); any other value is returned as it is.

  gpu: 'cudnn' (flash attention: never materializes the [batch, heads, q, kv] scores; measured
  1.66x the XLA path for GPT-2 124M on an H200) when the compute dtype is bfloat16/float16 and
  head_dim is a multiple of 8 up to 128, which cuDNN requires; else 'xla'. Decoding against a
  KV cache (a few queries, an arbitrary mask over cache slots) takes 'xla' there: the flash
  kernel pays off on long query blocks, and its mask support was never tried on a GPU here.
  tpu: 'splash' (the Pallas splash-attention kernel, jaxlm.kernels: segment ids, causal and
  local masks and grouped-query attention inside the kernel), 'xla' when decoding.
  cpu: 'reference'. With attention dropout always 'reference' (the fused kernels have none).
  """
  platform = platform or jax.default_backend()
  runs_on = _IMPL_PLATFORMS.get(config.attention_impl)
  if runs_on and platform not in runs_on:
    where = "an NVIDIA GPU" if "gpu" in runs_on else "a TPU"
    raise ConfigError(f"model.attention_impl='{config.attention_impl}' needs {where}, but the "
                      f"devices are {platform}; use 'auto' (the best kernel for the devices) or "
                      f"'xla'.")
  if config.attention_impl != "auto":
    return config.attention_impl
  if config.dropout > 0:
    return "reference"
  if platform in ("gpu", "cuda", "rocm"):
    cudnn_ok = (platform != "rocm" and not decoding and config.dtype in ("bfloat16", "float16")
                and config.head_dim % 8 == 0 and config.head_dim <= 128)
    return "cudnn" if cudnn_ok else "xla"
  if platform == "tpu":
    return "xla" if decoding else "splash"
  return "reference"


def attention_kernel(config: ModelConfig, length: int, platform: str | None = None,
                     decoding: bool = False) -> str:
  """The implementation an attention call over `length` queries runs: `resolve_attention_impl`,
  except that the Pallas kernels ('splash', 'triton') take only whole sequences of lengths
  they tile (jaxlm.kernels.supports); decoding and other lengths run 'xla'."""
  impl = resolve_attention_impl(config, platform, decoding)
  if impl in kernels.KERNELS and (
      decoding or not kernels.supports(impl, length, config.sliding_window)):
    return "xla"
  if config.prefix_length and impl != "reference":  # prefix slots: an explicit mask
    return "xla"
  return impl


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

class Dense(nn.Module):
  """`x @ kernel + bias`, contracting the trailing input axes of x with the leading kernel axes.

  The kernel has shape x.shape[-n_in:] + features, where n_in = len(axes) - len(features);
  `axes` names all kernel axes (inputs, then outputs); the bias covers the output axes.
  E.g. features=(heads, head_dim), axes=('embed', 'heads', 'head_dim'):
  [batch, length, embed] -> [batch, length, heads, head_dim].
  """
  features: tuple[int, ...]
  axes: tuple[str | None, ...]
  config: ModelConfig
  init_scale: float = 1.0  # multiplies init_std; < 1 for the residual output projections
  # A hidden layer's matrix (muP: init_std / sqrt(width multiplier)); False for a readout (the
  # classification head), which muP scales through the logits instead.
  hidden: bool = True
  use_bias: bool | None = None  # None: config.use_bias (qkv_bias turns it on for q/k/v)

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    n_in = len(self.axes) - len(self.features)
    in_shape = x.shape[x.ndim - n_in:]
    std = cfg.init_std * self.init_scale / (math.sqrt(cfg.width_multiplier) if self.hidden else 1)
    kernel = self.param("kernel", _normal(std, self.axes),
                        in_shape + tuple(self.features), jnp.float32)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())))
    if cfg.lora_rank and self.name in cfg.lora_targets:
      y = y + self._lora(x, in_shape, contract, deterministic)
    if cfg.use_bias if self.use_bias is None else self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             self.axes[n_in:]),
                        tuple(self.features), jnp.float32)
      y = y + bias.astype(dtype)
    return y


  def _lora(self, x: Array, in_shape: tuple[int, ...], contract, deterministic: bool) -> Array:
    """LoRA (Hu et al. 2021): dropout(x) @ lora_a @ lora_b * alpha / rank.

    lora_a [*in, rank] starts random (std 1/sqrt(fan_in)), lora_b [rank, *out] at zero, so
    a fresh adapter changes nothing. The rank axis is not sharded; the others follow the
    kernel's logical axes.
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    n_in = len(in_shape)
    fan_in = math.prod(in_shape)
    lora_a = self.param("lora_a", _normal(1.0 / math.sqrt(fan_in), self.axes[:n_in] + (None,)),
                        in_shape + (cfg.lora_rank,), jnp.float32)
    lora_b = self.param("lora_b", nn.with_logical_partitioning(
        nn.initializers.zeros, (None,) + tuple(self.axes[n_in:])),
                        (cfg.lora_rank,) + tuple(self.features), jnp.float32)
    h = nn.Dropout(cfg.lora_dropout)(x, deterministic=deterministic)
    h = jax.lax.dot_general(h.astype(dtype), lora_a.astype(dtype), (contract, ((), ())))
    h = jax.lax.dot_general(h, lora_b.astype(dtype), (((h.ndim - 1,), (0,)), ((), ())))
    return h * (cfg.lora_alpha / cfg.lora_rank)


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the last axis, statistics in float32.

  [..., axis] -> same shape, config.dtype. LayerNorm subtracts the mean first; RMSNorm does
  not and never has a bias. `kind` overrides config.norm ('rmsnorm' for qk_norm); `axis` is the
  logical name of the normalized axis (embed, or head_dim for qk_norm).
  """
  config: ModelConfig
  kind: str = ""
  axis: str = "embed"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    kind = self.kind or cfg.norm
    dim = x.shape[-1]
    x = x.astype(jnp.float32)
    if kind == "layernorm":
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis,)),
                       (dim,), jnp.float32)
    x = x * scale
    if kind == "layernorm" and cfg.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             (self.axis,)),
                        (dim,), jnp.float32)
      x = x + bias
    return x.astype(jnp.dtype(cfg.dtype))


class CausalSelfAttention(nn.Module):
  """Causal multi-head self-attention with an optional KV cache.

  x [batch, length, embed] -> [batch, length, embed].

  q/k/v are kept as [batch, length, heads, head_dim] from projection to output projection: the
  kernels are [embed, heads, head_dim], so no reshapes or transposes are written out. They are
  three separate kernels rather than one fused [embed, 3, heads, head_dim]: the logical axes
  stay simple, GPT-2/LLaMA conversion is a plain reshape, and fusing would save little (each
  of the three matmuls is already large; it mostly saves kernel launches on accelerators).

  `attention_impl='reference'` uses `reference_attention` above; 'xla'/'cudnn' call
  `jax.nn.dot_product_attention`, 'splash'/'triton' the Pallas kernels of jaxlm.kernels (same
  math, tested equal; the kernels take sequence lengths they tile, decoding and other lengths
  use 'xla'); 'auto' picks one for the platform (`resolve_attention_impl`). Dropout on the attention
  probabilities exists only in the reference path (the fused kernels have no dropout);
  residual and embedding dropout apply with every implementation.

  With a sliding window the cache is a ring of `window` slots instead (`_update_ring`):
  decoding memory stays flat past the window.

  Decoding (`decode=True`, the Flax lm1b pattern): `model.init(..., decode=True)` on tokens of
  shape [batch, max_len] creates the 'cache' collection: cached_key/cached_value
  [batch, max_len, kv_heads, head_dim] (grouped-query attention caches only the kv heads),
  cached_segment_ids [batch, max_len] and cache_index (the
  number of slots written). Each later call writes its `length` new keys/values at cache_index
  (after RoPE, so cached keys are final), advances the index, and attends over the whole cache
  with a causal mask on cache slots: a multi-token prompt (prefill) and single-token steps use
  the same code. Writing past max_len is not detected (dynamic_update_slice clamps); callers
  size the cache for prompt + new tokens.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array | None,
               deterministic: bool, decode: bool, windowed: Array | None = None,
               value_embed: Array | None = None) -> Array:
    """value_embed [batch, length, kv_heads, head_dim]: model.value_embed's rows for these
    tokens, mixed into the values (a.v + b.rows, a and b this layer's, from 0.5 and 0.5).
    windowed: a traced bool scalar, given when this is the scanned layer of a model whose
    layers differ in window (model.window_layers): whether this layer uses sliding_window.
    Its KV cache then spans max_len (scanned layers share one cache shape) and the mask
    applies the window."""
    cfg = self.config
    ring = cfg.sliding_window and windowed is None  # decoding keeps a ring of window slots
    bias = cfg.use_bias or cfg.qkv_bias
    query = Dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"), cfg,
                  use_bias=bias, name="query")(x, deterministic)  # [batch, length, heads, head_dim]
    kv = functools.partial(Dense, (cfg.kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
                           cfg, use_bias=bias)
    key = kv(name="key")(x, deterministic)       # [batch, length, kv_heads, head_dim]
    value = kv(name="value")(x, deterministic)
    if value_embed is not None:  # (before the cache: cached values are final)
      mix = self.param("value_embed_scale", nn.with_logical_partitioning(
          nn.initializers.constant(0.5), (None,)), (2,), jnp.float32).astype(value.dtype)
      value = mix[0] * value + mix[1] * value_embed.astype(value.dtype)
    if cfg.qk_norm:  # per head, over head_dim, before the rotation (Qwen3, OLMo 2)
      query = Norm(cfg, kind="rmsnorm", axis="head_dim", name="query_norm")(query)
      key = Norm(cfg, kind="rmsnorm", axis="head_dim", name="key_norm")(key)
    if cfg.positional == "rope":
      query = apply_rope(query, positions, rope_frequencies(cfg))
      key = apply_rope(key, positions, rope_frequencies(cfg))
    if cfg.attention_multiplier != 1.0:  # muP's 1/head_dim scores (every kernel: 1/sqrt(d))
      query = query * jnp.asarray(cfg.attention_multiplier, query.dtype)
    query = nn.with_logical_constraint(checkpoint_name(query, "query"), HEADS_AXES)
    key = nn.with_logical_constraint(checkpoint_name(key, "key"), KV_HEADS_AXES)
    value = nn.with_logical_constraint(checkpoint_name(value, "value"), KV_HEADS_AXES)

    q_slots = jnp.arange(x.shape[1])  # [length]: where each query sits in the sequence
    k_slots, k_segment_ids = q_slots, segment_ids
    decoding = decode and self.has_variable("cache", "cached_key")
    if decoding:
      if segment_ids is None:
        segment_ids = jnp.ones(x.shape[:2], jnp.int32)
      if ring:  # the last `window` keys, then this call's keys
        key, value, k_segment_ids, k_slots, index = self._update_ring(key, value, segment_ids)
      else:
        key, value, k_segment_ids, index = self._update_cache(key, value, segment_ids)
        # Slots not written yet lie in the future: the causal mask hides them.
        k_slots = jnp.arange(key.shape[1])                     # [max_len]
      q_slots = index + q_slots  # the queries sit after the cached tokens
    elif decode:  # model.init(decode=True): allocate an empty cache sized by this input
      shape = key.shape
      if ring:  # (a window shorter than the cache: a ring of window slots)
        shape = (shape[0], min(shape[1], cfg.sliding_window)) + shape[2:]
      self._cache_variables(shape, key.dtype)
    causal = causal_mask(q_slots, k_slots, cfg.sliding_window, windowed)  # [1, 1, q, kv]
    segments = None if segment_ids is None else segment_mask(segment_ids, k_segment_ids)
    mask = causal if segments is None else causal & segments   # [batch, 1, q_len, kv_len]
    if cfg.prefix_length:
      key, value, mask = self._with_prefix(key, value, mask)

    impl = attention_kernel(cfg, x.shape[1], decoding=decoding)
    if impl == "reference":
      dropout_rng = None
      if not deterministic and cfg.dropout > 0.0:
        dropout_rng = self.make_rng("dropout")
      out = reference_attention(query, key, value, mask, dropout_rate=cfg.dropout,
                                dropout_rng=dropout_rng)
    elif impl in kernels.KERNELS:  # causal/local mask and segment ids inside the kernel
      kernel = lambda window: kernels.attention(impl, query, key, value, segment_ids,
                                                window=window)
      if windowed is None:
        out = kernel(cfg.sliding_window)
      else:  # the kernel's masks are static: compile both, run this layer's
        out = jax.lax.cond(windowed, lambda: kernel(cfg.sliding_window), lambda: kernel(0))
    elif decoding or windowed is not None or cfg.prefix_length:  # offset cache slots, a traced
      # window, or prefix slots: the mask
      out = jax.nn.dot_product_attention(query, key, value, mask=mask,
                                         implementation=impl)
    else:  # let the kernel build the causal part (cuDNN then skips the masked blocks)
      window = (cfg.sliding_window - 1, 0) if cfg.sliding_window else None
      out = jax.nn.dot_product_attention(query, key, value, mask=segments, is_causal=True,
                                         local_window_size=window, implementation=impl)
    if self.is_mutable_collection("intermediates") and not decoding:  # train.layer_stats_every
      self.sow("intermediates", "attention_logit_max", attention_logit_max(query, key, mask))
    out = checkpoint_name(out, "attention_out")  # [batch, length, heads, head_dim]
    return Dense((cfg.embed_dim,), ("heads", "head_dim", "embed"), cfg,
                 init_scale=residual_init_scale(cfg), name="out")(out, deterministic)

  def _with_prefix(self, key: Array, value: Array, mask: Array) -> tuple[Array, Array, Array]:
    """Prefix tuning (Li & Liang 2021): this layer's learned keys and values
    prefix_{key,value} [prefix_length, kv_heads, head_dim] go before key/value [batch, kv_len,
    kv_heads, head_dim], and every query sees them (whatever its segment or window): mask
    [batch or 1, 1, q_len, kv_len] -> [.., prefix_length + kv_len]. They are final keys and
    values (no rotation, norm or value mix: nothing positions them), not cached (they are
    params), drawn N(0, init_std) like the other weights (PEFT draws them at random too)."""
    cfg = self.config
    shape = (cfg.prefix_length, cfg.kv_heads, cfg.head_dim)
    init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                        (None, "kv_heads", "head_dim"))
    prefix = [jnp.broadcast_to(self.param(name, init, shape, jnp.float32).astype(like.dtype),
                               (like.shape[0],) + shape)
              for name, like in (("prefix_key", key), ("prefix_value", value))]
    key = jnp.concatenate([prefix[0], key], axis=1)
    value = jnp.concatenate([prefix[1], value], axis=1)
    seen = jnp.ones(mask.shape[:-1] + (cfg.prefix_length,), bool)
    return key, value, jnp.concatenate([seen, mask], axis=-1)

  def _cache_variables(self, shape: tuple[int, ...], dtype: Any):
    """The 'cache' variables; created as zeros for shape [batch, max_len, kv_heads, head_dim]."""
    zeros = lambda names: nn.with_logical_partitioning(jnp.zeros, names)
    return (self.variable("cache", "cached_key", zeros(CACHE_AXES), shape, dtype),
            self.variable("cache", "cached_value", zeros(CACHE_AXES), shape, dtype),
            self.variable("cache", "cached_segment_ids", zeros(("batch", "length")),
                          shape[:2], jnp.int32),
            self.variable("cache", "cache_index", zeros(()), (), jnp.int32))

  def _update_ring(self, key: Array, value: Array, segment_ids: Array):
    """Sliding-window decoding: the cache is a ring of R = min(max_len, window) slots; slot s
    of the sequence lives at ring entry s % R, so memory stays flat however long the
    generation. key/value [batch, length, kv_heads, head_dim] and segment_ids of this call
    are written (their last R), after the ring is read.

    Returns the keys and values to attend over [batch, R + length, kv_heads, head_dim] (the
    ring as it was, then this call's), their segment ids [batch, R + length] (-1 for ring
    entries never written, so no query sees them), their sequence slots [R + length], and
    the cache index before this write.
    """
    cached_key, cached_value, cached_segments, cache_index = self._cache_variables(
        key.shape, key.dtype)
    index, length = cache_index.value, key.shape[1]
    ring = cached_key.value.shape[1]
    entry = jnp.arange(ring)
    # The newest sequence slot below `index` that entry j holds (-1: none yet).
    held = jnp.where(index - 1 >= entry, entry + ring * ((index - 1 - entry) // ring), -1)
    keys = jnp.concatenate([cached_key.value.astype(key.dtype), key], axis=1)
    values = jnp.concatenate([cached_value.value.astype(value.dtype), value], axis=1)
    segments = jnp.concatenate([jnp.where(held >= 0, cached_segments.value, -1),
                                segment_ids.astype(jnp.int32)], axis=1)
    slots = jnp.concatenate([held, index + jnp.arange(length)])
    keep = min(length, ring)  # (static) only the last `ring` new slots stay
    at = (index + length - keep + jnp.arange(keep)) % ring   # distinct ring entries
    cached_key.value = cached_key.value.at[:, at].set(
        key[:, length - keep:].astype(cached_key.value.dtype))
    cached_value.value = cached_value.value.at[:, at].set(
        value[:, length - keep:].astype(cached_value.value.dtype))
    cached_segments.value = cached_segments.value.at[:, at].set(
        segment_ids[:, length - keep:].astype(jnp.int32))
    cache_index.value = index + length
    return keys, values, segments, slots, index

  def _update_cache(self, key: Array, value: Array, segment_ids: Array):
    """Writes key/value [batch, length, kv_heads, head_dim] and segment_ids at cache_index.

    Returns all cached keys and values [batch, max_len, kv_heads, head_dim] (in key's dtype),
    the cached segment ids [batch, max_len], and the cache index before this write.
    """
    cached_key, cached_value, cached_segments, cache_index = self._cache_variables(
        key.shape, key.dtype)
    index = cache_index.value
    cached_key.value = jax.lax.dynamic_update_slice(
        cached_key.value, key.astype(cached_key.value.dtype), (0, index, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, value.astype(cached_value.value.dtype), (0, index, 0, 0))
    cached_segments.value = jax.lax.dynamic_update_slice(
        cached_segments.value, segment_ids.astype(jnp.int32), (0, index))
    cache_index.value = index + key.shape[1]
    return (cached_key.value.astype(key.dtype), cached_value.value.astype(value.dtype),
            cached_segments.value, index)


# model.mlp -> the activation between fc and proj (the gated 'swiglu' has gate/up/down instead).
UNGATED_ACTIVATIONS = {"gelu": functools.partial(nn.gelu, approximate=True),
                       "relu2": lambda x: jnp.square(nn.relu(x))}


def residual_init_scale(config: ModelConfig) -> float:
  """init_std's multiplier for the projections into the residual stream (attention out, MLP
  proj/down): 1/sqrt(2 x num_layers) as GPT-2, or 0 with model.zero_init_residual (each block
  starts as the identity, modded-nanogpt's choice)."""
  return 0.0 if config.zero_init_residual else 1.0 / math.sqrt(2 * config.num_layers)


class Mlp(nn.Module):
  """Position-wise MLP: [batch, length, embed] -> [batch, length, embed].

  gelu (GPT-2): fc -> gelu (tanh approximation) -> proj.
  relu2 (Primer, modded-nanogpt): fc -> relu(.)^2 -> proj.
  swiglu (LLaMA): silu(gate(x)) * up(x) -> down.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    cfg = self.config
    dense_in = functools.partial(Dense, (cfg.mlp_dim,), ("embed", "mlp"), cfg)
    dense_out = functools.partial(Dense, (cfg.embed_dim,), ("mlp", "embed"), cfg,
                                  init_scale=residual_init_scale(cfg))
    if cfg.mlp in UNGATED_ACTIVATIONS:
      hidden = checkpoint_name(dense_in(name="fc")(x, deterministic), "mlp_in")  # [b, l, mlp]
      hidden = UNGATED_ACTIVATIONS[cfg.mlp](hidden)
      out_name = "proj"
    else:
      gate = checkpoint_name(dense_in(name="gate")(x, deterministic), "mlp_in")
      up = checkpoint_name(dense_in(name="up")(x, deterministic), "mlp_in")
      hidden = nn.silu(gate) * up
      out_name = "down"
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    return dense_out(name=out_name)(hidden, deterministic)


class Block(nn.Module):
  """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x)).

  x [batch, length, embed] -> (x [batch, length, embed], None). The (carry, output) pair lets
  the same module be the body of `nn.scan`.

  skips: what model.x0_skip / model.value_embed give every block, None when both are off:
  {'x0': the residual stream's start [batch, length, embed] (the block's input becomes
  a.x + b.x0, a and b this layer's, from 1 and 0), 'value_embed': the value table's rows
  [batch, length, kv_heads, head_dim] (see CausalSelfAttention)}.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array | None,
               skips: dict[str, Array] | None, deterministic: bool, decode: bool,
               windowed: Array | None = None) -> tuple[Array, None]:
    cfg = self.config
    skips = skips or {}
    if "x0" in skips:
      mix = self.param("x0_skip_scale", nn.with_logical_partitioning(
          lambda _, shape, dtype: jnp.array([1.0, 0.0], dtype), (None,)), (2,), jnp.float32)
      mix = mix.astype(x.dtype)
      x = mix[0] * x + mix[1] * skips["x0"]
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    h = Norm(cfg, name="attention_norm")(x)
    h = CausalSelfAttention(cfg, name="attention")(h, positions, segment_ids, deterministic,
                                                   decode, windowed, skips.get("value_embed"))
    x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    h = Norm(cfg, name="mlp_norm")(x)
    h = Mlp(cfg, name="mlp")(h, deterministic)
    x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    return nn.with_logical_constraint(x, ACTIVATION_AXES), None


def _block_class(config: ModelConfig, length: int | None = None) -> type[nn.Module]:
  """Block, wrapped in nn.remat and/or nn.scan as the config asks; `length`: the layers the
  scan runs (default all; a pipeline stage runs its share)."""
  block = Block
  if config.remat_policy != "none":
    # Arguments 5, 6 (counting self) are the Python bools deterministic and decode. Inside a
    # scan, CSE cannot merge the recomputation with the forward pass anyway, so prevent_cse
    # (which blocks some XLA optimizations) is only needed unscanned.
    block = nn.remat(block, prevent_cse=not config.scan_layers,
                     policy=CHECKPOINT_POLICIES[config.remat_policy], static_argnums=(5, 6))
  if config.scan_layers:
    # (+ each layer's `windowed` flag, scanned over, when the layers differ in window)
    per_layer = (0,) if config.window_pattern else ()
    block = nn.scan(block,
                    variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,) * 5 + per_layer,
                    length=length or config.num_layers,
                    unroll=min(config.scan_unroll, length or config.num_layers),
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return block


class Transformer(nn.Module):
  """GPT-style decoder: tokens [batch, length] int32 -> logits [batch, length, vocab] float32.

  positions [batch, length] int32: absolute position of each token (default arange(length));
    required with decode=True (e.g. cache_index + arange(length), or shifted for left padding).
  segment_ids [batch, length] int32: if given, tokens attend only within their segment (packed
    documents; e.g. 0 for padding). With decode=True they are cached, default 1.
  deterministic: False enables dropout (needs the 'dropout' rng).
  decode: use and update the 'cache' collection (apply with mutable=['cache']); see
    CausalSelfAttention and `init_cache`.
  return_hidden: return the final norm's output [batch, length, embed] (compute dtype; under
    muP already x 1/width multiplier, the output multiplier) instead of logits; the training
    loss applies the head itself (`lm_head` and jaxlm/loss.py), chunk by chunk, so the full
    logits never exist.

  pipeline_stages > 1 (the train step sets it from mesh.stage): the scanned layers run as a
  pipeline over that many stages in `pipeline_microbatches` microbatches (jaxlm/pipeline.py);
  the parameters are the same tree as without it. init and decoding run unpipelined.
  """
  config: ModelConfig
  pipeline_stages: int = 1
  pipeline_microbatches: int = 1

  @nn.compact
  def __call__(self, tokens: Array, *, positions: Array | None = None,
               segment_ids: Array | None = None, deterministic: bool = True,
               decode: bool = False, return_hidden: bool = False) -> Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    batch, length = tokens.shape
    if positions is None:
      if decode:
        raise ValueError("Transformer(decode=True) needs explicit positions [batch, length]: the "
                         "absolute position of each new token (e.g. cache_index + "
                         "arange(length)).")
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

    token_embed = self.param("token_embed", _normal(cfg.init_std, ("vocab", "embed")),
                             (cfg.vocab_size, cfg.embed_dim), jnp.float32)
    x = jnp.take(token_embed, tokens, axis=0).astype(dtype)  # [batch, length, embed]
    if cfg.positional == "learned":
      position_embed = self.param("position_embed", _normal(cfg.init_std, (None, "embed")),
                                  (cfg.max_seq_len, cfg.embed_dim), jnp.float32)
      x = x + jnp.take(position_embed, positions, axis=0).astype(dtype)
    elif cfg.positional == "sinusoidal":
      x = x + sinusoidal_positions(positions, cfg).astype(dtype)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    skips = {}  # what every block sees besides the residual stream (Block)
    if cfg.x0_skip:
      skips["x0"] = x
    if cfg.value_embed:
      value_table = self.param("value_embed", _normal(cfg.init_std,
                                                      ("vocab", "kv_heads", "head_dim")),
                               (cfg.vocab_size, cfg.kv_heads, cfg.head_dim), jnp.float32)
      skips["value_embed"] = nn.with_logical_constraint(
          jnp.take(value_table, tokens, axis=0).astype(dtype), KV_HEADS_AXES)
    skips = skips or None

    block = _block_class(cfg)
    if self.pipeline_stages > 1 and not decode and not self.is_initializing():
      x = self._pipelined_layers(x, positions, segment_ids, skips, deterministic)
    elif cfg.scan_layers:
      x, _ = block(cfg, name="layers")(x, positions, segment_ids, skips, deterministic, decode,
                                       *_window_flags(cfg))
    else:
      for i in range(cfg.num_layers):  # (each with its own window: model.window_layers)
        x, _ = block(cfg.for_layer(i), name=f"layers_{i}")(x, positions, segment_ids, skips,
                                                           deterministic, decode)

    x = Norm(cfg, name="final_norm")(x)
    if cfg.width_multiplier != 1.0:  # muP's output multiplier 1/m: logits = head(x / m)
      x = x * jnp.asarray(1.0 / cfg.width_multiplier, x.dtype)
    if return_hidden:
      return x
    if cfg.num_classes:  # classification: class logits at every position
      logits = Dense((cfg.num_classes,), ("embed", None), cfg, hidden=False,
                     name="classifier")(x)
      return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", None))
    if cfg.tie_embeddings:
      logits = jnp.einsum("bld,vd->blv", x, token_embed.astype(dtype),
                          preferred_element_type=jnp.float32)
    else:
      lm_head = self.param("lm_head", _normal(cfg.init_std, ("embed", "vocab")),
                           (cfg.embed_dim, cfg.vocab_size), jnp.float32)
      logits = jnp.einsum("bld,dv->blv", x, lm_head.astype(dtype),
                          preferred_element_type=jnp.float32)
    if cfg.logit_softcap:  # (jaxlm/loss.py applies the same to its chunks)
      logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def _pipelined_layers(self, x: Array, positions: Array, segment_ids: Array | None,
                        skips: dict[str, Array] | None, deterministic: bool) -> Array:
    """The scanned layers' params [num_layers, ...] applied through jaxlm.pipeline.run."""
    cfg, stages = self.config, self.pipeline_stages
    # parent=None: a free-standing module applied as a function on each stage's slice
    stage_block = _block_class(cfg, length=cfg.num_layers // stages)(cfg, parent=None)

    def stage_apply(layers, h, rows, rng):
      out, _ = stage_block.apply(
          {"params": layers["params"]}, h, rows["positions"], rows.get("segment_ids"),
          rows.get("skips"), deterministic, False, *layers["windowed"],
          rngs=None if deterministic else {"dropout": rng})
      return out
    rng = jax.random.key(0) if deterministic else self.make_rng("dropout")
    # What each microbatch's rows bring besides the residual stream (pipeline.run splits it).
    rows = {"positions": positions}
    if segment_ids is not None:
      rows["segment_ids"] = segment_ids
    if skips:
      rows["skips"] = skips
    # Each stage gets its layers' params and window flags (pipeline.run splits both).
    layers = {"params": nn.unbox(self.variables["params"]["layers"]),
              "windowed": _window_flags(cfg)}
    return pipeline.run(stage_apply, layers, x, rows, rng, stages, self.pipeline_microbatches)


def _window_flags(config: ModelConfig) -> tuple[Array, ...]:
  """(windowed [num_layers] bool,) for scanned layers that differ in window; else ()."""
  if not config.window_pattern:
    return ()
  windowed = config.windowed_layers()
  return (jnp.array([i in windowed for i in range(config.num_layers)]),)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def lm_head(params: PyTree, config: ModelConfig) -> tuple[Array, str]:
  """The language-model head of `params` and its layout for jaxlm.loss: the token table
  [vocab, embed] ('vd') when tied, else lm_head [embed, vocab] ('dv')."""
  if config.num_classes:
    raise ValueError("a classifier (model.num_classes > 0) has no language-model head.")
  if config.tie_embeddings:
    return params["token_embed"], "vd"
  return params["lm_head"], "dv"


def count_params(params: PyTree) -> int:
  """Number of scalars in a (possibly boxed, possibly abstract) parameter tree."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(params)))


def param_count(config: ModelConfig) -> int:
  """Parameter count from the config alone (equals count_params of the initialized model)."""
  d, v, bias = config.embed_dim, config.vocab_size, config.use_bias
  norm = d + (d if config.norm == "layernorm" and bias else 0)
  biased = lambda name: bias or (config.qkv_bias and name in ("query", "key", "value"))
  dense = sum(i * o + (o if biased(name) else 0)
              for name, (i, o) in _dense_shapes(config).items())
  dense += 2 * config.head_dim if config.qk_norm else 0  # (query_norm and key_norm scales)
  total = v * d + config.num_layers * (2 * norm + dense) + norm
  if config.x0_skip:
    total += 2 * config.num_layers
  if config.value_embed:
    total += v * config.kv_heads * config.head_dim + 2 * config.num_layers
  if config.positional == "learned":
    total += config.max_seq_len * d
  if config.num_classes:
    total += d * config.num_classes + (config.num_classes if bias else 0)
  elif not config.tie_embeddings:
    total += d * v
  prefix = 2 * config.prefix_length * config.kv_heads * config.head_dim
  return total + config.num_layers * (lora_params_per_layer(config) + prefix)


def _dense_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
  """(fan_in, fan_out) of every Dense layer of one block, by name."""
  d, m = config.embed_dim, config.mlp_dim
  q, kv = config.num_heads * config.head_dim, config.kv_heads * config.head_dim
  mlp = ({"fc": (d, m), "proj": (m, d)} if config.mlp in UNGATED_ACTIVATIONS
         else {"gate": (d, m), "up": (d, m), "down": (m, d)})
  return {"query": (d, q), "key": (d, kv), "value": (d, kv), "out": (q, d), **mlp}


def lora_params_per_layer(config: ModelConfig) -> int:
  """LoRA adapter parameters in one block: rank * (fan_in + fan_out) per adapted Dense."""
  shapes = _dense_shapes(config)
  return sum(config.lora_rank * sum(shapes[t]) for t in config.lora_targets if t in shapes)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), the PaLM / nanoGPT convention.

  6 * N + 12 * num_layers * seq_len * num_heads * head_dim, where N counts the matmul weights:
  the attention and MLP kernels and the LM head (tied or not: it is a matmul either way), but
  not the embedding lookups, position tables, biases or norms. The second term is the
  attention-score and weighted-sum matmuls over the full (unmasked) seq_len x seq_len square
  (or, with a sliding window, over the keys each query sees).
  """
  d = config.embed_dim
  keys = sum(min(seq_len, config.layer_window(i)) or seq_len for i in range(config.num_layers))
  dense = sum(i * o for i, o in _dense_shapes(config).values())
  matmul_params = (config.num_layers * (dense + lora_params_per_layer(config))
                   + d * (config.num_classes or config.vocab_size))
  return 6.0 * matmul_params + 12.0 * keys * config.num_heads * config.head_dim


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


_LAYERS_AXIS = {nn.PARTITION_NAME: "layers"}


def stack_layers(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Unscanned -> scanned layout for one collection (params, cache, or optimizer-state-like).

  {'layers_0': t0, ..., 'layers_{n-1}': t_{n-1}, ...} -> {'layers': stack of t_i on a new
  leading axis, ...}. Boxed leaves (nn.LogicallyPartitioned) get the 'layers' axis name.
  """
  keys = sorted((k for k in tree if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
  if not keys:
    raise ValueError("stack_layers: no 'layers_<i>' entries; is the tree already stacked?")

  def stack(*leaves):
    if _is_box(leaves[0]):
      stacked = jnp.stack([leaf.value for leaf in leaves])
      return leaves[0].replace_boxed(stacked).add_axis(0, _LAYERS_AXIS)
    return jnp.stack(leaves)

  out = {k: v for k, v in tree.items() if k not in keys}
  out["layers"] = jax.tree.map(stack, *[tree[k] for k in keys], is_leaf=_is_box)
  return out


def unstack_layers(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Scanned -> unscanned layout: the inverse of `stack_layers`."""
  if "layers" not in tree:
    raise ValueError("unstack_layers: no 'layers' entry; is the tree already unstacked?")
  stacked = tree["layers"]
  num_layers = jax.tree.leaves(nn.unbox(stacked))[0].shape[0]

  def take(i, leaf):
    if _is_box(leaf):
      return leaf.replace_boxed(leaf.value[i]).remove_axis(0, _LAYERS_AXIS)
    return leaf[i]

  out = {k: v for k, v in tree.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(functools.partial(take, i), stacked, is_leaf=_is_box)
  return out


def init_params(model: Transformer, rng: Array, tokens: Array) -> PyTree:
  """`model.init`'s params (boxed with logical axes), the same numbers whatever the layout: a
  scanned model (and so a pipelined one) gets the unscanned model's layers stacked, and
  rematerialization plays no part, so `scan_layers`, `remat_policy` and pipeline stages never
  change an experiment's starting point for a seed."""
  cfg = model.config
  plain = dataclasses.replace(cfg, scan_layers=False, remat_policy="none")
  params = model.clone(config=plain, parent=None).init({"params": rng}, tokens)["params"]
  return stack_layers(params) if cfg.scan_layers else params


def init_cache(config: ModelConfig, batch: int, max_len: int,
               dtype: Any | None = None) -> PyTree:
  """An empty KV cache for `batch` sequences of up to `max_len` tokens.

  The same tree as `model.init(rng, tokens[batch, max_len], positions=..., decode=True)['cache']`
  (boxed with logical axes: keys/values ('batch', 'length', 'heads', 'head_dim'), plus a leading
  'layers' axis when scanned), without initializing parameters. `dtype` sets the storage dtype
  of keys and values (default config.dtype). Use with
  `model.apply({'params': params, 'cache': cache}, tokens, positions=..., decode=True,
  mutable=['cache'])`.
  """
  model = Transformer(config)
  tokens = jnp.zeros((batch, max_len), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), tokens, positions=positions, decode=True))["cache"]

  def zeros(s: jax.ShapeDtypeStruct) -> Array:
    floating = jnp.issubdtype(s.dtype, jnp.floating)
    return jnp.zeros(s.shape, dtype if (dtype is not None and floating) else s.dtype)

  return jax.tree.map(zeros, shapes)


def apply_to_batch(model: Transformer, params: Any, batch: dict[str, jax.Array],
                   rng: jax.Array | None, *, document_mask: bool = True, **kwargs):
  """`model` on a batch dict (inputs, positions, segment_ids): dropout when `rng` is given;
  document_mask False: plain causal attention, ignoring batch["segment_ids"]."""
  rngs = {} if rng is None else {"dropout": rng}
  return model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                     segment_ids=batch["segment_ids"] if document_mask else None,
                     deterministic=rng is None, rngs=rngs, **kwargs)
