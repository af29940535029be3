"""Pipeline parallelism (mesh.stage): the same losses and parameters as one device, alone and
combined with data, fsdp and tensor parallelism; checkpoints move between stage counts; bad
settings are one-line errors."""

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import pipeline, sharding
from jaxlm import run as run_lib
from jaxlm import steps as steps_lib
from jaxlm.config import ConfigError
from tests.helpers import packed_batch
from tests.helpers import run_steps as train_steps

TINY = {"model": {"num_layers": 4, "num_heads": 2, "embed_dim": 32, "mlp_dim": 64,
                  "vocab_size": 96, "max_seq_len": 16, "scan_layers": True},
        "data": {"seq_len": 16, "stride": 16},
        "train": {"global_batch_size": 16, "num_steps": 10, "pipeline_microbatches": 4},
        "optim": {"warmup_steps": 2, "learning_rate": 1e-2}}


def tiny_config(mesh=None, **sections):
  values = {k: dict(v) for k, v in TINY.items()}
  values["mesh"] = dict(mesh or {"data": 1})
  for name, updates in sections.items():
    values.setdefault(name, {}).update(updates)
  return config_lib.validate(values)


def random_batch(config, seed):
  """Two packed documents per row: segment ids and positions restart at position 9."""
  return packed_batch(config, seed, cut=9)


def run_steps(config, num_steps, devices):
  return train_steps(config, num_steps, devices, batch=random_batch)


@pytest.fixture(scope="module")
def one_device():
  return run_steps(tiny_config(), 3, jax.devices()[:1])


@pytest.fixture(scope="module")
def two_stages():
  """3 steps on stage 2 x data 4 (shared by the equality and checkpoint tests)."""
  return run_steps(tiny_config({"stage": 2, "data": 4}), 3, jax.devices()[:8])


@pytest.mark.parametrize("mesh", [{"stage": 2, "data": 4}, {"stage": 4, "data": 2},
                                  {"stage": 2, "fsdp": 2, "tensor": 2}])
def test_pipelined_training_equals_one_device(one_device, two_stages, mesh):
  """Each remat policy on one mesh (none; dots_with_no_batch_dims_saveable on stage 4; full on
  the last, which also accumulates gradients over 2 microbatches, each in 2 pipeline
  microbatches): the same losses still."""
  reference_state, reference_losses = one_device
  if mesh == {"stage": 2, "data": 4}:
    state, losses = two_stages
  else:
    extra = ({"train": {"microbatches": 2, "pipeline_microbatches": 2},
              "model": {"remat_policy": "full"}} if "tensor" in mesh
             else {"model": {"remat_policy": "dots_with_no_batch_dims_saveable"}})
    state, losses = run_steps(tiny_config(mesh, **extra), 3, jax.devices()[:8])
  np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference_state.params)):
    # (Adam normalizes ~1e-7 gradient noise)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=1e-5)


def test_grouped_query_attention_with_a_window_qk_norm_and_skips_equals_one_device_in_stages():
  """The Llama/Qwen/Mistral attention (1 kv head for 2 query heads, qk-norm, a 5-token window
  inside the packed documents) with modded-nanogpt's x0 skip and value embeddings (each
  microbatch's rows of them reach every stage) through stage 2 x fsdp 2 x data 2: the losses
  of one device."""
  modern = {"num_kv_heads": 1, "qk_norm": True, "sliding_window": 5, "positional": "rope",
            "norm": "rmsnorm", "mlp": "swiglu", "use_bias": False, "x0_skip": True,
            "value_embed": True}
  _, want = run_steps(tiny_config(model=modern), 2, jax.devices()[:1])
  _, got = run_steps(tiny_config({"stage": 2, "fsdp": 2, "data": 2}, model=modern), 2,
                     jax.devices()[:8])
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("policy", ["dots_saveable", "save_attention_out", "minimal"])
def test_the_other_remat_policies_train_the_same_through_the_pipeline(one_device, policy):
  """Step 2's loss depends on step 1's gradients, which each policy recomputes differently."""
  _, reference_losses = one_device
  _, losses = run_steps(tiny_config({"stage": 2, "data": 4}, model={"remat_policy": policy}),
                        2, jax.devices()[:8])
  np.testing.assert_allclose(losses, reference_losses[:2], rtol=1e-5)


def test_layers_live_on_their_stage_only():
  config = tiny_config({"stage": 4, "data": 2})
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
  params = steps_lib.abstract_params(config.model, mesh)
  kernel = params["layers"]["mlp"]["fc"]["kernel"]  # [layers, embed, mlp]
  assert kernel.sharding.spec[0] == "stage"
  assert kernel.sharding.shard_shape(kernel.shape)[0] == 1  # 4 layers over 4 stages


def test_bubble_fraction():
  assert pipeline.bubble_fraction(1, 8) == 0.0
  assert pipeline.bubble_fraction(4, 4) == pytest.approx(3 / 7)


@pytest.mark.parametrize("overrides, message", [
    ({"mesh": {"stage": 3, "data": 1}}, "model.num_layers=4 is not divisible by mesh.stage=3"),
    ({"mesh": {"stage": 2, "data": 1}, "model": {"scan_layers": False}},
     "mesh.stage=2 needs model.scan_layers=true"),
    ({"mesh": {"stage": 2, "data": 1}, "train": {"pipeline_microbatches": 3}},
     "train.pipeline_microbatches=3 must divide"),
    ({"mesh": {"stage": 0, "data": 1}}, "mesh.stage=0"),
    ({"mesh": {"stage": -1, "data": 1}}, "mesh.stage=-1: give the number of pipeline stages"),
])
def test_bad_pipeline_settings_are_one_line_errors(overrides, message):
  values = {k: dict(v) for k, v in TINY.items()}
  for name, updates in overrides.items():
    values.setdefault(name, {}).update(updates)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(values)


def test_a_checkpoint_moves_between_stage_counts(two_stages, tiny_lm_run, tmp_path):
  """Written from a stage=2 x data=4 run, restored on one device and on stage=4 x data=2: the
  same values (the parameter tree does not depend on the stage count)."""
  config = tiny_config({"stage": 2, "data": 4})
  state, _ = two_stages
  tokenizer = run_lib.open_run(tiny_lm_run).tokenizer
  workdir = str(tmp_path / "run")
  run_lib.write_files(workdir, config, tokenizer)
  checkpointer = run_lib.checkpointer(workdir, async_save=False)
  checkpointer.save(1, {"params": state.params}, {}, config_lib.to_dict(config), tokenizer)
  checkpointer.wait()
  run = run_lib.open_run(workdir)
  for mesh_config, devices in ((config_lib.MeshConfig(data=1), jax.devices()[:1]),
                               (config_lib.MeshConfig(stage=4, data=2), jax.devices()[:8])):
    restored = run_lib.restore_params(run, sharding.make_mesh(mesh_config, devices))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state.params)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert restored["layers"]["mlp"]["fc"]["kernel"].sharding.spec[0] == "stage"


def test_pipeline_errors_found_with_the_mesh():
  config = tiny_config({"stage": 2, "data": 4}, train={"pipeline_microbatches": 8})
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
  with pytest.raises(ConfigError, match=r"2 rows per pipeline microbatch, not divisible by mesh "
                                        r"data x fsdp = 4"):
    steps_lib.make_steps(config, mesh)
  with pytest.raises(ConfigError, match="the mesh has 2 pipeline stages but mesh.stage=1"):
    steps_lib.make_steps(tiny_config(), mesh)
  with pytest.raises(ConfigError, match="2 rows per pipeline microbatch"):
    sharding.check_batch(config.train, mesh)


def test_processes_holding_the_same_rows_read_the_same_rows():
  """4 processes x 2 devices as stage 2 x data 4: processes 0 and 2 (stage 0 and 1) hold data
  blocks 0-1, processes 1 and 3 blocks 2-3: two groups of two."""
  holders = [(device // 2, (device % 4)) for device in range(8)]
  assert sharding.row_groups(holders, {}) == {0: (0, 2), 1: (1, 2), 2: (0, 2), 3: (1, 2)}
  # Data parallelism across processes alone: every process is its own group.
  assert sharding.row_groups([(d // 4, d) for d in range(8)], {}) == {0: (0, 2), 1: (1, 2)}
  with pytest.raises(ConfigError, match="overlapping or unequal shares of the batch rows"):
    sharding.row_groups([(0, 0), (0, 1), (1, 1), (1, 2)], {"data": 3})


def test_dropout_runs_through_the_pipeline(one_device):
  """A dropout key per microbatch inside the pipeline: a finite loss that differs from the same
  step without dropout (same init and batch; without dropout they agree to 1e-5)."""
  config = tiny_config({"stage": 2, "data": 1}, model={"dropout": 0.1})
  _, losses = run_steps(config, 1, jax.devices()[:2])
  assert np.isfinite(losses[0]) and not np.isclose(losses[0], one_device[1][0], rtol=1e-5)
