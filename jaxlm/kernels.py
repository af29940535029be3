"""Pallas flash-attention kernels that take document (segment) masks natively.

`attention_impl='splash'`: TPU splash attention (jax.experimental.pallas.ops.tpu). Causal or
sliding-window masks are described to the kernel as mask objects, so it skips the blocks they
rule out; segment ids keep packed documents apart inside the kernel; grouped-query attention
is native (query head h reads kv head h // (heads / kv_heads)). It never holds the
[batch, heads, q_len, kv_len] scores that XLA's attention does on TPU.

`attention_impl='triton'`: the GPU flash kernel jax ships (jax.experimental.pallas.ops.gpu),
causal with segment ids; kv heads are repeated for grouped-query attention (the kernel has no
grouping), and it has no sliding window.

Both run in Pallas interpret mode on CPU, which is how the tests check them against
`model.reference_attention` (values and gradients). Under a mesh they run per device inside
`jax.shard_map` (a Pallas call is one custom call that XLA cannot partition): batch split like
the activations ('batch' -> data x fsdp), heads like the kernels ('heads' -> tensor), by the
logical-axis rules in force.

Shapes: query [batch, length, heads, head_dim], key/value [batch, length, kv_heads, head_dim],
segment_ids [batch, length] int or None -> [batch, length, heads, head_dim].
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# (The Pallas kernels are imported where they are used: ~90 ms that every process importing the
# model, test subprocesses and scripts included, would otherwise pay without using them.)

Array = jax.Array

# Splash tiles along q and kv; its kv compute tile must be a multiple of the TPU lane width
# (128), so it takes lengths that are multiples of 128, in the largest tile that divides them.
SPLASH_BLOCKS = (512, 256, 128)
TRITON_BLOCK = 128  # the GPU kernel's q and kv tile (jax's default)


def splash_block(length: int) -> int | None:
  """The splash tile for a sequence of `length` tokens, or None when it takes no tile."""
  return next((b for b in SPLASH_BLOCKS if length % b == 0), None)


def supports(impl: str, length: int, sliding_window: int = 0) -> bool:
  """Whether kernel `impl` ('splash' or 'triton') runs a full-sequence attention of `length`
  tokens; callers use XLA's attention otherwise (short prompts, decoding against a cache)."""
  if impl == "splash":
    return splash_block(length) is not None
  if impl == "triton":
    return not sliding_window and (length <= TRITON_BLOCK or length % TRITON_BLOCK == 0)
  raise ValueError(f"no Pallas kernel named {impl!r}")


def _splash_kernel(length: int, heads: int, window: int, interpret: bool):
  """A splash kernel for one sequence: q [heads, length, head_dim], k/v [kv_heads, length,
  head_dim]. Built in the trace that uses it: its block tables become constants of that trace
  (jax caches the numpy work of processing the mask into them)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  shape = (length, length)
  # LocalMask's window counts keys to the left of the query: window - 1 of them plus itself.
  mask = (masks.LocalMask(shape, window_size=(window - 1, 0), offset=0) if window
          else masks.CausalMask(shape))
  block = splash_block(length)
  blocks = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(masks.MultiHeadMask([mask] * heads), block_sizes=blocks,
                                head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(query: Array, key: Array, value: Array, segment_ids: Array | None, *,
                  window: int, interpret: bool) -> Array:
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  batch, length, heads, head_dim = query.shape
  kernel = _splash_kernel(length, heads, window, interpret)
  # The kernel takes one sequence, heads first, and does not scale the scores.
  query = (query * (1.0 / math.sqrt(head_dim))).astype(query.dtype)
  to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)    # [batch, heads, length, head_dim]

  def one(q, k, v, ids):
    return kernel(q, k, v, segment_ids=None if ids is None else splash.SegmentIds(ids, ids))

  ids = None if segment_ids is None else segment_ids.astype(jnp.int32)
  out = jax.vmap(one)(to_heads_first(query), to_heads_first(key), to_heads_first(value), ids)
  return to_heads_first(out)


def _triton_local(query: Array, key: Array, value: Array, segment_ids: Array | None, *,
                  window: int, interpret: bool) -> Array:
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention
  del window  # refused by `supports` / the config
  group = query.shape[2] // key.shape[2]
  if group > 1:
    key, value = jnp.repeat(key, group, axis=2), jnp.repeat(value, group, axis=2)
  block = min(TRITON_BLOCK, query.shape[1])
  blocks = gpu_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=block,
                                    block_kv_dkv=block, block_q_dq=block, block_kv_dq=block)
  ids = None if segment_ids is None else segment_ids.astype(jnp.int32)
  return gpu_attention.mha(query, key, value, ids, sm_scale=1.0 / math.sqrt(query.shape[-1]),
                           causal=True, block_sizes=blocks, interpret=interpret)


_LOCAL = {"splash": _splash_local, "triton": _triton_local}
KERNELS = tuple(_LOCAL)  # the attention_impl values this module runs


def attention(impl: str, query: Array, key: Array, value: Array, segment_ids: Array | None, *,
              window: int = 0) -> Array:
  """Causal (sliding-`window` when > 0) attention by Pallas kernel `impl`, per device under the
  current mesh. On CPU devices the kernel runs in Pallas' interpreter."""
  mesh = jax.sharding.get_abstract_mesh()
  # The mesh's devices, not the host's backend: the planner compiles for TPUs from a CPU host.
  platform = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
  local = functools.partial(_LOCAL[impl], window=window, interpret=platform == "cpu")
  if mesh.empty or all(size == 1 for size in mesh.shape.values()):
    return local(query, key, value, segment_ids)
  if segment_ids is None:  # shard_map wants arrays: all tokens in one segment
    segment_ids = jnp.ones(query.shape[:2], jnp.int32)
  specs = [_spec(names, x.shape, mesh) for names, x in (
      (("batch", "length", "heads", "head_dim"), query),
      (("batch", "length", "kv_heads", "head_dim"), key),
      (("batch", "length", "kv_heads", "head_dim"), value),
      (("batch", "length"), segment_ids))]
  return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=specs[0],
                       check_vma=False)(query, key, value, segment_ids)


def _spec(names: tuple[str, ...], shape: tuple[int, ...], mesh) -> jax.sharding.PartitionSpec:
  """The partition spec the logical-axis rules give `names`, with every dimension its mesh axes
  do not divide left whole (as XLA's sharding propagation would: e.g. the one-row batch that
  initialises the parameters)."""
  spec = nn.logical_to_mesh_axes(names)
  kept = []
  for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    ways = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
    kept.append(axes if size % ways == 0 else None)
  return jax.sharding.PartitionSpec(*kept)
