"""Tests for jaxlm/generate.py and experiments/generate.py: numbers, not shapes.

Library tests use tiny models with random N(0, 0.2) parameters (peaked logits, so a masking or
cache bug moves tokens, not just digits) and a character tokenizer. Every test that generates
uses a batch of 3 prompts of at most 16 tokens and max_new_tokens <= 64, so one pair of
compiled programs per (config, kv_cache) serves all of them; `compiled_count` checks that.
"""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import generate as gen
from jaxlm import run as run_lib
from jaxlm import sharding
from jaxlm.config import ModelConfig
from jaxlm.model import Transformer
from tests.conftest import REPO, random_params

GPT2 = ModelConfig(num_layers=2, num_heads=4, embed_dim=32, mlp_dim=64, vocab_size=64,
                   max_seq_len=80, positional="learned", norm="layernorm", mlp="gelu",
                   use_bias=True, tie_embeddings=True)
LLAMA = dataclasses.replace(GPT2, positional="rope", norm="rmsnorm", mlp="swiglu",
                            use_bias=False, tie_embeddings=False)
NEW = 64


class CharTok:
  """One token per character (ids 4..), the jaxlm special ids 0..3; vocab 64."""
  pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3
  vocab_size = 64
  chars = "abcdefghijklmnopqrstuvwxyz0123456789 ()[]:=.,+-*/\n\"'_#<>!?{}&%"[:60]

  def encode(self, text):
    return [4 + self.chars.index(c) for c in text]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]

  def decode(self, ids):
    return "".join(self.chars[i - 4] for i in ids if i >= 4)


TOK = CharTok()
NO_EOS = CharTok()
NO_EOS.eos_id = -1  # never sampled: every row generates all its tokens
PROMPTS = ["def f(x): return", "a", "import os\n"]  # 16, 1 and 10 tokens: one bucket of 16


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
  """XLA CPU compilation dominates; optimization level 0 compiles faster, same numbers."""
  saved = gen._start, gen._continue
  options = {"xla_backend_optimization_level": 0}
  gen._start = jax.jit(saved[0].__wrapped__, compiler_options=options,
                       static_argnames=("config", "new_slots", "kv_cache", "with_logits"))
  gen._continue = jax.jit(saved[1].__wrapped__, compiler_options=options,
                          static_argnames=("config", "prompt_len", "kv_cache"),
                          donate_argnames=("state",))
  yield
  gen._start, gen._continue = saved


PARAMS = {}


def params_for(cfg):
  if cfg not in PARAMS:
    PARAMS[cfg] = random_params(cfg)
  return PARAMS[cfg]


def run(cfg=GPT2, prompts=PROMPTS, tokenizer=TOK, **kwargs):
  kwargs.setdefault("max_new_tokens", NEW)
  kwargs.setdefault("temperature", 0.0)
  kwargs.setdefault("chunk_size", kwargs["max_new_tokens"])  # generate()'s: one call
  generation = gen.stream(cfg, params_for(cfg), tokenizer, prompts, with_logits=True, **kwargs)
  list(generation)
  return generation.completions, generation.stats


# --- cached == uncached ----------------------------------------------------------------------

# Grouped-query attention with a window far shorter than the generation (a ring cache of 6).
MISTRAL = dataclasses.replace(LLAMA, num_kv_heads=2, sliding_window=6)


@pytest.mark.parametrize("cfg", [GPT2, LLAMA, MISTRAL], ids=["gpt2", "llama", "gqa-window"])
def test_greedy_cached_equals_full_recompute(cfg):
  cached, cached_stats = run(cfg, tokenizer=NO_EOS)
  full, full_stats = run(cfg, tokenizer=NO_EOS, kv_cache=False)
  for a, b in zip(cached, full):
    assert a.finish_reason == b.finish_reason == "length"   # all 64 tokens compared
    assert len(a.tokens) == NEW and a.tokens == b.tokens
    assert a.text == b.text and len(a.text) > 0
  np.testing.assert_allclose(cached_stats["logits"], full_stats["logits"], atol=1e-5, rtol=0)
  # Rows of different lengths decode as if alone: left padding is invisible.
  alone, _ = run(cfg, prompts=[PROMPTS[1]] * 3, tokenizer=NO_EOS)
  assert alone[0].tokens == cached[1].tokens


@pytest.mark.parametrize("cfg", [
    dataclasses.replace(GPT2, positional="sinusoidal", scan_layers=True),
    dataclasses.replace(LLAMA, positional="none")], ids=["sinusoidal-scan", "none"])
def test_other_positions_and_scanned_layers_match_one_forward_pass(cfg):
  """The cached per-step logits == one forward pass over prompt + generated tokens."""
  out, stats = run(cfg, tokenizer=NO_EOS)
  tokens = np.zeros((3, 16 + NEW), np.int32)
  for r, (prompt, c) in enumerate(zip(PROMPTS, out)):
    row = TOK.encode(prompt) + c.tokens
    tokens[r, 16 + NEW - len(row):] = row   # left-padded (16 - prompt length slots)
  lengths = np.array([len(TOK.encode(p)) for p in PROMPTS], np.int32)
  forward = jax.jit(gen._full_forward, static_argnums=(0, 4))
  logits = np.asarray(forward(cfg, params_for(cfg), tokens, lengths, 16))
  # Prompt slots 0..15: the logits at slot 15 + t predict generated token t.
  np.testing.assert_allclose(stats["logits"], logits[:, 15:15 + NEW], atol=1e-5, rtol=0)


def compiled_count() -> int:
  """How many programs `_start` and `_continue` have compiled in this process."""
  return gen._start._cache_size() + gen._continue._cache_size()


def test_compiles_once_per_batch_bucket_and_length():
  run(GPT2)  # compiled (or already compiled by the test above)
  before = compiled_count()
  run(GPT2, prompts=["x", "yy", "print(1)"], max_new_tokens=50)           # other lengths
  run(GPT2, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=4)     # other sampling
  pieces = list(gen.stream(GPT2, params_for(GPT2), NO_EOS, PROMPTS, max_new_tokens=NEW,
                           chunk_size=3, with_logits=True))              # streamed, 3 per call
  assert compiled_count() == before
  assert len([p for p in pieces if p.row == 0]) >= NEW // 3               # really streams


# --- sampling --------------------------------------------------------------------------------

def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def emitted_and_logits(stats, completions):
  """(token, logits of its step) for every generated token."""
  for r, c in enumerate(completions):
    for t, token in enumerate(c.tokens):
      yield token, stats["logits"][r, t]


def test_top_k_never_emits_outside_the_k_most_likely():
  out, stats = run(temperature=2.0, top_k=3, seed=1, tokenizer=NO_EOS)
  pairs = list(emitted_and_logits(stats, out))
  assert len(pairs) == 3 * NEW
  for token, logits in pairs:
    assert token in np.argsort(-logits)[:3]
  assert len({t for t, _ in pairs}) > 3


def test_top_p_keeps_at_least_p_and_min_p_drops_unlikely_tokens():
  out, stats = run(temperature=1.5, top_p=0.6, seed=2, tokenizer=NO_EOS)
  for token, logits in emitted_and_logits(stats, out):
    probs = softmax(logits.astype(np.float64) / 1.5)
    order = np.argsort(-probs)
    nucleus = order[:np.searchsorted(np.cumsum(probs[order]), 0.6) + 1]
    assert token in nucleus
  out, stats = run(temperature=1.0, min_p=0.3, seed=3, tokenizer=NO_EOS)
  for token, logits in emitted_and_logits(stats, out):
    probs = softmax(logits.astype(np.float64))
    assert probs[token] >= 0.3 * probs.max() - 1e-6

  # The filter itself, on many rows: top-p's kept mass >= p and is minimal; min-p's rule.
  logits = np.random.default_rng(0).normal(0, 2, (64, 64)).astype(np.float32)
  filtered = jax.jit(gen.filter_logits)
  for p in (0.3, 0.75, 0.95):
    kept = np.isfinite(np.asarray(filtered(logits, 1.0, 0, p, 0.0)))
    probs = softmax(logits.astype(np.float64))
    mass = (probs * kept).sum(-1)
    smallest = np.where(kept, probs, np.inf).min(-1)
    assert np.all(mass >= p) and np.all(mass - smallest < p)
  kept = np.isfinite(np.asarray(filtered(logits, 0.5, 0, 1.0, 0.2)))
  probs = softmax(logits.astype(np.float64) / 0.5)
  np.testing.assert_array_equal(kept, probs >= 0.2 * probs.max(-1, keepdims=True))
  kept = np.isfinite(np.asarray(filtered(logits, 1.0, 5, 0.99, 0.0)))     # top-k, then top-p
  assert np.all(kept.sum(-1) <= 5) and np.all(kept.sum(-1) >= 1)


def test_same_seed_same_text_other_seed_other_text():
  a, _ = run(temperature=1.0, seed=7)
  b, _ = run(temperature=1.0, seed=7)
  c, _ = run(temperature=1.0, seed=8)
  assert [x.text for x in a] == [x.text for x in b]
  assert [x.text for x in a] != [x.text for x in c]
  # Streaming in chunks draws the same numbers as one call.
  generation = gen.stream(GPT2, params_for(GPT2), TOK, PROMPTS, max_new_tokens=NEW,
                          temperature=1.0, seed=7, chunk_size=5, with_logits=True)
  list(generation)
  assert [x.text for x in generation.completions] == [x.text for x in a]
  # The settings objects are the same as their fields by keyword.
  sampling = gen.SamplingParams(max_new_tokens=NEW, temperature=1.0, seed=7)
  by_object = gen.generate(GPT2, params_for(GPT2), TOK, PROMPTS, sampling,
                           gen.DecodeOptions(chunk_size=5, with_logits=True))
  assert [x.text for x in by_object] == [x.text for x in a]


@pytest.mark.parametrize("args, match", [
    (dict(temperature=-0.1), "temperature=-0.1"), (dict(top_k=-1), "top_k=-1"),
    (dict(top_p=0.0), "top_p=0.0"), (dict(top_p=1.5), "top_p=1.5"),
    (dict(min_p=2.0), "min_p=2.0"), (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=80), "max_new_tokens=80"), (dict(stop=[""]), "stop"),
    (dict(temperature=float("nan")), "temperature=nan"), (dict(chunk_size=0), "chunk_size=0"),
    (dict(max_tokens=8), r"unknown generation argument\(s\) \['max_tokens'\]")])
def test_bad_arguments_are_clear_errors(args, match):
  kwargs = dict(max_new_tokens=8) | args
  with pytest.raises(gen.GenerationError, match=match):
    gen.stream(GPT2, None, TOK, PROMPTS, **kwargs)


def test_python_misuse_is_one_line_and_a_run_config_is_accepted():
  """A single string was split into one prompt per character; batch_size=-1 returned []; a
  classifier generated class ids as text; the run's Config (not its .model) was an
  AttributeError."""
  with pytest.raises(gen.GenerationError, match=r"prompts is one string; pass a list"):
    gen.generate(GPT2, None, TOK, "hello", max_new_tokens=4)
  with pytest.raises(gen.GenerationError, match=r"batch_size=-1: must be an integer >= 0"):
    gen.generate(GPT2, None, TOK, PROMPTS, max_new_tokens=4, batch_size=-1)
  with pytest.raises(config_lib.ConfigError, match=r"generation needs a language model, but "
                                                   r"this is a classifier \(model.num_classes=2\)"):
    gen.generate(dataclasses.replace(GPT2, num_classes=2), None, TOK, PROMPTS, max_new_tokens=4)
  run_config = config_lib.Config(model=GPT2, data=config_lib.DataConfig(seq_len=64))
  from_run = gen.generate(run_config, params_for(GPT2), TOK, PROMPTS, max_new_tokens=NEW,
                          temperature=0.0, with_logits=True)
  assert [c.tokens for c in from_run] == [c.tokens for c in run(GPT2)[0]]


# --- stopping, streaming, context window ------------------------------------------------------

def test_stop_strings_cut_the_text_and_stream_nothing_past_them():
  free, _ = run(temperature=1.0, seed=11)
  text = free[0].text
  stop = text[5:7]
  cut = text[:text.index(stop)]
  generation = gen.stream(GPT2, params_for(GPT2), TOK, PROMPTS, max_new_tokens=NEW,
                          temperature=1.0, seed=11, stop=["@@never", stop], chunk_size=4,
                          with_logits=True)
  pieces, completions = list(generation), generation.completions
  assert completions[0].text == cut and completions[0].finish_reason == "stop"
  assert "".join(p.text for p in pieces if p.row == 0) == cut
  assert [p.finish_reason for p in pieces if p.row == 0][-1] == "stop"
  for r in (1, 2):  # the other rows are unaffected (their own stops, or none)
    assert completions[r].text == free[r].text[:len(completions[r].text)]


def test_eos_stops_a_row():
  greedy, _ = run()
  tokens = greedy[0].tokens
  t = next(i for i in range(2, NEW) if tokens[i] not in tokens[:i])
  tokenizer = CharTok()
  tokenizer.eos_id = tokens[t]  # the row's (t+1)-th greedy token is now EOS
  out = gen.generate(GPT2, params_for(GPT2), tokenizer, PROMPTS, max_new_tokens=NEW,
                     temperature=0.0, with_logits=True)
  assert out[0].finish_reason == "eos" and out[0].tokens == tokens[:t]
  assert out[0].text == tokenizer.decode(tokens[:t])


def test_ids_of_a_padded_embedding_are_never_sampled():
  """A model whose vocab_size pads the tokenizer's (e.g. GPT-2's 50,257 to 50,304 for a tensor
  split) never draws an id the tokenizer lacks: greedy takes the best of the tokenizer's ids."""
  tokenizer = CharTok()
  tokenizer.vocab_size, tokenizer.eos_id = 48, -1  # the model has 64 rows: 48..63 are padding
  full, _ = run(tokenizer=NO_EOS)
  assert any(max(c.tokens) >= 48 for c in full)  # unmasked, this model picks padding ids
  for temperature in (0.0, 1.0):
    out, stats = run(tokenizer=tokenizer, temperature=temperature)
    assert all(max(c.tokens) < 48 for c in out), [c.tokens for c in out]
  logits = stats["logits"]  # (temperature 1.0; the greedy tokens are checked with their own)
  greedy, greedy_stats = run(tokenizer=tokenizer)
  for row, completion in enumerate(greedy):
    steps = len(completion.tokens)
    expected = np.argmax(greedy_stats["logits"][row, :steps, :48], axis=-1)
    assert completion.tokens == expected.tolist()
  assert logits.shape[-1] == 64


def test_prompt_longer_than_the_context_is_refused_or_truncated():
  long_prompt = "x = 1\n" * 5  # 30 tokens; max_seq_len 80 - 64 new tokens leaves 16
  with pytest.raises(gen.GenerationError, match=r"prompt 1 has 30 tokens.*room for 16.*trunc"):
    gen.generate(GPT2, params_for(GPT2), TOK, ["a", long_prompt, "b"], max_new_tokens=NEW)
  out, _ = run(prompts=["a", long_prompt, "b"], truncate=True)
  assert out[1].truncated and out[1].prompt_tokens == 16 and not out[0].truncated
  tail, _ = run(prompts=["a", long_prompt[-16:], "b"])
  assert out[1].text == tail[1].text


def test_decodes_on_a_mesh_with_the_cache_sharded_by_heads():
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=1, fsdp=1, tensor=2),
                            devices=jax.devices()[:2])
  abstract = jax.eval_shape(lambda: Transformer(GPT2).init(jax.random.key(0),
                                                           jnp.ones((1, 4), jnp.int32)))
  params = jax.device_put(params_for(GPT2), sharding.state_shardings(abstract, mesh)["params"])
  assert gen._mesh_of(params) is mesh   # generate() decodes under the params' mesh
  plain, _ = run(GPT2)
  sharded = gen.generate(GPT2, params, TOK, PROMPTS, max_new_tokens=NEW, temperature=0.0,
                         with_logits=True)
  assert [c.tokens for c in sharded] == [c.tokens for c in plain]
  # The cache of that run: [batch, length, heads, head_dim] with heads over `tensor`.
  s = {"temperature": np.float32(0.0), "top_k": np.int32(0), "top_p": np.float32(1.0),
       "min_p": np.float32(0.0), "eos_id": np.int32(3), "pad_id": np.int32(0),
       "vocab_size": np.int32(GPT2.vocab_size), "rng": jax.random.PRNGKey(0)}
  prompts = {"tokens": np.ones((3, 16), np.int32), "lengths": np.full(3, 16, np.int32)}
  with jax.set_mesh(mesh), nn.logical_axis_rules(gen._rules(3, mesh)):
    state = gen._start(params, prompts, s, config=GPT2, new_slots=NEW, kv_cache=True,
                       with_logits=True)
  spec = tuple(state.cache["layers_0"]["attention"]["cached_key"].sharding.spec)
  assert spec[2] == "tensor" and len(state.cache["layers_0"]["attention"]["cached_key"]
                                     .sharding.device_set) == 2


# --- load_run and the CLI ---------------------------------------------------------------------

RUN_MODEL = {"num_layers": 2, "num_heads": 2, "embed_dim": 32, "mlp_dim": 64, "vocab_size": 512,
             "max_seq_len": 64}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run directory as the trainer leaves it (config.json, tokenizer.model, checkpoints at
  steps 1 and 2 written by Checkpointer.save), saved from one device: load_run below restores
  it onto 8, the CLI onto 1. Random N(0, 0.3) params instead of training, for peaked logits."""
  from jaxlm import checkpoint as ckpt
  from jaxlm import steps as steps_lib
  from jaxlm import tokenizer as tokenizer_lib
  from jaxlm.optim import make_optimizer
  workdir = tmp_path_factory.mktemp("run")
  source = os.path.dirname(json.__file__)
  documents = [open(os.path.join(source, name)).read() for name in sorted(os.listdir(source))
               if name.endswith(".py")]
  tokenizer_path = str(workdir / "tokenizer.model")
  tokenizer = tokenizer_lib.train_sentencepiece(documents, RUN_MODEL["vocab_size"],
                                                tokenizer_path, max_sentences=2000)
  config = config_lib.validate({"model": RUN_MODEL, "train": {"global_batch_size": 8},
                                "data": {"seq_len": 64, "stride": 64}})
  (workdir / "config.json").write_text(json.dumps(config_lib.to_dict(config)))
  steps = steps_lib.make_steps(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  optimizer = make_optimizer(config.optim, config.train.num_steps)
  checkpointer = ckpt.Checkpointer(str(workdir / "checkpoints"))
  rng = np.random.default_rng(0)
  for step in (1, 2):
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32),
                          steps.abstract_state.params)
    state = steps_lib.TrainState(step=jnp.int32(step), params=params,
                                 opt_state=optimizer.init(params), rng=jax.random.PRNGKey(0))
    checkpointer.save(step, jax.device_put(state, steps.state_shardings), {},
                      config_lib.to_dict(config), tokenizer)
  checkpointer.wait()
  return workdir, params


def test_load_run_restores_params_and_names_the_steps(run_dir, tmp_path):
  workdir, saved = run_dir
  config, params, tokenizer = run_lib.load_run(str(workdir))
  assert config.model.embed_dim == 32 and tokenizer.vocab_size == 512
  assert len(jax.tree.leaves(params)[0].sharding.device_set) == 8   # moved to 8 devices
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), saved)
  _, first, _ = run_lib.load_run(str(workdir), step=1)
  assert not np.array_equal(first["token_embed"], saved["token_embed"])
  cases = [(str(workdir), 7, r"step 7 is not in .*checkpoints; available steps: 1, 2\."),
           (str(tmp_path / "nope"), None, "nope does not exist"),
           (str(tmp_path), None, "no config.json")]
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text((workdir / "config.json").read_text())
  cases.append((str(tmp_path / "empty"), None, r"no checkpoint in .*empty/checkpoints"))
  for path, step, match in cases:
    with pytest.raises(run_lib.RunError, match=match) as info:
      run_lib.load_run(path, step)
    assert "\n" not in str(info.value)
  assert not (tmp_path / "empty" / "checkpoints").exists()  # reading never creates anything


@pytest.mark.e2e
def test_cli_streams_prompt_and_continuation_only(run_dir, tmp_path):
  """Subprocesses; the expected text comes from the library in this process."""
  workdir, _ = run_dir
  # One device; backend optimization level 0 compiles faster and computes the same numbers.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  prompt = "def load(s, *, cls=None"
  greedy = ["--workdir", str(workdir), "--prompt", prompt, "--max_new_tokens=20",
            "--temperature=0"]
  prompts_file = tmp_path / "prompts.jsonl"
  prompts_file.write_text('"import json\\n"\n{"prompt": "class A:"}\n')
  sampled = dict(max_new_tokens=24, temperature=1.0, top_k=40, top_p=0.95, min_p=0.01, seed=3,
                 stop=["zz", "\n\n", ","])
  commands = {
      "cached": greedy,
      "full": greedy + ["--kv_cache=false"],
      "batch": ["--workdir", str(workdir), "--prompts_file", str(prompts_file), "--step=2",
                "--num_samples=2", "--max_new_tokens=24", "--temperature=1", "--top_k=40",
                "--top_p=0.95", "--min_p=0.01", "--seed=3", "--stop=zz,\\n\\n", "--stop=\\,"],
      "long": ["--workdir", str(workdir), "--prompt", "x" * 200, "--max_new_tokens=20"],
  }
  procs = {name: subprocess.Popen([sys.executable, "-m", "experiments.generate", *args],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for name, args in commands.items()}
  try:
    one_device = sharding.make_mesh(config_lib.MeshConfig(), jax.devices()[:1])
    config, params, tokenizer = run_lib.load_run(str(workdir), mesh=one_device)
    expected = gen.generate(config.model, params, tokenizer, [prompt], max_new_tokens=20,
                            temperature=0.0)[0].text
    batch_prompts = ["import json\n"] * 2 + ["class A:"] * 2
    batch_expected = gen.generate(config.model, params, tokenizer, batch_prompts, **sampled)
  finally:
    results = {name: (p.communicate(timeout=600), p.returncode) for name, p in procs.items()}

  (cached, cached_err), code = results["cached"]
  assert code == 0, cached_err[-2000:]
  assert expected and cached == prompt + expected        # stdout: nothing but the text
  assert "tokens/s" in cached_err and "compile" in cached_err
  (full, full_err), code = results["full"]
  assert code == 0, full_err[-2000:]
  assert full == cached and "kv_cache=False" in full_err

  (batch, batch_err), code = results["batch"]
  assert code == 0, batch_err[-2000:]
  assert batch == "\n\n".join(c.prompt + c.text for c in batch_expected)
  assert batch_expected[0].text != batch_expected[1].text                 # two samples
  assert "4 samples" in batch_err

  (out, err), code = results["long"]
  assert code == 2 and out == "" and "Traceback" not in err, err[-2000:]
  assert err.strip().startswith("error: prompt 0 has") and "--truncate" in err


@pytest.mark.e2e
def test_cli_refuses_unusable_prompt_files_and_evaluate_a_zero_stride(run_dir, tmp_path):
  workdir, _ = run_dir
  (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
  (tmp_path / "blank.txt").write_text("\n  \n")
  cases = [("generate", [f"--prompts_file={tmp_path / 'latin.txt'}"], "is not UTF-8 text"),
           ("generate", [f"--prompts_file={tmp_path}"], "is a directory"),
           ("generate", [f"--prompts_file={tmp_path / 'blank.txt'}"], "holds none"),
           ("evaluate", ["--split=validation", "--stride=0"], "--stride=0 must be >= 1")]
  for script, args, message in cases:
    result = subprocess.run([sys.executable, "-m", f"experiments.{script}",
                             f"--workdir={workdir}", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("error: ") and message in last, (
        result.stderr[-2000:])
