"""Test setup: 8 simulated CPU devices (set before jax is imported anywhere)."""

import os
import sys

_USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
# This process: 8 simulated devices, and LLVM at -O0 without XLA's expensive passes. The test
# processes compile hundreds of small programs and run each a few times: -O0 (XLA's HLO passes
# still run) cuts their compile time by a third.
# Also for subprocesses that compile much and run little (sweeps of 8-step runs, the planner).
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0"
                          " --xla_llvm_disable_expensive_passes=true")
os.environ["XLA_FLAGS"] = (_USER_XLA_FLAGS + " --xla_force_host_platform_device_count=8 "
                           + FAST_COMPILE_XLA_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, REPO)


# pylint: disable=wrong-import-position  (the device flags above come first)
import json  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxlm.model import Transformer  # noqa: E402

jax.devices()  # starts the backend: XLA has read the flags above (it reads them once)
# The scripts and multi-process jobs the tests start get one CPU device (unless a test asks for
# more: multi-process tests do) and compile at -O0: most run a dozen steps, where compiling
# dominates (a 12-step pretraining run: 8.4 s instead of 10.3 s). Runs of hundreds of steps
# (fine-tuning's learning checks, the notebooks) get XLA's defaults back, USER_XLA_FLAGS: at -O0
# those run 1.6x slower, and on 8 simulated devices 1.8x slower (measured on the fine-tuning
# runs).
USER_XLA_FLAGS = _USER_XLA_FLAGS
os.environ["XLA_FLAGS"] = (_USER_XLA_FLAGS + " " + FAST_COMPILE_XLA_FLAGS).strip()


def random_params(model_config, seed: int = 1, boxed: bool = False):
  """Params of `model_config` (adapters and heads included) with N(0, 0.2) values, norm scales
  1 + N(0, 0.2), drawn with numpy: no XLA compile per initializer, and non-zero biases, scales
  and lora_b exercise more of the model than a fresh init. boxed: keep the logical-axis boxes."""
  shapes = jax.eval_shape(lambda: Transformer(model_config).init(
      jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray((rng.normal(0.0, 0.2, s.shape)
                                   + ("scale" in jax.tree_util.keystr(path))).astype(np.float32)),
      shapes if boxed else nn.unbox(shapes))

@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory):
  """One data.data_dir (prepared corpora, tokenizers, JAX's compilation cache) for the whole
  test run, as on a user's machine: tests that train on the embedded corpus with the same
  settings prepare it once, not once per file. Under pytest-xdist every worker gets the same
  folder (the workers' temp folders share a parent); preparation is file-locked in jaxlm."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  path = root / "jaxlm_cache"
  path.mkdir(exist_ok=True)
  return path


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(shared_data_dir):
  """The test processes (both xdist workers) share the persistent compilation cache of the
  scripts' shared data dir, and cache every program, however fast it compiled: the tests build
  the same small steps again and again from new functions, which jit's in-memory cache misses.
  (Set at the session start, before the tests compile.)"""
  jax.config.update("jax_compilation_cache_dir", str(shared_data_dir / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


TINY_MODEL = {"num_layers": 2, "num_heads": 2, "embed_dim": 32, "mlp_dim": 64,
              "vocab_size": 512, "max_seq_len": 64}


@pytest.fixture(scope="session")
def tiny_lm_run(tmp_path_factory) -> str:
  """A language-model run directory (config.json, tokenizer.model, checkpoints/0 holding
  random N(0, 0.1) params, like an imported run) for tests that start from a run: built once
  per session, in a few seconds (no training, one small compile)."""
  from jaxlm import config as config_lib
  from jaxlm import run as run_lib
  from jaxlm import sharding
  from jaxlm import steps as steps_lib
  from jaxlm import tokenizer as tokenizer_lib

  workdir = tmp_path_factory.mktemp("tiny_lm_run")
  source = os.path.dirname(json.__file__)
  documents = [open(os.path.join(source, name)).read().encode("ascii", "ignore").decode()
               for name in sorted(os.listdir(source)) if name.endswith(".py")]
  tokenizer = tokenizer_lib.train_sentencepiece(
      documents, TINY_MODEL["vocab_size"], str(tmp_path_factory.mktemp("tok") / "t.model"),
      max_sentences=2000)
  config = config_lib.validate({"model": TINY_MODEL, "data": {"seq_len": 64, "stride": 64},
                                "train": {"global_batch_size": 8}})
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: jax.device_put(rng.normal(0, 0.1, s.shape).astype(np.float32), s.sharding),
      steps_lib.abstract_params(config.model, mesh))
  run_lib.write_files(str(workdir), config, tokenizer, run_source={"imported_from": "tests"})
  checkpointer = run_lib.checkpointer(str(workdir), async_save=False)
  checkpointer.save(0, {"params": params}, {}, config_lib.to_dict(config), tokenizer)
  checkpointer.wait()
  return str(workdir)



# Seconds each test file took (the sums of its tests' setup, call and teardown, measured by
# `.ci/run` with --durations=0 on 2026-12-07, both workers busy; test_convert.py and
# test_preference.py less what was cut after; only the order matters). pytest-xdist's loadfile
# hands whole files to its two workers, by default the files with the most tests first, so a
# file of two long tests (the multi-process jobs, the notebooks) could start last and keep one
# worker busy while the other idles. pyproject.toml turns that order off
# (--no-loadscope-reorder) and the files go out heaviest first, whatever they hold; files not
# named here (the quick ones) follow in their usual order.
FILE_SECONDS = {
    "test_finetune.py": 197, "test_notebooks.py": 152, "test_multihost.py": 102,
    "test_pipeline.py": 84, "test_pretrain.py": 74, "test_plan.py": 65, "test_sweep.py": 64,
    "test_convert.py": 61, "test_model.py": 58, "test_train.py": 50, "test_loop.py": 48,
    "test_spikes.py": 44, "test_generate.py": 41, "test_tasks.py": 39,
    "test_convert_llama.py": 39, "test_sharding.py": 36, "test_optimizers.py": 31,
    "test_curate.py": 30, "test_storage.py": 29, "test_benchmark.py": 29, "test_kernels.py": 28,
    "test_preference.py": 28, "test_glue_finetune.py": 26, "test_crash.py": 26,
    "test_lora.py": 25, "test_batch_warmup.py": 21, "test_harness.py": 19, "test_shards.py": 18,
    "test_mup.py": 15, "test_hooks.py": 15, "test_prepare.py": 12, "test_generative.py": 12,
    "test_checkpoint.py": 11, "test_loss.py": 9, "test_curate_web.py": 8}


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # (stable: a file's order)
