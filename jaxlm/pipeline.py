"""Pipeline parallelism over the `stage` mesh axis: a GPipe schedule in the shifting-buffer
form MaxText and praxis use.

The stacked layer parameters [num_layers, ...] (scan_layers) are viewed as
[stages, layers_per_stage, ...]: consecutive layers per stage. The 'layers' logical axis maps
to the 'stage' mesh axis (sharding.LOGICAL_RULES), so each stage's layers live only on its
devices. A batch is cut into `microbatches`; a buffer [stages, microbatch, length, embed] holds
what each stage works on. Each of microbatches + stages - 1 iterations, every stage applies its
layers to its slot at once (`vmap` over stages with `spmd_axis_name='stage'`: GSPMD runs slot s
on stage s's devices), then the buffer moves one stage on (`jnp.roll`, which XLA turns into a
collective permute) and stage 0 takes the next microbatch. The backward pass is autodiff
through the loop: all forwards, then all backwards (GPipe). Stage s is idle (computes on
zeros) for s iterations at the start and stages - 1 - s at the end: the bubble.

Why this form rather than shard_map + ppermute: it is ordinary jitted code under the same
logical-axis rules as the rest of the model, so data, fsdp and tensor sharding inside a stage,
remat policies, dropout and gradient accumulation compose without a second code path; XLA
emits the same collective permute a hand-written ppermute would.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def bubble_fraction(stages: int, microbatches: int) -> float:
  """Share of stage-iterations that compute nothing useful in GPipe: (S - 1) / (M + S - 1)."""
  return (stages - 1) / (microbatches + stages - 1)


def run(stage_apply: Callable[[Any, Array, Any, Array], Array], layer_params: Any,
        x: Array, rows: Any, rng: Array, stages: int, microbatches: int) -> Array:
  """x [batch, length, embed] through all layers, pipelined; returns [batch, length, embed].

  stage_apply(params [layers/stages, ...], h [mb, length, embed], rows_mb, rng) -> h: one
  stage's layers on one microbatch. rows: a pytree of what the layers read per row besides x,
  every leaf [batch, ...] (positions, segment ids, the model's skips); rows_mb: its microbatch
  [mb, ...]. layer_params: stacked [num_layers, ...] leaves. rng: a key, folded with the
  microbatch index so each microbatch gets its own dropout.
  """
  batch = x.shape[0]
  if batch % microbatches:
    raise ValueError(f"pipeline: batch {batch} is not divisible by {microbatches} "
                     f"microbatches (train.pipeline_microbatches).")

  def split(a: Array) -> Array:  # [batch, ...] -> [microbatches, batch / microbatches, ...]
    return a.reshape(microbatches, batch // microbatches, *a.shape[1:])
  xs, rows = split(x), jax.tree.map(split, rows)
  per_stage = jax.tree.map(lambda p: p.reshape(stages, p.shape[0] // stages, *p.shape[1:]),
                           layer_params)
  stage_ids = jnp.arange(stages)
  apply_all = jax.vmap(stage_apply, spmd_axis_name="stage")

  def iteration(carry: tuple[Array, Array], t: Array) -> tuple[tuple[Array, Array], None]:
    state, outputs = carry  # [stages, mb, length, embed], [microbatches, mb, length, embed]
    incoming = jnp.roll(state, 1, axis=0)  # stage s takes stage s - 1's last output
    first = jax.lax.dynamic_index_in_dim(xs, jnp.minimum(t, microbatches - 1), keepdims=False)
    incoming = incoming.at[0].set(jnp.where(t < microbatches, first, jnp.zeros_like(first)))
    held = t - stage_ids  # the microbatch each stage holds (outside [0, M): a bubble slot)
    index = jnp.clip(held, 0, microbatches - 1)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)
    stage_rows = jax.tree.map(lambda a: a[index], rows)  # [stages, mb, ...]
    state = apply_all(per_stage, incoming, stage_rows, keys)
    done = t - (stages - 1)  # the microbatch the last stage just finished
    slot = jnp.clip(done, 0, microbatches - 1)
    previous = jax.lax.dynamic_index_in_dim(outputs, slot, keepdims=False)
    outputs = jax.lax.dynamic_update_index_in_dim(
        outputs, jnp.where(done >= 0, state[-1], previous), slot, 0)
    return (state, outputs), None

  state = jnp.zeros((stages,) + xs.shape[1:], x.dtype)
  (_, outputs), _ = jax.lax.scan(iteration, (state, jnp.zeros_like(xs)),
                                 jnp.arange(microbatches + stages - 1))
  return outputs.reshape(x.shape)
