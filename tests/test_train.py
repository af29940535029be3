"""Train step: the loss it optimizes, microbatch accumulation, skipped non-finite steps, optim."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import config as config_lib
from jaxlm import optim, sharding
from jaxlm import steps as steps_lib
from jaxlm.model import Transformer
from tests.helpers import TINY, random_batch, run_steps


def tiny_config(**sections):
  values = {k: dict(v) for k, v in TINY.items()}
  for name, updates in sections.items():
    values.setdefault(name, {}).update(updates)
  return config_lib.validate(values)


@pytest.mark.parametrize("softcap", [0.0, 0.05])
def test_loss_is_mean_token_cross_entropy(softcap):
  """Of the model's logits (soft-capped by model.logit_softcap in both: 0.05 bends these
  logits hard)."""
  config = tiny_config(model={"logit_softcap": softcap})
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  steps = steps_lib.make_steps(config, mesh)
  state = steps.init(jax.random.PRNGKey(0))
  batch = random_batch(config)
  batch["weights"][:, :5] = 0  # padding never enters the loss
  logits = Transformer(config.model).apply({"params": state.params}, batch["inputs"],
                                          positions=batch["positions"],
                                          segment_ids=batch["segment_ids"])
  if softcap:
    assert softcap / 2 < jnp.abs(logits).max() <= np.float32(softcap)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  expected = float(jnp.sum(expected * batch["weights"]) / batch["weights"].sum())
  result = steps.eval(state.params, sharding.global_batch(batch, mesh))
  assert float(result["loss_sum"] / result["weight_sum"]) == pytest.approx(expected, rel=1e-6)
  assert float(result["weight_sum"]) == batch["weights"].sum()


def test_document_mask_off_attends_across_packed_documents():
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  params = steps_lib.make_steps(config, mesh).init(jax.random.PRNGKey(0)).params
  batch = random_batch(config)
  batch["segment_ids"][:, 8:] = 2   # two documents per window
  model = Transformer(config.model)

  def loss_sum(document_mask, segment_ids):
    b = dict(batch, segment_ids=segment_ids)
    return float(steps_lib.lm_loss(document_mask=document_mask)(model, params, b, None)[1]
                 ["loss_sum"])

  one_document = np.ones_like(batch["segment_ids"])
  masked, unmasked = loss_sum(True, batch["segment_ids"]), loss_sum(False, batch["segment_ids"])
  assert masked != pytest.approx(unmasked, rel=1e-4)
  assert unmasked == pytest.approx(loss_sum(True, one_document), rel=1e-6)
  off = tiny_config(train={"document_mask": False})
  assert float(steps_lib.loss_for(off)(model, params, batch, None)[1]["loss_sum"]) == \
      pytest.approx(unmasked, rel=1e-6)


def test_microbatches_equal_full_batch():
  state_full, losses_full = run_steps(tiny_config(), 3)
  state_micro, losses_micro = run_steps(tiny_config(train={"microbatches": 4}), 3)
  np.testing.assert_allclose(losses_micro, losses_full, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state_micro.params), jax.tree.leaves(state_full.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)  # Adam magnifies ~1e-9 grads


def test_loss_decreases_when_fitting_one_batch():
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  steps = steps_lib.make_steps(config, mesh)
  state = steps.init(jax.random.PRNGKey(0))
  batch = sharding.global_batch(random_batch(config), mesh)
  losses = []
  for _ in range(10):
    state, metrics = steps.train(state, batch)
    losses.append(float(metrics["train_loss"]))
  assert losses[-1] < losses[0] - 0.5


def test_nonfinite_step_is_skipped():
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  steps = steps_lib.make_steps(config, mesh)
  state = steps.init(jax.random.PRNGKey(0))
  before = jax.device_get(state)
  batch = random_batch(config)
  batch["weights"][0, 0] = np.nan
  state, metrics = steps.train(state, sharding.global_batch(batch, mesh))
  assert int(metrics["nonfinite"]) == 1
  assert int(state.step) == 1
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before.params)):
    np.testing.assert_array_equal(a, b)


def test_decay_mask_skips_biases_and_norms_even_when_scanned():
  for scan in (False, True):
    config = tiny_config(model={"scan_layers": scan})
    params = Transformer(config.model).init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, 8), jnp.int32))["params"]
    mask = jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]
    names = {jax.tree_util.keystr(p): m for p, m in mask}
    assert any(m for n, m in names.items() if "kernel" in n or "embed" in n)
    assert not any(m for n, m in names.items() if "bias" in n or "scale" in n)


@pytest.mark.parametrize("schedule", ["cosine", "constant", "wsd"])
def test_schedules(schedule):
  optim_config = config_lib.OptimConfig(schedule=schedule, learning_rate=1.0,
                                        min_learning_rate=0.1, warmup_steps=10,
                                        decay_fraction=0.2)
  lr = optim.make_schedule(optim_config, 100)
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  if schedule == "constant":
    assert float(lr(100)) == pytest.approx(1.0)
  else:
    assert float(lr(100)) == pytest.approx(0.1, abs=1e-6)
  if schedule == "wsd":
    assert float(lr(80)) == pytest.approx(1.0)
    assert float(lr(90)) == pytest.approx(0.55)


def test_preflight_names_bytes_and_knobs_in_one_line():
  config = tiny_config()
  steps_lib.check_fits(100, (200, "test memory"), config)  # fits: nothing happens
  steps_lib.check_fits(100, None, config)                   # unknown memory: nothing happens
  with pytest.raises(steps_lib.DoesNotFit) as info:
    steps_lib.check_fits(3 * 2**30, (2**30, "test memory"), config)
  message = str(info.value)
  assert "\n" not in message and "3.00 GiB" in message and "1.00 GiB" in message
  for knob in ("train.global_batch_size", "train.microbatches", "data.seq_len",
               "model.remat_policy", "model.dtype", "mesh.fsdp"):
    assert knob in message, knob


def test_compiled_step_bytes_and_cpu_memory_are_known():
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:2])
  steps = steps_lib.make_steps(config, mesh)
  compiled = steps.compile_train(steps.abstract_state, steps_lib.abstract_batch(config, mesh))
  memory = compiled.memory_analysis()
  assert steps_lib.step_bytes(compiled) >= memory.temp_size_in_bytes + memory.argument_size_in_bytes
  available, what = steps_lib.device_memory_bytes(mesh)
  assert available > 0 and "2 CPU devices" in what


def test_abstract_params_from_the_model_alone_match_the_train_state():
  """Restoring, importing and fine-tuning place params with `abstract_params` (no batch,
  optimizer or step): the same shapes, dtypes and shardings as the train state's."""
  config = tiny_config(model={"scan_layers": True, "num_classes": 3, "lora_rank": 2},
                       mesh={"data": 1, "fsdp": 4})
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
  ours = jax.tree_util.tree_flatten_with_path(steps_lib.abstract_params(config.model, mesh))[0]
  state = jax.tree_util.tree_flatten_with_path(
      steps_lib.make_steps(config, mesh).abstract_state.params)[0]
  assert [path for path, _ in ours] == [path for path, _ in state]
  for (path, a), (_, b) in zip(ours, state):
    assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding), path
  assert any(a.sharding.spec != jax.sharding.PartitionSpec() for _, a in ours)  # fsdp-sharded


def test_the_config_names_every_registered_schedule_and_optimizer():
  """config.py validates names without importing optax: its lists are the registries' keys."""
  assert set(config_lib.SCHEDULES) == set(optim.SCHEDULES)
  assert set(config_lib.OPTIMIZERS) == set(optim.OPTIMIZERS)
  with pytest.raises(config_lib.ConfigError, match="optim.name='sgd'"):
    config_lib.validate({"optim": {"name": "sgd"}})


def test_the_layout_knobs_never_change_the_initial_params():
  """scan_layers, remat_policy and pipeline stages start from the same numbers for a seed
  (before, a scanned model started elsewhere: step-1 loss 8.327 vs 8.336), so the first
  steps' losses agree too."""
  from jaxlm.model import unstack_layers
  plain_state, plain_losses = run_steps(tiny_config(), 2)
  state, losses = run_steps(tiny_config(model={"scan_layers": True}), 2)
  np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(unstack_layers(state.params)),
                       jax.tree.leaves(plain_state.params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

  def initial_params(config, devices):
    mesh = sharding.make_mesh(config.mesh, devices)
    params = steps_lib.make_steps(config, mesh).init(jax.random.PRNGKey(config.seed)).params
    params = jax.device_get(params)
    return unstack_layers(params) if config.model.scan_layers else params

  fresh = initial_params(tiny_config(), jax.devices()[:1])
  # Rematerialised, and pipeline stages (the scanned layout over mesh.stage).
  for config, devices in [
      (tiny_config(model={"scan_layers": True, "remat_policy": "full"}), 1),
      (tiny_config(model={"remat_policy": "dots_saveable"}), 1),
      (tiny_config(model={"scan_layers": True}, mesh={"stage": 2, "data": 1},
                   train={"pipeline_microbatches": 2}), 2)]:
    for got, want in zip(jax.tree.leaves(initial_params(config, jax.devices()[:devices])),
                         jax.tree.leaves(fresh)):
      np.testing.assert_array_equal(got, want)


# --- float16 with dynamic loss scaling --------------------------------------------------------

def test_float16_loss_scaling_skips_overflows_and_rescales():
  """A scale too large for float16 (2^40) overflows the gradients: the step is skipped (params
  unchanged), reported as an overflow, not as non-finite, and the scale halves until the
  gradients fit; then steps apply. loss_scale_period finite steps in a row double it."""
  # (no warmup: optax's schedule counts applied steps, so a warmup would make the first
  # applied step a zero-learning-rate one)
  config = tiny_config(model={"dtype": "float16"}, optim={"warmup_steps": 0},
                       train={"loss_scale_init": 2.0 ** 40, "loss_scale_period": 3})
  assert steps_lib.loss_scaling_on(config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  steps = steps_lib.make_steps(config, mesh)
  state = steps.init(jax.random.PRNGKey(0))
  batch = sharding.global_batch(random_batch(config), mesh)
  scales, overflows = [], []
  for _ in range(22):
    before = jax.device_get(state.params)
    state, metrics = steps.train(state, batch)
    scales.append(float(metrics["loss_scale"]))
    overflows.append(int(metrics["overflow"]))
    assert int(metrics["nonfinite"]) == 0
    changed = any(np.any(a != b) for a, b in zip(jax.tree.leaves(before),
                                                   jax.tree.leaves(jax.device_get(state.params))))
    assert changed == (not overflows[-1])
  first_fit = overflows.index(0)
  # 2^40 starts at the ceiling, 2^24, and halves at each overflow down to where float16 holds
  # the gradients (2^11 for this model)
  assert first_fit >= 8 and all(overflows[:first_fit])
  assert scales[:first_fit] == [2.0 ** (24 - i) for i in range(first_fit)]
  # After the first finite step: doubled after every 3 finite steps, halved at each overflow.
  for i in range(first_fit, len(scales) - 1):
    assert scales[i + 1] in (scales[i], scales[i] * 2, scales[i] / 2)
  assert sum(1 for o in overflows[first_fit:] if not o) >= 5


def test_float16_with_loss_scaling_trains_like_float32():
  """12 steps of the tiny model: float16 compute with dynamic loss scaling (the default for
  float16) follows float32's losses within 2%, as bfloat16 does. (Its first scale is one this
  model's gradients fit in, 2^7, so no step is skipped and the steps align; the overflow
  test above covers skipping.)"""
  same_rows = lambda config, step: random_batch(config, 0)  # (learnable: memorized)
  _, losses32 = run_steps(tiny_config(), 12, batch=same_rows)
  _, losses16 = run_steps(tiny_config(model={"dtype": "float16"},
                                      train={"loss_scale_init": 128.0}), 12, batch=same_rows)
  _, losses_bf16 = run_steps(tiny_config(model={"dtype": "bfloat16"}), 12, batch=same_rows)
  assert losses32[-1] < losses32[0] - 0.5  # it learns
  np.testing.assert_allclose(losses16, losses32, rtol=0.02)
  np.testing.assert_allclose(losses_bf16, losses32, rtol=0.02)
  assert not steps_lib.loss_scaling_on(tiny_config(model={"dtype": "bfloat16"}))
