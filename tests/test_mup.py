"""model.parametrization=mup (width transfer): at its base width it is the standard
parametrization exactly; away from it the hidden matrices start narrower, the logits are scaled
by 1/m and the matrices' AdamW learning rate divided by m, so that what a step does to the
network's outputs no longer grows with width (muP's "coordinate check"); bad settings are one
line; a muP model at another width is not exported as a Hugging Face family."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import optim
from jaxlm.convert import core as convert_core

VOCAB, LENGTH = 256, 32


def config_at(width, parametrization="mup", base=64, **model_values):
  return config_lib.validate({
      "model": {"num_layers": 2, "num_heads": 4, "embed_dim": width, "mlp_dim": 4 * width,
                "vocab_size": VOCAB, "max_seq_len": LENGTH, "parametrization": parametrization,
                "mup_base_width": base, **model_values},
      "data": {"seq_len": LENGTH},
      "optim": {"learning_rate": 1e-2, "warmup_steps": 0, "schedule": "constant",
                "grad_clip": 0.0, "weight_decay": 0.0}})


def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (8, LENGTH)))


def logit_change_after_steps(config, num_steps=5):
  """RMS of (logits after num_steps AdamW steps - logits at init) on a fixed batch."""
  model, batch = model_lib.Transformer(config.model), tokens()
  params = nn.unbox(model.init(jax.random.PRNGKey(0), batch)["params"])
  optimizer = optim.make_optimizer(config.optim, 100, config.model.width_multiplier)
  state = optimizer.init(params)

  def loss(p):
    logits = model.apply({"params": p}, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  @jax.jit
  def step(p, s):
    updates, s = optimizer.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  before = model.apply({"params": params}, batch)
  for _ in range(num_steps):
    params, state = step(params, state)
  return float(jnp.std(model.apply({"params": params}, batch) - before))


def test_at_its_base_width_mup_is_the_standard_parametrization():
  standard, mup = config_at(64, "standard"), config_at(64, "mup", base=64)
  assert mup.model.width_multiplier == mup.model.attention_multiplier == 1.0
  assert logit_change_after_steps(mup, 2) == logit_change_after_steps(standard, 2)


def test_mup_scales_init_logits_attention_and_the_matrices_learning_rate():
  config = config_at(256, base=64)  # m = 4
  model = config.model
  assert model.width_multiplier == 4.0
  assert model.attention_multiplier == pytest.approx((16 / 64) ** 0.5)  # scores: 4/64 = sqrt(16)/64
  params = nn.unbox(model_lib.Transformer(model).init(jax.random.PRNGKey(0), tokens())["params"])
  # Hidden matrices at init_std / sqrt(m) (the residual projections also / sqrt(2 L)), the
  # embedding at init_std.
  assert float(jnp.std(params["layers_0"]["mlp"]["fc"]["kernel"])) == pytest.approx(
      0.02 / 2, rel=0.05)
  assert float(jnp.std(params["layers_0"]["mlp"]["proj"]["kernel"])) == pytest.approx(
      0.02 / 2 / 2, rel=0.05)
  assert float(jnp.std(params["token_embed"])) == pytest.approx(0.02, rel=0.05)
  # The logits are the tied head applied to final_norm's output / m.
  hidden = model_lib.Transformer(model).apply({"params": params}, tokens(), return_hidden=True)
  logits = model_lib.Transformer(model).apply({"params": params}, tokens())
  np.testing.assert_allclose(logits, jnp.einsum("bld,vd->blv", hidden, params["token_embed"]),
                             rtol=1e-5, atol=1e-6)
  # AdamW's matrices learn at 1/m, everything else at 1; Muon's matrices are left alone.
  assert optim.ParamGroups(config.optim, 4.0).multipliers == {"matrices": 0.25}
  muon = config_lib.validate({"optim": {"name": "muon"}}).optim
  assert optim.ParamGroups(muon, 4.0).multipliers == {}
  fixed_heads = config_at(256, base=64, head_size=16, num_heads=16)
  assert fixed_heads.model.attention_multiplier == 1.0  # the head width does not grow


def test_coordinate_check_a_steps_effect_on_the_logits_does_not_grow_with_width():
  """muP's coordinate check (Yang et al., Tensor Programs V, fig. 5): after a few AdamW steps at
  one learning rate, the logits move ~in proportion to width under the standard parametrization
  (measured 0.57, 1.14, 2.35, 3.90 at widths 64-512) and by the same amount under muP (0.57,
  0.57, 0.53, 0.55)."""
  standard = [logit_change_after_steps(config_at(w, "standard")) for w in (64, 256)]
  mup = [logit_change_after_steps(config_at(w, "mup")) for w in (64, 256)]
  assert standard[1] / standard[0] > 3, standard  # (4.1 measured over this 4x of width)
  assert 0.7 < mup[1] / mup[0] < 1.4, mup  # (0.93 measured)


@pytest.mark.parametrize("values, message", [
    ({"parametrization": "mup"}, r"model.parametrization=mup needs model.mup_base_width"),
    ({"parametrization": "mup", "mup_base_width": 2, "num_heads": 4},
     r"model.mup_base_width=2 is narrower than model.num_heads=4"),
    ({"parametrization": "mu-p"}, r"model.parametrization='mu-p'"),
    ({"logit_softcap": -1.0}, r"model.logit_softcap"),
])
def test_bad_mup_settings_are_one_line(values, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate({"model": values})


def test_a_mup_model_away_from_its_base_is_not_exported_as_a_family():
  with pytest.raises(convert_core.ConvertError, match=r"model.parametrization=mup at embed_dim "
                                                      r"256 != mup_base_width 64"):
    convert_core.family_for(config_at(256, base=64).model)
  with pytest.raises(convert_core.ConvertError, match=r"model.logit_softcap=30.0"):
    convert_core.family_for(config_lib.validate({"model": {"logit_softcap": 30.0}}).model)
