"""Config validation: every bad value is one ConfigError naming the field."""

import pytest

from jaxlm import config as config_lib
from jaxlm.config import ConfigError


def test_defaults_validate_and_hash():
  config = config_lib.validate(config_lib.default_config_dict())
  assert hash(config) == hash(config_lib.validate(config_lib.default_config_dict()))
  assert config_lib.from_dict(config_lib.to_dict(config)) == config


@pytest.mark.parametrize("overrides, field", [
    ({"model": {"num_heads": 5}}, "model.num_heads"),
    ({"model": {"positional": "learned"}, "data": {"seq_len": 512}}, "data.seq_len"),
    ({"train": {"loss_chunk_size": -1}}, "train.loss_chunk_size"),
    ({"train": {"global_batch_size": 10, "microbatches": 4}}, "train.global_batch_size"),
    ({"train": {"num_steps": 0}}, "train.num_steps"),
    ({"train": {"global_batch_size": -2}}, "train.global_batch_size"),
    ({"optim": {"learning_rate": 0.0}}, "optim.learning_rate"),
    ({"optim": {"learning_rate": -1e-3}}, "optim.learning_rate"),
    ({"model": {"num_layerz": 2}}, "model.num_layerz"),
    ({"modle": {"num_layers": 2}}, "modle"),
    ({"model": {"positional": "alibi"}}, "model.positional"),
    ({"model": {"num_layers": "four"}}, "model.num_layers"),
    ({"data": {"corpus": "text_files"}}, "data.files"),
    ({"data": {"corpus": "tfds"}}, "data.tfds_name"),
    ({"mesh": {"data": -1, "fsdp": -1}}, "mesh"),
    ({"model": {"dropout": 0.1, "attention_impl": "xla"}}, "model.dropout"),
])
def test_bad_values_name_the_field(overrides, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as info:
    config_lib.validate(overrides)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("positional", config_lib.POSITIONALS)
def test_seq_len_beyond_the_context_is_refused_for_every_positional(positional):
  """rope/sinusoidal/none have no position table, yet a window longer than max_seq_len is still
  refused: generation, evaluation and memory plans size everything by max_seq_len (a rope run
  with data.seq_len=100000 used to pass validation and die out of memory)."""
  with pytest.raises(ConfigError, match=r"data\.seq_len=100000.*model\.max_seq_len=256"):
    config_lib.validate({"data": {"seq_len": 100000}, "model": {"positional": positional}})


def test_diff_lists_changed_leaves():
  base = config_lib.to_dict(config_lib.validate(config_lib.Config()))
  new = config_lib.to_dict(config_lib.replace(config_lib.Config(), model={"num_layers": 2}))
  assert config_lib.diff(base, new) == {"model.num_layers": {"from": 4, "to": 2}}


def test_override_and_choice_messages_say_what_is_valid():
  values = config_lib.to_dict(config_lib.Config())
  with pytest.raises(ConfigError, match=r"unknown config key 'epochs'; top-level keys are: data, "
                     r"finetune, mesh, model, optim, seed, train \(a key in a section is written "
                     r"section\.key"):
    config_lib.apply_overrides(values, {"epochs": 3})
  with pytest.raises(ConfigError, match=r"finetune\.trainable='bogus': must be one of '', head,"):
    config_lib.validate({"finetune": {"trainable": "bogus"}})


@pytest.mark.parametrize("overrides, message", [
    ({"seed": -5}, r"seed=-5: must be in \[0, 2\*\*32\)"),
    ({"seed": 2**40}, r"seed=1099511627776: must be in"),
    ({"optim": {"weight_decay": float("nan")}}, r"optim\.weight_decay=nan: must be a finite"),
    ({"optim": {"learning_rate": float("inf")}}, r"optim\.learning_rate=inf: must be a finite"),
    ({"model": {"rope_theta": 0.0}}, r"model\.rope_theta=0\.0: must be positive"),
    ({"model": {"prefix_length": -2}}, r"model\.prefix_length=-2: must be >= 0"),
    ({"model": {"prefix_length": 4, "lora_rank": 8}},
     r"model\.prefix_length=4 and model\.lora_rank=8: .* set one of them to 0"),
    ({"model": {"prefix_length": 4}, "finetune": {"trainable": "head"}},
     r"finetune\.trainable='head' conflicts with model\.prefix_length=4"),
    ({"finetune": {"trainable": "prefix"}},
     r"finetune\.trainable='prefix' needs prefixes: set --config\.model\.prefix_length"),
])
def test_values_that_would_fail_mid_run_are_refused(overrides, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(overrides)


def test_sampling_needs_room_for_a_prompt():
  config = config_lib.validate({"model": {"max_seq_len": 64}, "data": {"seq_len": 64,
                                                                       "stride": 64}})
  with pytest.raises(ConfigError, match=r"train\.sample_max_new_tokens=64 leaves no room for a "
                     r"prompt in model\.max_seq_len=64"):
    config_lib.check_sampling(config)
  config_lib.check_sampling(config_lib.replace(config, train={"sample_max_new_tokens": 0}))


def test_the_stride_follows_seq_len_and_ignored_data_keys_are_refused():
  """Overriding data.seq_len used to keep a stride of 256: at seq_len 64, 3/4 of the tokens
  were never trained on. data.files without corpus=text_files trained on the default corpus."""
  data = config_lib.validate({"model": {"max_seq_len": 64}, "data": {"seq_len": 64}}).data
  assert data.stride == 0 and data.window_stride == 64
  config_lib.check_training_data(data)
  overlap = config_lib.validate({"model": {"max_seq_len": 64},
                                 "data": {"seq_len": 64, "stride": 32}}).data
  assert overlap.window_stride == 32
  for values, message in [
      ({"seq_len": 64, "stride": 128}, r"data\.stride=128 exceeds data\.seq_len=64: the tokens "
                                       r"between windows would never be trained on"),
      ({"files": "/data/*.txt"}, r"data\.files is read only with data\.corpus='text_files' "
                                 r"\(data\.corpus='pystdlib' ignores it\)"),
      ({"corpus": "text_files", "files": "a.txt", "tfds_name": "x"},
       r"data\.tfds_name is read only with data\.corpus='tfds'")]:
    data = config_lib.validate({"data": values}).data
    with pytest.raises(ConfigError, match=message):
      config_lib.check_training_data(data)
  with pytest.raises(ConfigError, match=r"data\.stride=-1: must be >= 0"):
    config_lib.validate({"data": {"stride": -1}})


def test_replace_checks_like_validate_and_section_dicts_update_fields():
  """replace() set raw values (tie_embeddings='false' trained a tied model that config.json
  then read back as untied); a section given as a dict replaced the whole section."""
  config = config_lib.validate({"train": {"global_batch_size": 4}})
  assert config_lib.replace(config, model={"tie_embeddings": "false"}).model.tie_embeddings is False
  assert config_lib.replace(config, train={"sample_prompts": "def f("}).train.sample_prompts == (
      "def f(",)
  for sections, message in [({"model": {"num_layers": 2.5}}, r"model\.num_layers=2\.5: expected"),
                            ({"model": {"num_layer": 2}},
                             r"'model\.num_layer'; did you mean model\.num_layers"),
                            ({"modle": {"num_layers": 2}}, r"no section 'modle'")]:
    with pytest.raises(ConfigError, match=message):
      config_lib.replace(config, **sections)
  values = config_lib.apply_overrides(config_lib.to_dict(config), {"train": {"num_steps": 7}})
  assert values["train"]["num_steps"] == 7 and values["train"]["global_batch_size"] == 4


def test_numpy_values_and_non_dicts():
  import numpy as np
  config = config_lib.validate({"model": {"num_layers": np.int64(2), "dropout": np.float32(0.5)}})
  assert config.model.num_layers == 2 and type(config.model.num_layers) is int
  assert config_lib.plain({"grid": list(np.arange(1, 3))}) == {"grid": [1, 2]}
  for value in (None, "configs/default.py"):
    with pytest.raises(ConfigError, match=r"a config is a dict, ConfigDict or Config, not"):
      config_lib.validate(value)


def test_every_shipped_config_validates():
  """configs/*.py: each one's get_config() is a valid config (the speedrun's Muon settings
  included)."""
  import importlib
  import pathlib
  names = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent / "configs").glob("*.py"))
  assert {"speedrun_cpu", "default", "adamw_cpu"} <= set(names)
  recipes = {}
  for name in names:
    config = config_lib.validate(importlib.import_module(f"configs.{name}").get_config())
    recipes[name] = (config.optim.name, config.train.global_batch_size, config.train.num_steps)
  # The speedrun won, so it is the default; the AdamW baseline is the schema's defaults.
  assert recipes["default"] == recipes["speedrun_cpu"] == ("muon", 16, 300)
  assert recipes["adamw_cpu"] == ("adamw", 8, 500)
