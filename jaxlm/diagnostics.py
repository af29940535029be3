"""Per-layer statistics of a train step, to see which layer blew up (train.layer_stats_every).

`layer_stats` runs inside the compiled step (under a `lax.cond`, so only at the steps that
report them: every `train.layer_stats_every` steps and at every loss spike) and returns float32
scalars named for metrics.jsonl and TensorBoard:

  param_rms/GROUP, grad_rms/GROUP, update_rms/GROUP   root mean square per layer group: the
      token/position embeddings, layer_0 ... layer_{n-1}, final_norm, the head (grad and
      update only for the groups that train)
  attention_logit_max/layer_i   the largest q.k / sqrt(head_dim) a query may see, per layer
  max_logit                     the largest output logit (LM: at weighted positions;
                                classifier: the class logits it reads)

The activations come from one extra forward pass on the step's batch (its first microbatch
when `train.microbatches` > 1), with the params the step started from.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import loss as loss_lib
from jaxlm import params as params_lib
from jaxlm.config import Config
from jaxlm.model import lm_head


def _group(path: params_lib.Path) -> str:
  """The layer group of an unstacked param path: layers_3/... -> layer_3, else its top key."""
  return "layer_" + path[0][len("layers_"):] if path[0].startswith("layers_") else path[0]


def group_rms(tree: Mapping[str, Any]) -> dict[str, jax.Array]:
  """{group: RMS of all its arrays} of a params-shaped tree (scanned `layers` [num_layers, ...]
  split into one group per layer)."""
  sums: dict[str, jax.Array] = {}
  counts: dict[str, int] = {}

  def add(group: str, total: jax.Array, count: int) -> None:
    sums[group] = sums.get(group, 0.0) + total
    counts[group] = counts.get(group, 0) + count

  for path, leaf in params_lib.flatten(tree).items():
    squares = jnp.square(leaf.astype(jnp.float32))
    if path[0] == "layers":  # scanned: one slice per layer
      per_layer = jnp.sum(squares, axis=tuple(range(1, squares.ndim)))
      for i in range(squares.shape[0]):
        add(f"layer_{i}", per_layer[i], squares.size // squares.shape[0])
    else:
      add(_group(path), jnp.sum(squares), squares.size)
  return {group: jnp.sqrt(sums[group] / counts[group]) for group in sums}


def _attention_maxima(intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
  """{layer_i: value} of the sown attention_logit_max (scanned: one [num_layers] array)."""
  maxima = {}
  for path, (value,) in params_lib.flatten(intermediates).items():
    if path[0] == "layers":
      maxima.update({f"layer_{i}": value[i] for i in range(value.shape[0])})
    else:
      maxima[_group(path)] = value
  return maxima


def layer_stats(model: nn.Module, config: Config, params: Any, batch: Mapping[str, jax.Array],
                grads: Any, updates: Any) -> dict[str, jax.Array]:
  """The statistics above for one step: `params` the step started from, `grads` and `updates`
  (the trainable params' gradient and the optimizer's update, whether applied or not)."""
  cfg = config.model
  out, variables = model.apply(
      {"params": params}, batch["inputs"], positions=batch["positions"],
      segment_ids=batch["segment_ids"] if config.train.document_mask else None,
      return_hidden=not cfg.num_classes, mutable=["intermediates"])
  if cfg.num_classes:  # out: class logits [batch, length, classes], read at last_index
    last = jnp.take_along_axis(out, batch["last_index"][:, None, None], axis=1)[:, 0]
    largest = jnp.max(jnp.where(batch["row_weight"][:, None] > 0, last, -jnp.inf))
  else:  # out: hidden states [batch, length, embed]
    head, layout = lm_head(params, cfg)
    largest = loss_lib.max_logit(out, head, batch["weights"], layout=layout,
                                 chunk_size=config.train.loss_chunk_size)
  stats = {"max_logit": largest}
  for kind, tree in (("param_rms", params), ("grad_rms", grads), ("update_rms", updates)):
    stats.update({f"{kind}/{group}": value for group, value in group_rms(tree).items()})
  stats.update({f"attention_logit_max/{layer}": value
                for layer, value in _attention_maxima(variables["intermediates"]).items()})
  return {name: jax.lax.stop_gradient(value).astype(jnp.float32)
          for name, value in stats.items()}
