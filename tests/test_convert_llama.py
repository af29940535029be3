"""Llama, Mistral, Qwen2 and Qwen3 checkpoints in and out, against `transformers` (test-only).

Each family's model is built here, randomly initialised with odd shapes (kv heads != heads, a
head_dim that is not embed / heads, a window shorter than the prompt, tied and untied heads;
every weight random, norms included), with a byte-level BPE tokenizer.json trained on real
text: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import sysconfig

import numpy as np
import pytest

from jaxlm import convert
from jaxlm import generate as generate_lib
from jaxlm import run as run_lib
from jaxlm import tokenizer as tokenizer_lib
from tests.helpers import llama2_style_tokenizer_json

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STDLIB = sysconfig.get_paths()["stdlib"]
# model_type -> (config class, model class, end-of-text token, config overrides)
FAMILIES = {
    # Llama 3.1+'s RoPE scaling, with one channel pair in each regime (kept, interpolated,
    # divided by the factor) at head_dim 8.
    "llama": ("LlamaConfig", "LlamaForCausalLM", "<|end_of_text|>",
              {"tie_word_embeddings": False, "rope_parameters": {
                  "rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0,
                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", "</s>",
                {"sliding_window": 5, "tie_word_embeddings": False}),
    # A window on layer 1 only (max_window_layers=1): local and global layers alternate.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "<|endoftext|>",
              {"tie_word_embeddings": True, "use_sliding_window": True, "sliding_window": 6,
               "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "<|endoftext|>",
              {"head_dim": 16, "tie_word_embeddings": True}),
}
SHAPE = {"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
         "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 128,
         "rms_norm_eps": 1e-5, "rope_theta": 5000.0}


def _texts() -> list[str]:
  folder = os.path.join(STDLIB, "json")
  return [open(os.path.join(folder, n), encoding="utf-8").read()
          for n in sorted(os.listdir(folder)) if n.endswith(".py")]


def _tokenizer_json(path: str, eos: str, special: tuple[str, ...] = ()) -> None:
  """A byte-level BPE tokenizer.json (Llama 3 / Qwen style: a Split + ByteLevel pre-tokenizer
  sequence) with `eos` (and `special`) as special tokens."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"\s?\w+|\s?[^\w\s]+|\s+"), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[eos, *special],
                                show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(_texts(), trainer)
  tokenizer.save(path)


def _randomize(model) -> None:
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      norm = "norm" in name
      p.copy_(torch.randn(p.shape, generator=generator) * (0.2 if norm else 0.08)
              + (1.0 if norm else 0.0))


def _build(model_type: str, root, shard: bool = False, tokenizer_config: dict | None = None):
  """(hf_dir, torch model, imported workdir) of one family; `tokenizer_config`: its
  tokenizer_config.json (a chat template: with Llama 3's special tokens)."""
  torch.set_num_threads(2)
  config_class, model_class, eos, overrides = FAMILIES[model_type]
  hf_dir = root / f"hf-{model_type}"
  hf_dir.mkdir()
  if model_type == "mistral":  # (Llama 2 / Mistral: a SentencePiece-style tokenizer.json)
    llama2_style_tokenizer_json(hf_dir / "tokenizer.json")
  else:
    _tokenizer_json(str(hf_dir / "tokenizer.json"), eos, ("<|begin_of_text|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
                    if tokenizer_config else ())
  if tokenizer_config:
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
  tokenizer = tokenizer_lib.load_tokenizer(str(hf_dir))
  shape = {k: v for k, v in SHAPE.items() if not (k == "rope_theta" and "rope_parameters"
                                                  in overrides)}
  config = getattr(transformers, config_class)(
      vocab_size=tokenizer.vocab_size + 3, bos_token_id=tokenizer.eos_id,
      eos_token_id=tokenizer.eos_id, attn_implementation="eager", **shape, **overrides)
  model = getattr(transformers, model_class)(config).eval()
  _randomize(model)
  model.save_pretrained(str(hf_dir), max_shard_size="40KB" if shard else "1GB")
  workdir = root / f"run-{model_type}"
  summary = convert.import_hf(str(hf_dir), str(workdir))
  assert summary["architecture"] == model_class
  assert summary["num_params"] == sum(p.numel() for p in model.parameters())
  return hf_dir, model, workdir


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
  return request.param, _build(request.param, tmp_path_factory.mktemp(request.param),
                               shard=request.param == "qwen2")


def _logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.e2e
def test_import_generate_and_export_equal_transformers(family, tmp_path):
  model_type, (hf_dir, model, workdir) = family
  config, params, tokenizer = run_lib.load_run(str(workdir))
  m = config.model
  assert (m.num_kv_heads, m.qk_norm, m.qkv_bias) == (2, model_type == "qwen3",
                                                      model_type == "qwen2")
  assert (m.sliding_window, m.window_layers) == {"mistral": (5, ""), "qwen2": (6, "1")}.get(
      model_type, (0, ""))
  assert m.rope_scaling == ("llama3" if model_type == "llama" else "")
  # Logits of whole rows (longer than the window).
  ids = tokenizer.encode("".join(_texts()))
  tokens = np.stack([ids[i * 40:(i + 1) * 40] for i in range(3)]).astype(np.int32)
  ours = generate_lib.forward_logits(m, params, tokens)
  reference = _logits(model, tokens)
  assert np.max(np.abs(ours - reference)) < 1e-4, np.max(np.abs(ours - reference))
  # 64 greedy tokens with the KV cache, past the window.
  prompt = tokens[0, :10].tolist()
  *_, generated = generate_lib.decode_tokens(
      m, params, [prompt], generate_lib.SamplingParams(max_new_tokens=64, temperature=0.0),
      generate_lib.TokenIds(eos_id=-1, pad_id=tokenizer.pad_id),
      generate_lib.DecodeOptions(chunk_size=64))
  with torch.no_grad():
    expected = model.generate(torch.as_tensor([prompt]), max_new_tokens=64, do_sample=False,
                              eos_token_id=None, pad_token_id=tokenizer.pad_id)
  assert list(generated[0]) == expected[0, len(prompt):].tolist()
  # Export -> transformers reloads it -> the same logits; the tokenizer comes along.
  out = tmp_path / "exported"
  written = convert.export_hf(m, params, tokenizer, str(out))
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(written)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      str(out), attn_implementation="eager").eval()
  assert type(reloaded).__name__ == type(model).__name__
  np.testing.assert_allclose(_logits(reloaded, tokens), reference, atol=1e-4)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  text = "def dumps(obj, *, skipkeys=False):"
  assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text)


def _small_checkpoint(tmp_path, **overrides):
  """A tiny Llama directory with its tokenizer (for the refusals)."""
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  _tokenizer_json(str(hf_dir / "tokenizer.json"), "<|end_of_text|>")
  config = transformers.LlamaConfig(vocab_size=400, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    max_position_embeddings=32)
  transformers.LlamaForCausalLM(config).save_pretrained(str(hf_dir))
  values = json.loads((hf_dir / "config.json").read_text())
  values.update(overrides)
  (hf_dir / "config.json").write_text(json.dumps(values))
  return hf_dir


@pytest.mark.parametrize("overrides, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}},
     r"scales its rotary embedding with rope_type 'yarn'; jaxlm computes plain RoPE and Llama "
     r"3's scaling only"),
    ({"num_key_value_heads": 3}, r"num_kv_heads=3 does not divide model.num_heads=2"),
    ({"hidden_size": 24}, r"the tensor for token_embed has shape \(400, 16\), config.json "
                          r"implies \(400, 24\)"),
    ({"num_hidden_layers": 2}, r"lacks tensor model.layers.1.input_layernorm.weight"),
    ({"vocab_size": 300}, r"tokenizer .* has 400 tokens but config.json has vocab_size=300"),
    ({"mlp_bias": True}, r"mlp_bias=true"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
])
def test_bad_checkpoints_are_one_line_and_write_nothing(tmp_path, overrides, message):
  hf_dir = _small_checkpoint(tmp_path, **overrides)
  with pytest.raises(Exception, match=message) as raised:
    convert.import_hf(str(hf_dir), str(tmp_path / "run"))
  assert isinstance(raised.value, (convert.ConvertError, run_lib.config_lib.ConfigError))
  assert not (tmp_path / "run").exists() and not any(
      p.name.startswith(".import-") for p in tmp_path.iterdir())


@pytest.mark.e2e
def test_cli_imports_a_llama_fine_tunes_it_with_lora_and_exports_it(tmp_path):
  """experiments.import_hf -> finetune_instruct (LoRA, in the checkpoint's chat template) ->
  generate --chat -> export_hf -> transformers, through the command lines, on a small random
  Llama (docs/models.md shows the same for a real one)."""
  import subprocess
  import sys

  from tests.conftest import REPO
  from tests.helpers import LLAMA3_CHAT_TEMPLATE as LLAMA3
  template = {"chat_template": LLAMA3, "eos_token": "<|end_of_text|>"}
  hf_dir, model, _ = _build("llama", tmp_path, tokenizer_config=template)
  records = [{"instruction": "Repeat the word.", "input": w, "output": w}
             for w in ("alpha", "beta", "gamma", "delta", "omega", "sigma") * 4]
  (tmp_path / "data.json").write_text(json.dumps(records))

  def run(*args):
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]

  summary = json.loads(run("experiments.import_hf", f"--hf_dir={hf_dir}",
                           f"--workdir={tmp_path / 'llama'}"))
  assert summary["architecture"] == "LlamaForCausalLM"
  tuned = json.loads(run(
      "experiments.finetune_instruct", f"--init={tmp_path / 'llama'}",
      f"--data={tmp_path / 'data.json'}", f"--workdir={tmp_path / 'tuned'}", "--noprogress",
      "--config.model.lora_rank=4", "--config.finetune.epochs=1",
      "--config.finetune.template=model",
      "--config.train.global_batch_size=8", "--config.finetune.max_new_tokens=4",
      "--config.data.seq_len=64"))
  assert tuned["trainable_params"] < tuned["total_params"] / 4 and tuned["finished"]
  answers = json.loads((tmp_path / "tuned" / "test_responses.json").read_text())
  assert answers and all(set(a) >= {"instruction", "response", "exact_match"} for a in answers)
  chatted = subprocess.run(
      [sys.executable, "-m", "experiments.generate", f"--workdir={tmp_path / 'tuned'}", "--chat",
       "--prompt=Repeat the word.\nbeta", "--temperature=0", "--max_new_tokens=6"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert chatted.returncode == 0, chatted.stderr[-3000:]
  assert chatted.stdout.startswith("<|start_header_id|>user<|end_header_id|>\n\nRepeat the "
                                   "word.\nbeta<|eot_id|><|start_header_id|>assistant")
  exported = json.loads(run("experiments.export_hf", f"--workdir={tmp_path / 'tuned'}",
                            f"--hf_dir={tmp_path / 'out'}"))
  assert exported["architecture"] == "LlamaForCausalLM"
  exported_config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
  assert exported_config["chat_template"] == LLAMA3  # (kept through import and fine-tuning)
  # The exported weights are the tuned run's (adapters merged): transformers gives its logits.
  config, params, tokenizer = run_lib.load_run(str(tmp_path / "tuned"))
  tokens = np.asarray([tokenizer.encode("Below is an instruction")], np.int32)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  from jaxlm import lora
  merged_model, merged = lora.merge(config.model, params)
  np.testing.assert_allclose(_logits(reloaded, tokens),
                             generate_lib.forward_logits(merged_model, merged, tokens), atol=1e-4)
  assert np.max(np.abs(_logits(reloaded, tokens) - _logits(model, tokens))) > 1e-4  # it trained


@pytest.mark.parametrize("name, family_name", [
    ("llama3_2_1b", "llama"), ("mistral_7b", "mistral"), ("qwen2_5_0_5b", "qwen2"),
    ("qwen3_0_6b", "qwen3")])
def test_published_shapes_have_the_parameter_counts_of_transformers(name, family_name):
  """configs/NAME.py == transformers' model of the config.json export_hf writes for it
  (built on the meta device: no memory), and jaxlm's own count of its abstract params."""
  import dataclasses
  import importlib

  import jax
  import jax.numpy as jnp

  from jaxlm import config as config_lib
  from jaxlm import model as model_lib
  model = config_lib.validate(importlib.import_module(f"configs.{name}").get_config()).model
  family = convert.family_for(model)
  assert family.name == family_name
  hf_config = transformers.AutoConfig.for_model(**family.hf_config(model, 0))
  with torch.device("meta"):
    reference = transformers.AutoModelForCausalLM.from_config(hf_config)
  expected = sum(p.numel() for p in reference.parameters())
  assert model_lib.param_count(model) == expected
  scanned = dataclasses.replace(model, scan_layers=True)  # (traces one layer: cheap)
  abstract = jax.eval_shape(lambda: model_lib.Transformer(scanned).init(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  assert model_lib.count_params(abstract) == expected


def test_llama3_rope_scaling_equals_transformers():
  """model.rope_frequencies of Llama 3.2 1B's scaling == transformers' llama3 RoPE init."""
  import importlib

  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  from jaxlm import config as config_lib
  from jaxlm import model as model_lib
  model = config_lib.validate(importlib.import_module("configs.llama3_2_1b").get_config()).model
  values = convert.family_for(model).hf_config(model, 0)
  values.update(max_position_embeddings=131072)   # (the published context; the config's 2048
  hf = transformers.LlamaConfig(**{k: v for k, v in values.items()   # is the windows we train)
                                   if k not in ("architectures", "model_type")})
  expected, scale = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
  ours = model_lib.rope_frequencies(model)
  np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)
  assert scale == 1.0
  plain = model_lib.rope_frequencies(config_lib.replace(
      config_lib.validate({"model": {"embed_dim": 2048, "num_heads": 32,
                                     "rope_theta": 500000.0}}), model={}).model)
  assert np.sum(ours != plain) > 10   # (the scaling changes most low frequencies)
