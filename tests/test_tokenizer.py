"""Tests for jaxlm.tokenizer: exact round trips, compression, fixed ids, caching and errors."""

import copy
import os
import random

import numpy as np
import pytest

from jaxlm import corpora
from jaxlm import tokenizer as tk
from jaxlm.config import DataConfig
from tests.helpers import llama2_style_tokenizer_json


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """The default setup: pystdlib, vocab 4096, trained once per session into a tmp data_dir."""
  data = DataConfig(data_dir=str(tmp_path_factory.mktemp("tokenizer_data")))
  tokenizer, path = tk.get_tokenizer(data, 4096)
  return data, tokenizer, path


@pytest.fixture(scope="session")
def validation(trained):
  data, _, _ = trained
  return list(corpora.load_split(data, "validation"))


def test_trained_tokenizer_has_fixed_special_ids(trained):
  _, tokenizer, path = trained
  assert isinstance(tokenizer, tk.Tokenizer)
  assert tokenizer.vocab_size == 4096
  assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
  assert [tokenizer.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
  assert os.path.basename(path).startswith(corpora.corpus_id(trained[0]) + "-v4096-")


def test_held_out_files_round_trip_and_compress(trained, validation):
  _, tokenizer, _ = trained
  encoded = tokenizer.encode_batch(validation)
  for text, ids in zip(validation, encoded):
    assert tokenizer.decode(ids) == text
  assert encoded[0] == tokenizer.encode(validation[0])
  total_bytes = sum(len(text.encode()) for text in validation)
  bytes_per_token = total_bytes / sum(len(ids) for ids in encoded)
  assert bytes_per_token >= 3.5, bytes_per_token  # ~3.75 measured on the default corpus
  assert all(min(ids) > tk.EOS_ID for ids in encoded if ids)  # no unk, no specials


def test_indentation_and_newlines_are_tokens(trained):
  _, tokenizer, _ = trained
  ids = tokenizer.encode("def f(x):\n        return x\n")
  assert len(ids) <= 8  # runs of spaces and newline+indent merge into few pieces
  assert tokenizer.decode(ids) == "def f(x):\n        return x\n"


EDGE_CASES = [
    "", " ", "\n", "\n\n\n", "\t\tx", "   leading", "trailing   ", "a  b   c    d",
    "line\r\nwindows\r\n", "\r", "日本語のテキスト", "emoji 😀👍🏽 family 👨‍👩‍👧",
    "\x00\x01\x1b\x7f\x85",
    "<s> and </s> and <pad> <unk> as text", "\ue000", "\ue001", "\ue001n", "\ue001e\ue000",
    "\u2581", "a\u2581b \u2581", "\ue000\n\ue001\u2581", "\u200b\ufeff\u2028\u2029", "e\u0301",
    "\U0010ffff\U000e0001", "x" * 5000, "\n" * 300 + " " * 300,
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_round_trip(trained, text):
  _, tokenizer, _ = trained
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert not {tk.PAD_ID, tk.UNK_ID, tk.BOS_ID, tk.EOS_ID} & set(ids)


_RANGES = [(0x20, 0x7E)] * 6 + [(0x00, 0x1F), (0x7F, 0x9F), (0xA0, 0x24F), (0x300, 0x36F),
                                (0x2000, 0x206F), (0x2580, 0x2582), (0x3040, 0x30FF),
                                (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xE002),
                                (0xFFF0, 0xFFFF), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]
_PIECES = ["\n", "\r\n", "\t", "    ", " ", "<s>", "</s>", "\ue000", "\ue001", "\u2581", "def "]


def _random_text(rng: random.Random) -> str:
  parts = []
  for _ in range(rng.randrange(1, 40)):
    if rng.random() < 0.3:
      parts.append(rng.choice(_PIECES))
    else:
      low, high = rng.choice(_RANGES)
      code = rng.randint(low, high)
      if 0xD800 <= code <= 0xDFFF:  # lone surrogates are not text (not UTF-8 encodable)
        code = 0xFFFD
      parts.append(chr(code) * rng.randrange(1, 4))
  return "".join(parts)


def test_random_unicode_round_trips(trained):
  _, tokenizer, _ = trained
  rng = random.Random(1234)
  texts = [_random_text(rng) for _ in range(500)]
  for text, ids in zip(texts, tokenizer.encode_batch(texts)):
    assert tokenizer.decode(ids) == text, repr(text)
    assert min(ids, default=4) > tk.EOS_ID


def test_decode_accepts_numpy_and_drops_specials(trained):
  _, tokenizer, _ = trained
  ids = tokenizer.encode("hello world\n")
  padded = np.array([tk.BOS_ID] + ids + [tk.EOS_ID, tk.PAD_ID, tk.PAD_ID], dtype=np.int32)
  assert tokenizer.decode(padded) == "hello world\n"
  with pytest.raises(tk.TokenizerError, match="outside the vocabulary"):
    tokenizer.decode([4096])


def test_escape_is_a_bijection():
  rng = random.Random(0)
  for _ in range(2000):
    text = "".join(rng.choice(["\n", "\ue000", "\ue001", "\u2581", "e", "n", "s", "x"])
                   for _ in range(rng.randrange(12)))
    escaped = tk.escape(text)
    assert "\n" not in escaped and "\u2581" not in escaped
    assert tk.unescape(escaped) == text


def test_cached_tokenizer_is_reused_not_retrained(trained, monkeypatch):
  data, tokenizer, path = trained
  mtime = os.path.getmtime(path)

  def fail(*args, **kwargs):
    raise AssertionError("retrained")
  monkeypatch.setattr(tk, "train_sentencepiece", fail)
  again, again_path = tk.get_tokenizer(data, 4096)
  assert again_path == path and os.path.getmtime(path) == mtime
  assert again.encode("import os\n") == tokenizer.encode("import os\n")
  leftovers = [f for f in os.listdir(os.path.dirname(path)) if ".tmp-" in f]
  assert not leftovers


def test_explicit_tokenizer_file(trained):
  data, tokenizer, path = trained
  explicit = DataConfig(data_dir=data.data_dir, tokenizer=path)
  loaded, loaded_path = tk.get_tokenizer(explicit, 4096)
  assert loaded_path == path and loaded.encode("x = 1\n") == tokenizer.encode("x = 1\n")
  with pytest.raises(tk.TokenizerError, match=r"has vocabulary 4096 but model.vocab_size=1000; "
                                              r"set --config.model.vocab_size to at least 4096"):
    tk.get_tokenizer(explicit, 1000)
  padded, _ = tk.get_tokenizer(explicit, 4096 + 64)  # a larger model vocabulary pads it
  assert padded.vocab_size == 4096


def test_missing_or_invalid_tokenizer_file(tmp_path):
  with pytest.raises(tk.TokenizerError, match=r"nope\.model does not exist"):
    tk.load_tokenizer(str(tmp_path / "nope.model"))
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"this is not a sentencepiece model")
  with pytest.raises(tk.TokenizerError, match=r"garbage\.model is not a SentencePiece model"):
    tk.get_tokenizer(DataConfig(tokenizer=str(garbage)), 4096)


def test_tokenizer_copies_through_its_model_bytes(trained):
  _, tokenizer, _ = trained
  clone = copy.deepcopy(tokenizer)  # via __reduce__, as grain worker processes would receive it
  assert clone.encode("print('hi')\n") == tokenizer.encode("print('hi')\n")


# ----------------------------------------------------------------------------------------------
# Training on small inputs (fast): determinism, sampling, errors.

_SMALL = [f"def function_{i}(x):\n    return x * {i}\n\n# comment {i}\n" * (1 + i % 3)
          for i in range(60)]


def test_training_is_deterministic_for_sequences_and_iterables(tmp_path):
  first = tk.train_sentencepiece(_SMALL, 300, str(tmp_path / "a.model"))
  second = tk.train_sentencepiece(iter(_SMALL), 300, str(tmp_path / "b.model"))
  assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
  assert first.vocab_size == second.vocab_size == 300
  assert sorted(os.listdir(tmp_path)) == ["a.model", "b.model"]  # no temporary files left


def test_max_sentences_limits_training_sample(tmp_path):
  sample = tk._sample_sentences  # pylint: disable=protected-access
  chunks = sample(_SMALL, 5, seed=0)
  assert len(chunks) == 5 and chunks == sample(_SMALL, 5, seed=0)
  assert len(sample(iter(_SMALL), 5, seed=0)) == 5
  long_line = sample(["y" * 1000 + "\n"], 10, seed=0)
  assert [len(c) for c in long_line] == [400, 400, 201]  # cut only because the line is too long
  lines = sample(["a" * 300 + "\n" + "b" * 300 + "\n"], 10, seed=0)
  assert sorted(lines) == ["a" * 300 + tk.NEWLINE, "b" * 300 + tk.NEWLINE]  # whole lines
  with pytest.raises(tk.TokenizerError, match=r"model.vocab_size=2000 failed: Vocabulary size "
                                              r"too high \(2000\). Please set it to a value <="):
    tk.train_sentencepiece(_SMALL, 2000, str(tmp_path / "c.model"), max_sentences=20)


def test_training_errors(tmp_path):
  with pytest.raises(tk.TokenizerError, match="too small.*at least 261"):
    tk.train_sentencepiece(_SMALL, 100, str(tmp_path / "x.model"))
  with pytest.raises(tk.TokenizerError, match="smaller than required_chars"):
    tk.train_sentencepiece(_SMALL + ["".join(map(chr, range(0x4E00, 0x4E80)))], 300,
                           str(tmp_path / "x.model"))
  with pytest.raises(tk.TokenizerError, match="no text"):
    tk.train_sentencepiece(["", "  \n"], 300, str(tmp_path / "x.model"))
  assert not os.path.exists(tmp_path / "x.model")


def test_get_tokenizer_on_text_files(tmp_path):
  for i in range(12):
    (tmp_path / f"{i}.txt").write_text(_SMALL[i] * 3)
  data = DataConfig(corpus="text_files", files=str(tmp_path / "*.txt"),
                    data_dir=str(tmp_path / "data"), validation_fraction=0.25)
  tokenizer, path = tk.get_tokenizer(data, 300)
  assert os.path.basename(path).startswith(corpora.corpus_id(data) + "-v300-")
  assert tokenizer.decode(tokenizer.encode(_SMALL[5])) == _SMALL[5]


def test_a_sentencepiece_style_tokenizer_json_reads_as_transformers_does(tmp_path):
  """Llama 2 / Mistral checkpoints carry this tokenizer.json: the same ids and text as
  transformers, eos </s>, and byte lengths that count "▁" as a space and <0xNN> as one byte."""
  transformers = pytest.importorskip("transformers")
  path = tmp_path / "tokenizer.json"
  llama2_style_tokenizer_json(path)
  ours = tk.load_tokenizer(str(tmp_path))
  reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
  assert ours.metaspace and ours.eos_id == reference.convert_tokens_to_ids("</s>")
  assert ours.unk_id == reference.convert_tokens_to_ids("<unk>") == 0
  texts = ["def dumps(obj):", "  two  spaces\n\nand lines", "naïve café ☃ 你好 \U0001f600"]
  for text in texts:
    ids = reference.encode(text, add_special_tokens=False)
    assert ours.encode(text) == ids and ours.encode_batch([text]) == [ids]
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
  ids = ours.encode(texts[2])
  assert any(reference.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # fallback
  lengths = ours.byte_lengths()
  for text in texts:  # (+1: the "▁" the normalizer puts before the text)
    assert int(lengths[ours.encode(text)].sum()) == len(text.encode("utf-8")) + 1
