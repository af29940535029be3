"""Tokenizers: a small common interface, and SentencePiece BPE trained on the corpus.

Every tokenizer has the same fixed special ids (PAD_ID=0, UNK_ID=1, BOS_ID=2, EOS_ID=3) and
round-trips arbitrary text exactly: `decode(encode(s)) == s` for tabs, runs of spaces, leading
and trailing whitespace, blank lines, "\\r\\n", CJK, emoji and control characters. Ordinary text
never encodes to BOS/EOS/PAD (a literal "<s>" is just characters).

SentencePiece settings (see DESIGN.md, "Known pitfalls"): BPE with the identity normalizer, no
whitespace collapsing, no dummy prefix, pieces that may span spaces and lines, byte fallback for
rare characters. SentencePiece is built around one sentence per line, so newlines are replaced
by the private-use character NEWLINE (U+E000) before training and encoding and restored on
decode; pieces can then join a line end with the next line's indentation.
To keep that a bijection, three characters are escaped with ESCAPE (U+E001) first:
    U+E001 -> U+E001 'e'    U+E000 -> U+E001 'n'    U+2581 ('▁') -> U+E001 's'
(U+2581 because SentencePiece itself uses it for spaces and would decode a literal one as " ").
Decoding undoes exactly these; any other U+E001 is kept as is.

A GPT-2 byte-level BPE loader can implement the same `Tokenizer` protocol later.
"""

from __future__ import annotations

import collections.abc
import hashlib
import io
import json
import os
import random
import re
import tempfile
from typing import Iterable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import sentencepiece as spm

from jaxlm import corpora
from jaxlm.config import DataConfig


class TokenizerError(ValueError):
  """A tokenizer cannot be found, loaded, trained or used; the message says how to fix it."""


# Fixed special ids, identical for every tokenizer jaxlm trains (and required of loaded ones).
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

NEWLINE = "\ue000"   # stands for "\n" inside SentencePiece
ESCAPE = "\ue001"    # escapes literal NEWLINE / ESCAPE / U+2581 in the input
_SP_SPACE = "\u2581"  # SentencePiece's own space marker
_UNESCAPE = {ESCAPE + "e": ESCAPE, ESCAPE + "n": NEWLINE, ESCAPE + "s": _SP_SPACE, NEWLINE: "\n"}
_UNESCAPE_RE = re.compile(f"{ESCAPE}[ens]|{NEWLINE}")

# Training "sentences" are chunks of whole lines of at most this many characters (a longer line
# is cut). SentencePiece skips sentences over max_sentence_length *bytes*: 4 per character at most.
_CHUNK_CHARS = 400
_TRAINER_SETTINGS = dict(
    model_type="bpe",
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    split_by_whitespace=False,
    allow_whitespace_only_pieces=True,
    byte_fallback=True,
    # 0.9995 beat 1.0 slightly on held-out stdlib files (3.778 vs 3.775 bytes/token): the rarest
    # characters are cheaper as byte pieces than as vocabulary entries.
    character_coverage=0.9995,
    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
    pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
    # We sample (seeded) in _sample_sentences; SentencePiece's own sampling is unseeded: off.
    input_sentence_size=0,
    shuffle_input_sentence=True,
    max_sentence_length=4 * _CHUNK_CHARS,
    num_threads=2,
)
# Bump when anything that changes a trained model changes, so cached models are not reused.
_FORMAT_VERSION = 1


@runtime_checkable
class Tokenizer(Protocol):
  """What the rest of jaxlm needs from a tokenizer."""
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  unk_id: int

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS/EOS added)."""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`[encode(t) for t in texts]`, using several threads."""

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; special ids (pad, bos, eos) decode to nothing."""

  def byte_lengths(self) -> np.ndarray:
    """[vocab_size] UTF-8 bytes each token stands for (for bits per byte)."""


def escape(text: str) -> str:
  """Text as SentencePiece sees it: newlines -> NEWLINE, reserved characters escaped."""
  if ESCAPE in text or NEWLINE in text or _SP_SPACE in text:
    text = (text.replace(ESCAPE, ESCAPE + "e").replace(NEWLINE, ESCAPE + "n")
            .replace(_SP_SPACE, ESCAPE + "s"))
  return text.replace("\n", NEWLINE)


def unescape(text: str) -> str:
  """Inverse of `escape`."""
  if ESCAPE not in text:
    return text.replace(NEWLINE, "\n")
  return _UNESCAPE_RE.sub(lambda m: _UNESCAPE[m.group(0)], text)


class SentencePieceTokenizer:
  """A SentencePiece model with jaxlm's newline/escape convention and fixed special ids."""

  def __init__(self, model_proto: bytes, model_path: str = ""):
    self.model_path = model_path
    self._model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size: int = self._sp.get_piece_size()
    self.pad_id, self.unk_id, self.bos_id, self.eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
    found = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
    if found != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
      raise TokenizerError(
          f"tokenizer {model_path or '(in memory)'} has special ids pad/unk/bos/eos={found}, but "
          f"jaxlm needs {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; retrain it with train_sentencepiece "
          f"(or leave data.tokenizer empty to train one).")

  @classmethod
  def load(cls, path: str) -> SentencePieceTokenizer:
    """Loads a `.model` file; TokenizerError if it is missing or not a SentencePiece model."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
      raise TokenizerError(f"tokenizer file {path} does not exist; set data.tokenizer to a "
                           f"SentencePiece .model file, or leave it empty to train one.")
    with open(path, "rb") as f:
      proto = f.read()
    try:
      return cls(proto, path)
    except (RuntimeError, OSError) as e:  # sentencepiece's parse errors
      raise TokenizerError(f"tokenizer file {path} is not a SentencePiece model "
                           f"({str(e).splitlines()[0]}); point data.tokenizer at a .model file.")

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(escape(text))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
      return []
    return self._sp.encode([escape(t) for t in texts], num_threads=os.cpu_count() or 1)

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]  # also accepts numpy arrays
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise TokenizerError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}) "
                           f"of tokenizer {self.model_path or '(in memory)'}.")
    return unescape(self._sp.decode(ids))

  def id_to_piece(self, token_id: int) -> str:
    """The vocabulary entry of `token_id`, as SentencePiece stores it (for inspection)."""
    return self._sp.id_to_piece(int(token_id))

  def byte_lengths(self) -> np.ndarray:
    """[vocab_size] UTF-8 bytes of text each token stands for (special tokens: 0, byte-fallback
    pieces: 1), so bits per byte can be computed from token ids alone."""
    lengths = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self._sp.is_byte(i):
        lengths[i] = 1
      elif not (self._sp.is_control(i) or self._sp.is_unknown(i)):
        text = unescape(self._sp.id_to_piece(i).replace(_SP_SPACE, " "))
        lengths[i] = len(text.encode("utf-8"))
    return lengths

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.model_path or '(in memory)'}, vocab={self.vocab_size})"


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a tokenizer file (SentencePiece `.model`); TokenizerError if missing or invalid."""
  return SentencePieceTokenizer.load(path)


# ----------------------------------------------------------------------------------------------
# Training.

def _line_chunks(text: str, max_chars: int = _CHUNK_CHARS) -> Iterator[str]:
  """Splits escaped text into chunks of whole lines (each keeps its NEWLINE) of <= max_chars.

  A line longer than max_chars on its own is cut into max_chars pieces.
  """
  lines = text.split(NEWLINE)
  chunk = ""
  for number, line in enumerate(lines):
    if number < len(lines) - 1:
      line += NEWLINE
    while len(line) > max_chars:
      if chunk:
        yield chunk
        chunk = ""
      yield line[:max_chars]
      line = line[max_chars:]
    if chunk and len(chunk) + len(line) > max_chars:
      yield chunk
      chunk = ""
    chunk += line
  if chunk:
    yield chunk


def _document_chunks(document: str) -> list[str]:
  """Training chunks of one document; none for a blank document."""
  return list(_line_chunks(escape(document))) if document.strip() else []


def _sample_sentences(documents: Iterable[str], max_sentences: int, seed: int) -> list[str]:
  """Up to max_sentences training chunks, chosen with a seeded RNG (deterministic).

  A random-access sequence of documents is visited in a seeded random order and reading stops
  once enough chunks are collected (fast on huge corpora); any other iterable is read fully with
  reservoir sampling. SentencePiece's own sampling is unseeded, so it is switched off and gets
  exactly these sentences.
  """
  rng = random.Random(seed)
  chunks: list[str] = []
  if isinstance(documents, collections.abc.Sequence):
    order = list(range(len(documents)))
    rng.shuffle(order)
    for index in order:
      chunks.extend(_document_chunks(documents[index]))
      if len(chunks) >= max_sentences:
        break
    if len(chunks) > max_sentences:
      chunks = rng.sample(chunks, max_sentences)
    return chunks
  seen = 0
  for document in documents:
    for chunk in _document_chunks(document):
      if len(chunks) < max_sentences:
        chunks.append(chunk)
      else:
        slot = rng.randrange(seen + 1)
        if slot < max_sentences:
          chunks[slot] = chunk
      seen += 1
  return chunks


def train_sentencepiece(documents: Iterable[str], vocab_size: int, model_path: str,
                        max_sentences: int = 300_000, seed: int = 0) -> SentencePieceTokenizer:
  """Trains a BPE model on `documents` and writes it atomically to `model_path`.

  Deterministic for the same documents, settings and seed. Raises TokenizerError when the
  vocabulary cannot be built (too small for the 4 special + 256 byte pieces, or too large for
  the text).
  """
  minimum = 4 + 256 + 1
  if vocab_size < minimum:
    raise TokenizerError(f"model.vocab_size={vocab_size} is too small for a byte-fallback BPE "
                         f"tokenizer (4 special + 256 byte pieces); use at least {minimum}.")
  sentences = _sample_sentences(documents, max_sentences, seed)
  if not sentences:
    raise TokenizerError("no text to train the tokenizer on: the corpus' train split is empty.")
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  with open(os.devnull, "w") as quiet:  # SentencePiece logs thousands of lines to stderr
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
          logstream=quiet, **_TRAINER_SETTINGS)
    except RuntimeError as e:
      # SentencePiece says e.g. "INTERNAL: file.cc(744) [check] Vocabulary size too high (300).
      # Please set it to a value <= 265." Keep the sentence that names the fix.
      reason = " ".join(str(e).split()).rsplit("] ", 1)[-1]
      raise TokenizerError(f"SentencePiece training with model.vocab_size={vocab_size} failed: "
                           f"{reason} (set --config.model.vocab_size accordingly).") from None
  _write_atomically(model_path, model.getvalue())
  return SentencePieceTokenizer(model.getvalue(), model_path)


def _write_atomically(path: str, content: bytes) -> None:
  """Writes to a temporary file beside `path`, then renames: a killed run leaves no half file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(content)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


# ----------------------------------------------------------------------------------------------
# The tokenizer of a run.

def get_tokenizer(data: DataConfig, vocab_size: int) -> tuple[Tokenizer, str]:
  """The tokenizer for `data` and its file path.

  With `data.tokenizer` set, loads that file (its vocabulary must equal `vocab_size`). Otherwise
  trains SentencePiece on the corpus' train split on first use and caches the model under
  `data.data_dir/tokenizers/<corpus_id>-v<vocab_size>-<settings hash>.model`.
  """
  if data.tokenizer:
    tokenizer = load_tokenizer(data.tokenizer)
    if tokenizer.vocab_size != vocab_size:
      raise TokenizerError(
          f"tokenizer {data.tokenizer} has vocabulary {tokenizer.vocab_size} but "
          f"model.vocab_size={vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size}.")
    return tokenizer, data.tokenizer
  path = tokenizer_cache_path(data, vocab_size)
  if os.path.exists(path):
    return load_tokenizer(path), path
  with corpora.file_lock(path + ".lock"):
    if os.path.exists(path):  # trained by another process while we waited
      return load_tokenizer(path), path
    documents = corpora.load_split(data, "train")
    tokenizer = train_sentencepiece(documents, vocab_size, path,
                                    max_sentences=data.tokenizer_max_sentences)
  return tokenizer, path


def tokenizer_cache_path(data: DataConfig, vocab_size: int) -> str:
  """Where `get_tokenizer` caches the model trained for `data` and `vocab_size`."""
  # corpus_id covers the documents and the split; the hash covers how we train on them.
  settings = dict(_TRAINER_SETTINGS, chunk_chars=_CHUNK_CHARS, format=_FORMAT_VERSION,
                  max_sentences=data.tokenizer_max_sentences, seed=0)
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
  name = f"{corpora.corpus_id(data)}-v{vocab_size}-{digest}.model"
  return os.path.join(os.path.expanduser(data.data_dir), "tokenizers", name)
