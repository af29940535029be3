"""jaxlm.loss: the chunked LM-head cross-entropy equals the materialized one, values and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import loss as loss_lib


def reference_sums(hidden, head, targets, weights, layout, softcap=0.0):
  """The plain computation: whole float32 logits, log-softmax, autodiff."""
  equation = "bld,vd->blv" if layout == "vd" else "bld,dv->blv"
  logits = jnp.einsum(equation, hidden, head.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)
  if softcap:
    logits = softcap * jnp.tanh(logits / softcap)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  nll = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights), jnp.sum(jnp.square(log_z) * weights)


def inputs(layout, length=24, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  batch, embed, vocab = 3, 16, 37
  hidden = jnp.asarray(rng.normal(size=(batch, length, embed)), dtype)
  shape = (vocab, embed) if layout == "vd" else (embed, vocab)
  head = jnp.asarray(rng.normal(size=shape) * 0.5, jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, size=(batch, length)), jnp.int32)
  weights = jnp.asarray(rng.random((batch, length)) > 0.3, jnp.float32)
  return hidden, head, targets, weights


@pytest.mark.parametrize("layout", ["vd", "dv"])
@pytest.mark.parametrize("chunk_size, length, softcap", [
    (8, 24, 0.0), (5, 24, 0.0), (0, 24, 0.0), (64, 24, 0.0), (8, 24, 2.0), (0, 24, 2.0)])
def test_chunked_equals_materialized_values_and_gradients(layout, chunk_size, length, softcap):
  """(softcap 2 bends these logits, whose scale is ~2, a lot: model.logit_softcap's gradient is
  tested where it matters)"""
  hidden, head, targets, weights = inputs(layout, length)
  z_loss = 1e-2

  def chunked(hidden, head):
    return loss_lib.cross_entropy_sums(hidden, head, targets, weights, layout=layout,
                                       chunk_size=chunk_size, z_loss=z_loss, softcap=softcap)

  def plain(hidden, head):
    nll, z = reference_sums(hidden, head, targets, weights, layout, softcap)
    return nll + z_loss * z, (nll, z)

  (value, nll), grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(
      hidden, head)
  (value_ref, (nll_ref, _)), grads_ref = jax.value_and_grad(
      plain, argnums=(0, 1), has_aux=True)(hidden, head)
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  np.testing.assert_allclose(nll, nll_ref, rtol=1e-5)
  for got, want in zip(grads, grads_ref):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(grads[0]).sum()) > 0 and float(jnp.abs(grads[1]).sum()) > 0
  # Without differentiation (evaluation) the chunked path computes the same sums.
  np.testing.assert_allclose(jax.jit(chunked)(hidden, head), (value_ref, nll_ref), rtol=1e-5)


def test_the_reported_nll_sum_carries_no_gradient():
  hidden, head, targets, weights = inputs("vd")
  for chunk_size in (0, 8):
    grad = jax.grad(lambda h, size=chunk_size: loss_lib.cross_entropy_sums(
        h, head, targets, weights, layout="vd", chunk_size=size)[1])(hidden)
    assert float(jnp.abs(grad).sum()) == 0.0


def test_the_chunked_gradient_needs_three_head_matmuls_not_four():
  """The gradient is formed in the forward pass: the step has the plain path's three matmuls
  (logits, d_hidden, d_head) and does not compute the logits a second time."""
  hidden, head, targets, weights = inputs("vd", length=32)
  grad = jax.grad(lambda h, w: loss_lib.cross_entropy_sums(
      h, w, targets, weights, layout="vd", chunk_size=8)[0], argnums=(0, 1))
  assert jax.jit(grad).lower(hidden, head).as_text().count("dot_general") == 3


def test_bfloat16_hidden_keeps_float32_loss_and_head_gradient():
  hidden, head, targets, weights = inputs("vd", dtype=jnp.bfloat16)
  grad = jax.grad(lambda h, w: loss_lib.cross_entropy_sums(
      h, w, targets, weights, layout="vd", chunk_size=8)[0], argnums=(0, 1))
  d_hidden, d_head = grad(hidden, head)
  assert d_hidden.dtype == jnp.bfloat16 and d_head.dtype == jnp.float32
  ref_hidden, ref_head = jax.grad(
      lambda h, w: reference_sums(h, w, targets, weights, "vd")[0], argnums=(0, 1))(hidden, head)
  np.testing.assert_allclose(np.asarray(d_head), np.asarray(ref_head), rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(d_hidden, np.float32), np.asarray(ref_hidden,
                                                                          np.float32),
                             rtol=5e-2, atol=2e-2)


def test_chunked_loss_never_materializes_whole_logits():
  """The compiled gradient's temporaries hold [batch, chunk, vocab], not [batch, length, vocab]."""
  batch, length, embed, vocab = 4, 512, 32, 4096
  hidden = jax.ShapeDtypeStruct((batch, length, embed), jnp.float32)
  head = jax.ShapeDtypeStruct((vocab, embed), jnp.float32)
  targets = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  weights = jax.ShapeDtypeStruct((batch, length), jnp.float32)
  full_logits_bytes = batch * length * vocab * 4

  def temp_bytes(chunk_size):
    grad = jax.jit(jax.grad(lambda h, w, t, m: loss_lib.cross_entropy_sums(
        h, w, t, m, layout="vd", chunk_size=chunk_size)[0], argnums=(0, 1)))
    return grad.lower(hidden, head, targets, weights).compile().memory_analysis() \
        .temp_size_in_bytes

  plain, chunked = temp_bytes(0), temp_bytes(64)
  assert plain >= full_logits_bytes
  assert chunked < full_logits_bytes / 2, (chunked, full_logits_bytes)


def test_bad_layout_is_refused():
  hidden, head, targets, weights = inputs("vd")
  with pytest.raises(ValueError, match="layout"):
    loss_lib.cross_entropy_sums(hidden, head, targets, weights, layout="x")
