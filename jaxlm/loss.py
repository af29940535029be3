"""The losses: the language-model head's cross-entropy without materializing [batch, length,
vocab] logits, and the losses tasks train with (`lm_loss`, `classifier_loss`, `loss_for`, at
the end).

The plain loss computes logits = hidden @ head as a float32 [batch, length, vocab] array, and
autodiff keeps it (and its log-softmax and gradient, more arrays of the same size) alive for
the backward pass: for GPT-2 (vocabulary 50,257) at batch 8 x 1,024 that is 1.6 GB per copy,
more than the whole model. Here the positions are cut into chunks of `chunk_size`, and each
chunk's logits exist only inside one iteration of a loop that computes, in the forward pass,
the loss AND its gradient: the loss is the last thing the step computes and its gradient is
linear in the one incoming cotangent (a scalar), so the chunk's gradient of the head and of
the hidden states can be formed while its logits are at hand and merely scaled in the backward
pass (a custom VJP). Memory O(batch x chunk_size x vocab); three head matmuls per chunk, as
plain autodiff needs (logits, d_hidden, d_head), instead of four when logits are recomputed.

Numerics: the matmuls run in the compute dtype of `hidden` (bfloat16 on accelerators) with
float32 accumulation; log-sum-exp, softmax and the loss are float32, as in the plain path.
The gradient of the logits is computed in closed form, `weight * (softmax - onehot(target))`
(+ the z-loss term), never through a gather or scatter.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxlm.config import Config
from jaxlm.model import Transformer, apply_to_batch, lm_head

DeviceBatch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# head_layout: how the head matrix is stored. 'vd': [vocab, embed] (tied embeddings, the token
# table); 'dv': [embed, vocab] (an untied lm_head).
_EQUATIONS = {"vd": "bld,vd->blv", "dv": "bld,dv->blv"}
_GRAD_HIDDEN = {"vd": "blv,vd->bld", "dv": "blv,dv->bld"}
_GRAD_HEAD = {"vd": "blv,bld->vd", "dv": "bld,blv->dv"}


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[batch, length, ...] -> [length / chunk, batch, chunk, ...] (length a multiple of chunk)."""
  batch, length = x.shape[:2]
  x = x.reshape((batch, length // chunk, chunk) + x.shape[2:])
  return jnp.swapaxes(x, 0, 1)


def _unchunk(x: jax.Array) -> jax.Array:
  """The inverse of `_chunks`."""
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _logits(hidden: jax.Array, head: jax.Array, layout: str, softcap: float = 0.0
            ) -> jax.Array:
  """hidden [batch, chunk, embed] (compute dtype) -> float32 logits [batch, chunk, vocab];
  softcap > 0: softcap * tanh(logits / softcap) (model.logit_softcap, as the model applies)."""
  logits = jnp.einsum(_EQUATIONS[layout], hidden, head.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)
  return softcap * jnp.tanh(logits / softcap) if softcap else logits


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits [batch, length, vocab] float32, targets [batch, length] -> (nll, log Z), each
  [batch, length] float32: nll = log Z - the target's logit, log Z = logsumexp over the vocab.
  (Also for scoring logits a caller already has; training never builds them whole.)"""
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_z - target_logits, log_z


def _forward_chunk(hidden, head, targets, weights, layout, z_loss, softcap):
  """The chunk's objective sum (weighted nll + z_loss * log Z^2), its weighted nll sum, its
  log Z [batch, chunk] and its (soft-capped) logits [batch, chunk, vocab] float32."""
  logits = _logits(hidden, head, layout, softcap)
  nll, log_z = token_losses(logits, targets)
  nll_sum = jnp.sum(nll * weights)
  objective = nll_sum + z_loss * jnp.sum(jnp.square(log_z) * weights)
  return objective, nll_sum, log_z, logits


def _scan_chunks(hidden, head, targets, weights, chunk, layout, z_loss, softcap, with_grads):
  """(objective, nll sum) over all chunks; with_grads: also d objective / d hidden
  [batch, length, embed] (compute dtype) and / d head (float32, head's shape)."""
  vocab = head.shape[0] if layout == "vd" else head.shape[1]
  compute_head = head.astype(hidden.dtype)

  def body(carry, xs):
    hidden_c, targets_c, weights_c = xs
    objective, nll_sum, log_z, logits = _forward_chunk(hidden_c, head, targets_c, weights_c,
                                                       layout, z_loss, softcap)
    sums = (carry[0] + objective, carry[1] + nll_sum)
    if not with_grads:
      return (*sums, carry[2]), None
    probs = jnp.exp(logits - log_z[..., None])
    onehot = targets_c[..., None] == jnp.arange(vocab, dtype=targets_c.dtype)
    # d(nll)/d(logits) = softmax - onehot; d(log Z^2)/d(logits) = 2 log Z softmax.
    d_logits = (probs - onehot) + (2.0 * z_loss) * log_z[..., None] * probs
    if softcap:  # through softcap * tanh(raw / softcap): x (1 - tanh^2)
      d_logits = d_logits * (1.0 - jnp.square(logits / softcap))
    d_logits = (d_logits * weights_c[..., None]).astype(hidden.dtype)
    d_hidden = jnp.einsum(_GRAD_HIDDEN[layout], d_logits, compute_head,
                          preferred_element_type=jnp.float32).astype(hidden.dtype)
    d_head = carry[2] + jnp.einsum(_GRAD_HEAD[layout], *(
        (d_logits, hidden_c) if layout == "vd" else (hidden_c, d_logits)),
        preferred_element_type=jnp.float32)
    return (*sums, d_head), d_hidden

  zero = jnp.zeros([], jnp.float32)
  d_head = jnp.zeros(head.shape if with_grads else (), jnp.float32)
  (objective, nll_sum, d_head), d_hidden = jax.lax.scan(
      body, (zero, zero, d_head),
      (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(weights, chunk)))
  if not with_grads:
    return objective, nll_sum
  return objective, nll_sum, _unchunk(d_hidden), d_head


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _chunked_sums(hidden, head, targets, weights, chunk: int, layout: str, z_loss: float,
                  softcap: float):
  return _scan_chunks(hidden, head, targets, weights, chunk, layout, z_loss, softcap,
                      with_grads=False)


def _chunked_fwd(hidden, head, targets, weights, chunk, layout, z_loss, softcap):
  objective, nll_sum, d_hidden, d_head = _scan_chunks(hidden, head, targets, weights, chunk,
                                                      layout, z_loss, softcap, with_grads=True)
  return (objective, nll_sum), (d_hidden, d_head.astype(head.dtype), weights)


def _chunked_bwd(chunk, layout, z_loss, softcap, residuals, cotangents):
  # The nll sum leaves through stop_gradient (see cross_entropy_sums): only the objective's
  # cotangent flows back.
  d_hidden, d_head, weights = residuals
  d_objective, _ = cotangents
  return ((d_objective * d_hidden).astype(d_hidden.dtype),
          (d_objective * d_head).astype(d_head.dtype), None, jnp.zeros_like(weights))


_chunked_sums.defvjp(_chunked_fwd, _chunked_bwd)


def cross_entropy_sums(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                       weights: jax.Array, *, layout: str, chunk_size: int = 0,
                       z_loss: float = 0.0, softcap: float = 0.0
                       ) -> tuple[jax.Array, jax.Array]:
  """(objective, nll sum): float32 scalars, objective = sum of weight * (nll + z_loss * log Z^2)
  (what training differentiates), nll sum = sum of weight * nll (reported; no gradient).

  hidden [batch, length, embed] in the compute dtype (the final norm's output); head [vocab,
  embed] (layout 'vd') or [embed, vocab] ('dv'); targets [batch, length] int; weights [batch,
  length] float. nll = log Z - logit of the target, log Z = logsumexp over the vocabulary;
  softcap > 0: the logits are softcap * tanh(logits / softcap) first (model.logit_softcap).

  chunk_size > 0: positions in chunks of that many (at most the length), logits never whole
  and the gradient formed in the forward pass (see the module doc); a length that is not a
  multiple is padded with weight-0 positions. chunk_size 0: the plain computation with its
  autodiff gradient (the reference the chunked path is tested against).
  """
  if layout not in _EQUATIONS:
    raise ValueError(f"layout={layout!r}: must be 'vd' or 'dv'.")
  if chunk_size <= 0:
    objective, nll_sum, _, _ = _forward_chunk(hidden, head, targets, weights, layout, z_loss,
                                              softcap)
    return objective, jax.lax.stop_gradient(nll_sum)
  chunk_size, (hidden, targets, weights) = _padded(chunk_size, hidden, targets, weights)
  objective, nll_sum = _chunked_sums(hidden, head, targets, weights.astype(jnp.float32),
                                     chunk_size, layout, float(z_loss), float(softcap))
  return objective, jax.lax.stop_gradient(nll_sum)


def _padded(chunk_size: int, *arrays: jax.Array) -> tuple[int, list[jax.Array]]:
  """(chunk size at most the length, [batch, length, ...] arrays padded with zeros to a
  multiple of it): zero weights keep the padding out of every sum and maximum."""
  length = arrays[0].shape[1]
  chunk_size = min(chunk_size, length)
  pad = -length % chunk_size
  widths = lambda x: ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)
  return chunk_size, [jnp.pad(x, widths(x)) if pad else x for x in arrays]


def max_logit(hidden: jax.Array, head: jax.Array, weights: jax.Array, *, layout: str,
              chunk_size: int = 0) -> jax.Array:
  """The largest logit at positions of weight > 0: float32 scalar, chunk by chunk as the loss
  (hidden, head, weights as in `cross_entropy_sums`), before any soft cap (what the cap
  tames). A diagnostic: no gradient."""
  hidden = jax.lax.stop_gradient(hidden)
  chunk_size, (hidden, weights) = _padded(chunk_size or hidden.shape[1], hidden, weights)

  def body(carry, xs):
    hidden_c, weights_c = xs
    logits = jnp.where(weights_c[..., None] > 0, _logits(hidden_c, head, layout), -jnp.inf)
    return jnp.maximum(carry, jnp.max(logits)), None

  largest, _ = jax.lax.scan(body, jnp.float32(-jnp.inf),
                            (_chunks(hidden, chunk_size), _chunks(weights, chunk_size)))
  return largest


# -- The losses tasks train with ------------------------------------------------------------

# A loss function: (model, params, batch, dropout rng or None) -> (objective, sums), where
# `objective` is the sum to differentiate and `sums` holds at least "loss_sum" and "weight_sum"
# (plus any other sums a task reports, e.g. "correct"). Sums, not means, so microbatches add up
# to exactly the full-batch gradient; the step divides by the total weight.
LossFn = Callable[[Transformer, Any, DeviceBatch, "jax.Array | None"], tuple[jax.Array, Metrics]]


def lm_loss(z_loss: float = 0.0, chunk_size: int = 0, document_mask: bool = True) -> LossFn:
  """Next-token cross-entropy weighted per token by batch["weights"] (pretraining: 1 on real
  tokens; instruction tuning: 1 on response tokens only), + z_loss * log Z^2.

  The model returns hidden states and `jaxlm.loss` applies the head in chunks of `chunk_size`
  positions (0: all at once), so [batch, length, vocab] logits are never materialized.
  document_mask False: tokens attend across the documents packed into a window (see
  `train.document_mask`).
  """
  def loss(model, params, batch, rng):
    hidden = apply_to_batch(model, params, batch, rng, document_mask=document_mask,
                    return_hidden=True)
    head, layout = lm_head(params, model.config)
    weights = batch["weights"]
    objective, nll_sum = cross_entropy_sums(
        hidden, head, batch["targets"], weights, layout=layout, chunk_size=chunk_size,
        z_loss=z_loss, softcap=model.config.logit_softcap)
    return objective, {"loss_sum": nll_sum, "weight_sum": jnp.sum(weights)}
  return loss


def class_logits(model: Transformer, params: Any, batch: DeviceBatch,
                 rng: jax.Array | None = None) -> jax.Array:
  """The class logits [batch, classes] at each row's last real token (batch["last_index"])."""
  logits = apply_to_batch(model, params, batch, rng)              # [batch, length, classes]
  return jnp.take_along_axis(logits, batch["last_index"][:, None, None], axis=1)[:, 0]


def classifier_loss(model: Transformer, params: Any, batch: DeviceBatch, rng: jax.Array | None
                    ) -> tuple[jax.Array, Metrics]:
  """Cross-entropy of the class logits read at each row's last real token (batch["last_index"]
  [batch]) against batch["labels"] [batch], rows weighted by batch["row_weight"] (0: padding).
  sums: loss_sum, weight_sum, correct (weighted count of right predictions)."""
  return classifier_sums(class_logits(model, params, batch, rng), batch)


def classifier_sums(last: jax.Array, batch: DeviceBatch) -> tuple[jax.Array, Metrics]:
  """`classifier_loss` from the class logits [batch, classes] at the rows' last real tokens."""
  log_probs = jax.nn.log_softmax(last.astype(jnp.float32))
  nll = -jnp.take_along_axis(log_probs, batch["labels"][:, None], axis=1)[:, 0]
  weight = batch["row_weight"]
  correct = (jnp.argmax(last, axis=-1) == batch["labels"]).astype(jnp.float32)
  loss_sum = jnp.sum(nll * weight)
  return loss_sum, {"loss_sum": loss_sum, "weight_sum": jnp.sum(weight),
                    "correct": jnp.sum(correct * weight)}


def regression_loss(model: Transformer, params: Any, batch: DeviceBatch, rng: jax.Array | None
                    ) -> tuple[jax.Array, Metrics]:
  """Squared error of a one-output head (model.num_classes=1) read at each row's last real
  token (batch["last_index"]) against batch["score"] [batch] float: the train step divides the
  sum by the rows' weight (batch["row_weight"], 0: padding), so it minimises the mean squared
  error. sums: loss_sum, weight_sum."""
  return regression_sums(class_logits(model, params, batch, rng), batch)


def regression_sums(last: jax.Array, batch: DeviceBatch) -> tuple[jax.Array, Metrics]:
  """`regression_loss` from the head's outputs [batch, 1] at the rows' last real tokens."""
  error = last[:, 0].astype(jnp.float32) - batch["score"].astype(jnp.float32)
  weight = batch["row_weight"]
  loss_sum = jnp.sum(jnp.square(error) * weight)
  return loss_sum, {"loss_sum": loss_sum, "weight_sum": jnp.sum(weight)}


def loss_for(config: Config) -> LossFn:
  """The loss a config trains with: the regression head's when model.num_classes is 1, the
  classifier's when it is more, else the LM's."""
  if config.model.num_classes == 1:
    return regression_loss
  if config.model.num_classes:
    return classifier_loss
  return lm_loss(config.train.z_loss, config.train.loss_chunk_size, config.train.document_mask)
