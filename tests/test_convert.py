"""GPT-2 import/export, the GPT-2 tokenizer and evaluation, against `transformers` (test-only).

Nothing can be downloaded here, so each test model is a randomly initialised `GPT2LMHeadModel`
built from a config (every parameter, biases and norms included, is randomised), with a
byte-level BPE vocabulary trained in the test on real text and saved in GPT-2's file layout.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import sysconfig

import jax
import numpy as np
import pytest

from jaxlm import convert
from jaxlm import evaluate as evaluate_lib
from jaxlm import generate as generate_lib
from jaxlm import run as run_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.model import Transformer
from tests.conftest import REPO

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STDLIB = sysconfig.get_paths()["stdlib"]
# Multilingual text, emoji, whitespace runs, control characters and the end-of-text marker.
TRICKY = ("Grüße aus Zürich! Ça va? 東京は晴れ、서울은 비. Привет, мир. مرحبا 🤖🎉👍🏽\n\n"
          "\tdef f(x):\n\t\treturn  x   *  2\r\n   trailing spaces   \n<|endoftext|>next "
          "document   ḁ͂ \x00\x07 end<|endoftext|>")
# (name, layers, heads, embed, context, vocabulary)
SHAPES = [("small", 2, 4, 64, 128, 500), ("odd", 3, 6, 192, 77, 1111)]


def _texts(count: int = 40) -> list[str]:
  names = sorted(n for n in os.listdir(os.path.join(STDLIB, "json")) if n.endswith(".py"))
  names += sorted(n for n in os.listdir(os.path.join(STDLIB, "email")) if n.endswith(".py"))
  texts = []
  for name in names:
    folder = "json" if os.path.exists(os.path.join(STDLIB, "json", name)) else "email"
    with open(os.path.join(STDLIB, folder, name), encoding="utf-8") as f:
      texts.append(f.read())
  return texts[:count]


def _train_bpe(directory: str, vocab_size: int) -> None:
  from tokenizers import ByteLevelBPETokenizer
  trainer = ByteLevelBPETokenizer()
  trainer.train_from_iterator(_texts() + [TRICKY], vocab_size=vocab_size,
                              special_tokens=["<|endoftext|>"], show_progress=False)
  trainer.save_model(directory)


def _randomize(model) -> None:
  """Every parameter random (a fresh GPT-2 has zero biases and unit norms, which would hide
  mapping mistakes)."""
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.2 if ("ln_" in name or "bias" in name) else 0.05
      p.copy_(torch.randn(p.shape, generator=generator) * scale + (1.0 if name.endswith(
          ("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Shape name -> (hf_dir, torch model, imported workdir), each built once per module."""
  cache = {}

  def get(shape):
    if shape[0] not in cache:
      cache[shape[0]] = _build(shape, tmp_path_factory)
    return cache[shape[0]]
  return get


@pytest.fixture(params=SHAPES, ids=[s[0] for s in SHAPES])
def gpt2(request, built):
  return built(request.param)


@pytest.fixture
def small_gpt2(built):
  return built(SHAPES[0])


def _build(shape, tmp_path_factory):
  """(hf_dir, torch model, imported workdir) for one shape."""
  torch.set_num_threads(2)
  name, layers, heads, embed, context, vocab = shape
  hf_dir = tmp_path_factory.mktemp(f"hf-{name}")
  _train_bpe(str(hf_dir), vocab)
  with open(hf_dir / "vocab.json") as f:
    vocab_size = len(json.load(f))
  eos = tokenizer_lib.load_tokenizer(str(hf_dir)).eos_id
  config = transformers.GPT2Config(
      vocab_size=vocab_size, n_positions=context, n_embd=embed, n_layer=layers, n_head=heads,
      bos_token_id=eos, eos_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = transformers.GPT2LMHeadModel(config).eval()
  _randomize(model)
  model.save_pretrained(str(hf_dir))
  workdir = tmp_path_factory.mktemp(f"run-{name}") / "run"
  summary = convert.import_gpt2(str(hf_dir), str(workdir))
  assert summary["num_params"] == sum(
      p.numel() for n, p in model.named_parameters() if n != "lm_head.weight")
  return hf_dir, model, workdir


def _text_batch(tokenizer, length: int, rows: int = 3) -> np.ndarray:
  ids = tokenizer.encode("\n".join(_texts()[:6]))
  return np.stack([ids[i * length:(i + 1) * length] for i in range(rows)]).astype(np.int32)


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def test_imported_logits_equal_transformers(gpt2):
  hf_dir, model, workdir = gpt2
  config, params, tokenizer = run_lib.load_run(str(workdir))
  tokens = _text_batch(tokenizer, config.model.max_seq_len)
  ours = generate_lib.forward_logits(config.model, params, tokens)
  reference = _torch_logits(model, tokens)
  assert np.max(np.abs(ours - reference)) < 1e-4


def test_greedy_generation_equals_transformers(gpt2):
  hf_dir, model, workdir = gpt2
  config, params, tokenizer = run_lib.load_run(str(workdir))
  prompt = tokenizer.encode("def dumps(obj, *, skipkeys=False")
  *_, generated = generate_lib.decode_tokens(
      config.model, params, [prompt],
      generate_lib.SamplingParams(max_new_tokens=30, temperature=0.0),
      generate_lib.TokenIds(eos_id=-1, pad_id=tokenizer.pad_id),
      generate_lib.DecodeOptions(chunk_size=32))
  ours = generated[0]
  with torch.no_grad():
    reference = model.generate(torch.as_tensor([prompt]), max_new_tokens=30, do_sample=False,
                               eos_token_id=None, pad_token_id=tokenizer.pad_id)
  assert list(ours) == reference[0, len(prompt):].tolist()


def _hf_perplexity(model, ids: list[int], eos_id: int, seq_len: int, stride: int) -> tuple:
  """Hugging Face's documented sliding-window perplexity over [eos] + ids (windows of
  seq_len + 1 tokens give seq_len predictions, the same windows as jaxlm's)."""
  x = torch.as_tensor([[eos_id] + list(ids)])
  total, count, previous_end = 0.0, 0, 0
  for begin in range(0, x.shape[1], stride):
    end = min(begin + seq_len + 1, x.shape[1])
    new = end - max(previous_end, begin + 1)
    labels = x[:, begin:end].clone()
    labels[:, :-new] = -100
    with torch.no_grad():
      loss = model(x[:, begin:end], labels=labels).loss.item()
    total, count, previous_end = total + loss * new, count + new, end
    if end == x.shape[1]:
      break
  return total, count


@pytest.mark.e2e
def test_evaluate_cli_perplexity_equals_transformers(small_gpt2, tmp_path):
  """The command line on the small shape (the odd one's numbers: the in-process tests above;
  the CLI adds nothing shape-specific and costs a process)."""
  hf_dir, model, workdir = small_gpt2
  tokenizer = tokenizer_lib.load_tokenizer(str(hf_dir))
  documents = [_texts()[1], TRICKY.replace("<|endoftext|>", "")]
  for i, text in enumerate(documents):
    (tmp_path / f"doc{i}.txt").write_text(text, encoding="utf-8")
  seq_len, stride = 48, 20
  result = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}",
       f"--text_files={tmp_path}/*.txt", f"--seq_len={seq_len}", f"--stride={stride}",
       "--batch_size=4"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  ours = json.loads(result.stdout.strip().splitlines()[-1])
  total = count = 0
  for text in documents:
    loss_sum, tokens = _hf_perplexity(model, tokenizer.encode(text), tokenizer.eos_id, seq_len,
                                      stride)
    total, count = total + loss_sum, count + tokens
  assert ours["tokens"] == count
  assert ours["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
  num_bytes = sum(len(t.encode("utf-8")) for t in documents)
  assert ours["bits_per_byte"] == pytest.approx(total / math.log(2) / num_bytes, rel=1e-4)


@pytest.mark.e2e
def test_export_round_trip_loads_in_transformers(gpt2, tmp_path):
  hf_dir, model, workdir = gpt2
  out = tmp_path / "exported"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.export_gpt2", f"--workdir={workdir}",
       f"--hf_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(os.listdir(out))
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  tokens = np.asarray([tokenizer.encode(_texts()[2])[:40]], np.int32)
  assert np.max(np.abs(_torch_logits(reloaded, tokens) - _torch_logits(model, tokens))) < 1e-5


def test_tokenizer_ids_equal_transformers(gpt2):
  hf_dir, _, workdir = gpt2
  reference = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  ours = tokenizer_lib.load_tokenizer(str(hf_dir))
  from_run = run_lib.open_run(str(workdir)).tokenizer  # tokenizer.json in the run dir
  texts = [TRICKY, "   leading", "trailing   ", "a\n\n\n\tb", "<|endoftext|>", "",
           "naïve café 🤷‍♀️ — “quotes” ½ ﬁ"] + _texts()[:3]
  for text in texts:
    expected = reference.encode(text)
    assert ours.encode(text) == expected, text
    assert from_run.encode(text) == expected, text
  batch = ours.encode_batch(texts)
  assert batch == [reference.encode(t) for t in texts]
  # Round trip (the end-of-text marker is a special token and decodes to nothing).
  for text in texts:
    assert ours.decode(ours.encode(text)) == text.replace("<|endoftext|>", "")
  # Bytes per token add up to the text's UTF-8 bytes.
  lengths = ours.byte_lengths()
  ids = ours.encode(TRICKY)
  assert int(lengths[ids].sum()) == len(TRICKY.replace("<|endoftext|>", "").encode("utf-8"))


def test_gpt2_tokenizer_is_fast_enough():
  """10 MB of text in well under a minute (measured ~10 s on 2 cores)."""
  import tempfile
  import time

  from tokenizers import ByteLevelBPETokenizer
  with tempfile.TemporaryDirectory() as directory:
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(_texts(), vocab_size=2000, special_tokens=["<|endoftext|>"],
                                show_progress=False)
    trainer.save_model(directory)
    tokenizer = tokenizer_lib.load_tokenizer(directory)
  corpus = "\n".join(_texts())
  documents = [corpus] * max(1, 10_000_000 // len(corpus))
  start = time.perf_counter()
  encoded = tokenizer.encode_batch(documents)
  seconds = time.perf_counter() - start
  assert sum(len(d) for d in documents) >= 9_000_000
  assert len(encoded) == len(documents) and encoded[0] == encoded[-1]
  assert seconds < 60, seconds


# ---------------------------------------------------------------------------------------------
# Sliding windows and bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,seq_len,stride", [(1, 8, 8), (8, 8, 8), (9, 8, 8), (50, 8, 3),
                                                   (50, 8, 1), (17, 16, 16)])
def test_document_windows_score_each_token_once(length, seq_len, stride):
  ids = list(range(10, 10 + length))
  rows = evaluate_lib.document_windows(ids, seq_len, stride, eos_id=3, pad_id=0)
  scored = [int(t) for row in rows for t, w in zip(row["targets"], row["weights"]) if w]
  assert scored == ids  # every token once, in order
  for row in rows:
    valid = row["segment_ids"] > 0
    # Inputs are the previous tokens: target j's input is token j - 1 (EOS before the first).
    x = [3] + ids
    first = x.index(int(row["inputs"][0])) if row["inputs"][0] != 3 else 0
    assert list(row["inputs"][valid]) == x[first:first + int(valid.sum())]
  if stride < seq_len and len(rows) > 1:  # later windows keep seq_len - stride context tokens
    for row in rows[1:]:
      assert np.argmax(row["weights"]) >= seq_len - stride


def test_import_refuses_pickle_only_directory(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8,
                                                    "n_layer": 1, "n_head": 2, "n_positions": 8,
                                                    "vocab_size": 10}))
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")  # a pickle: never opened
  with pytest.raises(convert.ConvertError, match="pytorch_model.bin, a pickle.*safetensors"):
    convert.safetensors_files(str(tmp_path))
  # A safetensors file cut short (an interrupted download or copy): one line, not a traceback.
  from safetensors.numpy import save_file
  path = tmp_path / "model.safetensors"
  save_file({"wte.weight": np.zeros((10, 8), np.float32)}, str(path))
  path.write_bytes(path.read_bytes()[:60])
  with pytest.raises(convert.ConvertError, match=r"model\.safetensors cannot be read as "
                     r"safetensors \(.*\); download it again"):
    convert.safetensors_files(str(tmp_path))


def test_import_refuses_a_tokenizer_only_in_sentencepiece_form(tmp_path):
  """A Llama 2/Mistral directory with tokenizer.model but no tokenizer.json: one line that
  says how transformers writes the tokenizer.json (jaxlm's own SentencePiece convention is not
  Hugging Face's)."""
  (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x00")
  with pytest.raises(convert.ConvertError, match=r"only as tokenizer.model \(SentencePiece\); "
                     r"jaxlm imports tokenizer.json: .*save_pretrained"):
    convert.load_hf_tokenizer(str(tmp_path))


@pytest.mark.e2e
def test_import_cli_errors_are_one_line(tmp_path, small_gpt2):
  hf_dir, _, workdir = small_gpt2
  cases = [
      ([f"--hf_dir={tmp_path}/none", f"--workdir={tmp_path}/w1"], "is not a directory"),
      ([f"--hf_dir={hf_dir}", f"--workdir={workdir}"], "already exists and is not empty"),
      ([f"--hf_dir={workdir}", f"--workdir={tmp_path}/w2"], "jaxlm run directory.*export_hf"),
      ([f"--hf_dir={hf_dir}"], "pass both --hf_dir"),
      # (the GPT-2 alias of export_hf takes export_hf's flags, but writes GPT-2 only)
      ([f"--workdir={workdir}", f"--hf_dir={tmp_path}/w3", "--family=llama"],
       "this command writes gpt2 only; use python -m experiments.export_hf --family=llama"),
  ]
  for args, message in cases:
    script = "export_gpt2" if "--family=llama" in args else "import_gpt2"
    result = subprocess.run([sys.executable, "-m", f"experiments.{script}", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-1000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-1000:]
    assert __import__("re").search(message, lines[0]), lines[0]
  assert not any(os.path.exists(f"{tmp_path}/w{i}") for i in (1, 2, 3))


def test_unsupported_configs_are_refused(tmp_path):
  base = {"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2, "n_positions": 8,
          "vocab_size": 10}
  for change, message in [({"activation_function": "gelu"}, "tanh GELU"),
                          ({"model_type": "mamba", "architectures": ["MambaForCausalLM"]},
                           r"architecture MambaForCausalLM \(model_type 'mamba'\) is not "
                           r"supported; jaxlm imports GPT2LMHeadModel, LlamaForCausalLM"),
                          ({"auto_map": {"AutoModel": "x.Y"}}, "trust_remote_code"),
                          ({"scale_attn_by_inverse_layer_idx": True}, "attention scaling"),
                          ({"n_head": 0}, "n_head=0")]:
    (tmp_path / "config.json").write_text(json.dumps(dict(base, **change)))
    with pytest.raises(convert.ConvertError, match=message):
      hf = convert.read_hf_config(str(tmp_path))
      convert.family_of(hf, "config.json").read_config(hf, "config.json")
  from jaxlm import config as config_lib
  llama = config_lib.validate({"model": {"positional": "rope", "norm": "rmsnorm",
                                         "mlp": "swiglu"}}).model
  with pytest.raises(convert.ConvertError, match="rope.*rmsnorm.*swiglu"):
    convert.check_exportable(llama)


def test_export_without_biases_and_with_sinusoidal_positions(tmp_path):
  """A jaxlm model GPT-2 can express exactly (zero biases, a fixed position table) exports to
  the same logits."""
  from jaxlm import config as config_lib
  config = config_lib.validate({"model": {"num_layers": 2, "num_heads": 2, "embed_dim": 32,
                                          "mlp_dim": 64, "vocab_size": 300, "max_seq_len": 32,
                                          "positional": "sinusoidal", "use_bias": False,
                                          "tie_embeddings": False},
                                "data": {"seq_len": 32, "stride": 32}})
  params = Transformer(config.model).init(jax.random.PRNGKey(0),
                                             np.zeros((1, 8), np.int32))["params"]
  params = jax.tree.map(lambda p: getattr(p, "value", p), params,
                        is_leaf=lambda p: hasattr(p, "value"))

  class _Tokenizer:  # export needs only eos and the bytes of the tokenizer file
    eos_id, file_name = 3, "tokenizer.model"

    def serialize(self):
      return b"sentencepiece bytes"

  convert.export_gpt2(config.model, params, _Tokenizer(), str(tmp_path / "out"))
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).eval()
  tokens = np.random.default_rng(0).integers(0, 300, (2, 20)).astype(np.int32)
  ours = generate_lib.forward_logits(config.model, params, tokens)
  assert np.max(np.abs(ours - _torch_logits(reloaded, tokens))) < 1e-4
  assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"sentencepiece bytes"


@pytest.mark.e2e
def test_pretrain_refuses_an_imported_run(small_gpt2):
  _, _, workdir = small_gpt2
  before = sorted(os.listdir(workdir))
  result = subprocess.run([sys.executable, "-m", "experiments.pretrain", f"--workdir={workdir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: workdir")
  assert "holds imported weights" in result.stderr
  assert sorted(os.listdir(workdir)) == before


@pytest.mark.e2e
def test_pretrain_from_scratch_with_a_gpt2_tokenizer(small_gpt2, tmp_path):
  """The byte-level BPE serves training like SentencePiece does: tokenizer.json in the run
  directory, generation from it."""
  hf_dir, _, _ = small_gpt2
  vocab = tokenizer_lib.load_tokenizer(str(hf_dir)).vocab_size
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i, text in enumerate(_texts()):
    (corpus / f"{i}.txt").write_text(text, encoding="utf-8")
  workdir = tmp_path / "run"
  overrides = {"data.corpus": "text_files", "data.files": f"{corpus}/*.txt",
               "data.tokenizer": str(hf_dir), "data.data_dir": str(tmp_path / "cache"),
               "data.seq_len": 32, "data.stride": 32, "data.validation_fraction": 0.2,
               "model.vocab_size": vocab, "model.num_layers": 1, "model.embed_dim": 32,
               "model.num_heads": 2, "model.mlp_dim": 64, "train.num_steps": 3,
               "train.global_batch_size": 8, "train.eval_batches": 1,
               "train.sample_max_new_tokens": 4}
  result = subprocess.run(
      [sys.executable, "-m", "experiments.pretrain", f"--workdir={workdir}", "--noprogress",
       *[f"--config.{k}={v}" for k, v in overrides.items()]],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert (workdir / "tokenizer.json").is_file() and not (workdir / "tokenizer.model").exists()
  run = run_lib.open_run(str(workdir))
  assert isinstance(run.tokenizer, tokenizer_lib.ByteLevelBPETokenizer)
  assert run.tokenizer.encode("def f():") == tokenizer_lib.load_tokenizer(str(hf_dir)).encode(
      "def f():")
