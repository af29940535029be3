"""Cross-entropy of the language-model head without materializing [batch, length, vocab] logits.

The plain loss computes logits = hidden @ head as a float32 [batch, length, vocab] array, and
autodiff keeps it (and its log-softmax and gradient, more arrays of the same size) alive for
the backward pass: for GPT-2 (vocabulary 50,257) at batch 8 x 1,024 that is 1.6 GB per copy,
more than the whole model. Here the positions are cut into chunks of `chunk_size`; each chunk's
logits exist only inside one iteration of a loop, in the forward pass and again, recomputed,
in the backward pass (a custom VJP): memory O(batch x chunk_size x vocab), at the price of
one more [chunk, embed] x [embed, vocab] matmul per chunk.

Numerics: the matmul runs in the compute dtype of `hidden` (bfloat16 on accelerators) with
float32 accumulation; log-sum-exp, softmax and the loss are float32, as in the plain path.
The gradient of the logits is computed in closed form, `weight * (softmax - onehot(target))`
(+ the z-loss term), never through a gather or scatter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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


def _logits(hidden: jax.Array, head: jax.Array, layout: str) -> jax.Array:
  """hidden [batch, chunk, embed] (compute dtype) -> float32 logits [batch, chunk, vocab]."""
  return jnp.einsum(_EQUATIONS[layout], hidden, head.astype(hidden.dtype),
                    preferred_element_type=jnp.float32)


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits [batch, length, vocab] float32, targets [batch, length] -> (nll, log Z), each
  [batch, length] float32: nll = log Z - the target's logit, log Z = logsumexp over the vocab.
  (Also for scoring logits a caller already has; training never builds them whole.)"""
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_z - target_logits, log_z


def _forward_chunk(hidden, head, targets, weights, layout):
  """Sums of weighted nll and weighted log Z^2 of one chunk, and its log Z [batch, chunk]."""
  nll, log_z = token_losses(_logits(hidden, head, layout), targets)
  nll_sum = jnp.sum(nll * weights)
  z_sum = jnp.sum(jnp.square(log_z) * weights)
  return nll_sum, z_sum, log_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_sums(hidden, head, targets, weights, chunk: int, layout: str):
  sums, _ = _chunked_forward(hidden, head, targets, weights, chunk, layout)
  return sums


def _chunked_forward(hidden, head, targets, weights, chunk, layout):
  def body(carry, xs):
    hidden_c, targets_c, weights_c = xs
    nll_sum, z_sum, log_z = _forward_chunk(hidden_c, head, targets_c, weights_c, layout)
    return (carry[0] + nll_sum, carry[1] + z_sum), log_z

  zero = jnp.zeros([], jnp.float32)
  sums, log_z = jax.lax.scan(body, (zero, zero), (_chunks(hidden, chunk),
                                                  _chunks(targets, chunk),
                                                  _chunks(weights, chunk)))
  return sums, log_z  # log_z [num_chunks, batch, chunk]


def _chunked_fwd(hidden, head, targets, weights, chunk, layout):
  sums, log_z = _chunked_forward(hidden, head, targets, weights, chunk, layout)
  return sums, (hidden, head, targets, weights, log_z)


def _chunked_bwd(chunk, layout, residuals, cotangents):
  hidden, head, targets, weights, log_z = residuals
  d_nll, d_z = cotangents
  vocab = head.shape[0] if layout == "vd" else head.shape[1]
  compute_head = head.astype(hidden.dtype)

  def body(d_head, xs):
    hidden_c, targets_c, weights_c, log_z_c = xs
    logits = _logits(hidden_c, head, layout)                           # [batch, chunk, vocab]
    probs = jnp.exp(logits - log_z_c[..., None])
    onehot = targets_c[..., None] == jnp.arange(vocab, dtype=targets_c.dtype)
    # d(nll)/d(logits) = softmax - onehot; d(log Z^2)/d(logits) = 2 log Z softmax.
    d_logits = (d_nll * (probs - onehot) + (2.0 * d_z) * log_z_c[..., None] * probs)
    d_logits = (d_logits * weights_c[..., None]).astype(hidden.dtype)
    d_hidden = jnp.einsum(_GRAD_HIDDEN[layout], d_logits, compute_head,
                          preferred_element_type=jnp.float32).astype(hidden.dtype)
    d_head = d_head + jnp.einsum(_GRAD_HEAD[layout], *(
        (d_logits, hidden_c) if layout == "vd" else (hidden_c, d_logits)),
        preferred_element_type=jnp.float32)
    return d_head, d_hidden

  d_head, d_hidden = jax.lax.scan(
      body, jnp.zeros(head.shape, jnp.float32),
      (_chunks(hidden, chunk), _chunks(targets, chunk), _chunks(weights, chunk), log_z))
  return (_unchunk(d_hidden), d_head.astype(head.dtype), None, jnp.zeros_like(weights))


_chunked_sums.defvjp(_chunked_fwd, _chunked_bwd)


def cross_entropy_sums(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                       weights: jax.Array, *, layout: str, chunk_size: int = 0
                       ) -> tuple[jax.Array, jax.Array]:
  """(sum of weight * nll, sum of weight * log Z^2), both float32 scalars.

  hidden [batch, length, embed] in the compute dtype (the final norm's output); head [vocab,
  embed] (layout 'vd') or [embed, vocab] ('dv'); targets [batch, length] int; weights [batch,
  length] float. nll = log Z - logit of the target, log Z = logsumexp over the vocabulary.

  chunk_size > 0: positions in chunks of that many, logits never whole (see the module doc);
  a length that is not a multiple is padded with weight-0 positions. chunk_size 0 (or >=
  length): one chunk, i.e. the plain computation with its autodiff gradient.
  """
  if layout not in _EQUATIONS:
    raise ValueError(f"layout={layout!r}: must be 'vd' or 'dv'.")
  length = hidden.shape[1]
  if chunk_size <= 0 or chunk_size >= length:
    nll_sum, z_sum, _ = _forward_chunk(hidden, head, targets, weights, layout)
    return nll_sum, z_sum
  pad = -length % chunk_size
  if pad:
    widths = lambda x: ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)
    hidden = jnp.pad(hidden, widths(hidden))
    targets = jnp.pad(targets, widths(targets))
    weights = jnp.pad(weights, widths(weights))
  return _chunked_sums(hidden, head, targets, weights.astype(jnp.float32), chunk_size, layout)
