"""Tokenizers: a small common interface, SentencePiece BPE trained on the corpus, and GPT-2's
byte-level BPE loaded from `vocab.json` + `merges.txt`.

SentencePiece tokenizers jaxlm trains have fixed special ids (PAD_ID=0, UNK_ID=1, BOS_ID=2,
EOS_ID=3) and round-trip arbitrary text exactly: `decode(encode(s)) == s` for tabs, runs of
spaces, leading and trailing whitespace, blank lines, "\\r\\n", CJK, emoji and control
characters. Ordinary text never encodes to BOS/EOS/PAD (a literal "<s>" is just characters).

SentencePiece settings (chosen by measurement on the default corpus): BPE with the identity
normalizer, no whitespace collapsing, no dummy prefix, pieces that may span spaces and lines,
byte fallback for rare characters. SentencePiece is built around one sentence per line, so
newlines are replaced by the private-use character NEWLINE (U+E000) before training and encoding
and restored on decode; pieces can then join a line end with the next line's indentation. To
keep that a bijection, three characters are escaped with ESCAPE (U+E001) first:
    U+E001 -> U+E001 'e'    U+E000 -> U+E001 'n'    U+2581 ('▁') -> U+E001 's'
(U+2581 because SentencePiece itself uses it for spaces and would decode a literal one as " ").
Decoding undoes exactly these; any other U+E001 is kept as is.

GPT-2 byte-level BPE (`ByteLevelBPETokenizer`) runs on Hugging Face `tokenizers` (Rust): it is
what `transformers` itself uses, so ids match it exactly, and it encodes megabytes per second
where a pure-Python BPE manages tens of kilobytes. Its only special token is `<|endoftext|>`
(end of text, also used as pad and bos, as in GPT-2); like `transformers`, a literal
"<|endoftext|>" in the text encodes to that id. A run directory stores it as `tokenizer.json`
(the `tokenizers` single-file format), a SentencePiece tokenizer as `tokenizer.model`.
"""

from __future__ import annotations

import collections.abc
import functools
import hashlib
import io
import json
import os
import random
import re
from typing import Any, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import sentencepiece as spm

from jaxlm import files
from jaxlm.config import DataConfig
from jaxlm.errors import UserError


class TokenizerError(UserError):
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
  unk_id: int      # -1 if the tokenizer has none (byte-level BPE needs none)
  file_name: str   # its file in a run directory: "tokenizer.model" or "tokenizer.json"

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS/EOS added)."""

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    """`[encode(t) for t in texts]`, on `num_threads` threads (0: every core)."""

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; special ids (pad, bos, eos) decode to nothing."""

  def byte_lengths(self) -> np.ndarray:
    """[vocab_size] UTF-8 bytes each token stands for (for bits per byte)."""

  def serialize(self) -> bytes:
    """The tokenizer as one file's content (what `file_name` holds; `from_bytes` reads it)."""


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


def _checked_ids(ids: Sequence[int], vocab_size: int, source: str) -> list[int]:
  """`ids` (a list or numpy array) as ints; TokenizerError for an id outside the vocabulary."""
  ids = [int(i) for i in ids]
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise TokenizerError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size}) of "
                         f"tokenizer {source or '(in memory)'}.")
  return ids


class SentencePieceTokenizer:
  """A SentencePiece model with jaxlm's newline/escape convention and fixed special ids."""
  file_name = "tokenizer.model"
  chat_template = None  # a jaxlm.chat.ChatTemplate a run keeps beside its tokenizer

  def __init__(self, model_proto: bytes, model_path: str = ""):
    self.model_path = model_path
    self._model_proto = model_proto
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except (RuntimeError, OSError) as e:  # sentencepiece's parse errors
      raise TokenizerError(f"tokenizer {model_path or '(in memory)'} is not a SentencePiece model "
                           f"({str(e).splitlines()[0]}); point data.tokenizer at a .model file."
                           ) from None
    self.vocab_size: int = self._sp.get_piece_size()
    self.pad_id, self.unk_id, self.bos_id, self.eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
    found = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
    if found != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
      raise TokenizerError(
          f"tokenizer {model_path or '(in memory)'} has special ids pad/unk/bos/eos={found}, but "
          f"jaxlm needs {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; retrain it with train_sentencepiece "
          f"(or leave data.tokenizer empty to train one).")

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(escape(text))

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    if not texts:
      return []
    return self._sp.encode([escape(t) for t in texts],
                           num_threads=num_threads or os.cpu_count() or 1)

  def decode(self, ids: Sequence[int]) -> str:
    return unescape(self._sp.decode(_checked_ids(ids, self.vocab_size, self.model_path)))

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

  def serialize(self) -> bytes:
    return self._model_proto

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.model_path or '(in memory)'}, vocab={self.vocab_size})"


# -- GPT-2 byte-level BPE -----------------------------------------------------------------------

END_OF_TEXT = "<|endoftext|>"


@functools.cache
def _gpt2_byte_chars() -> frozenset[str]:
  """The 256 characters GPT-2's vocab.json spells bytes with (`bytes_to_unicode` of OpenAI's
  encoder.py: the 188 printable bytes stand for themselves, the other 68 are U+0100 onwards)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  return frozenset(map(chr, printable)) | {chr(256 + i) for i in range(256 - len(printable))}


# End-of-text tokens of byte-level BPE vocabularies, in the order they are looked for: GPT-2,
# Qwen ("<|endoftext|>"), Llama 3 ("<|end_of_text|>"), Llama-style "</s>".
END_OF_TEXT_TOKENS = (END_OF_TEXT, "<|end_of_text|>", "</s>")


def _is_metaspace(spec: dict) -> bool:
  """A SentencePiece-style tokenizer.json: spaces become "▁" (a Metaspace pre-tokenizer or
  decoder, or a normalizer replacing " " with "▁", as transformers converts Llama 2's)."""
  def mentions(part: Any) -> bool:
    if isinstance(part, dict):
      if part.get("type") == "Metaspace" or (part.get("type") == "Replace"
                                              and part.get("content") == "\u2581"):
        return True
      return any(mentions(v) for v in part.values())
    return isinstance(part, list) and any(mentions(p) for p in part)
  return any(mentions(spec.get(k)) for k in ("pre_tokenizer", "normalizer", "decoder"))


def _is_byte_level(part: dict | None) -> bool:
  """A pre-tokenizer or decoder that is (or contains) ByteLevel."""
  part = part or {}
  if part.get("type") == "ByteLevel":
    return True
  inner = part.get("pretokenizers") or part.get("decoders") or []
  return part.get("type") == "Sequence" and any(_is_byte_level(p) for p in inner)


class ByteLevelBPETokenizer:
  """A BPE tokenizer.json on Hugging Face `tokenizers`: byte-level (GPT-2, Llama 3, Qwen), or
  SentencePiece-style with `▁` for spaces and byte fallback (Llama 2, Mistral: what
  `transformers` converts their tokenizer.model to). Ids equal `transformers`' tokenizer of the
  same tokenizer.json. The first of END_OF_TEXT_TOKENS in the vocabulary is eos, bos and pad;
  unk is the model's unk_token (byte-level: none, every byte has a token)."""
  file_name = "tokenizer.json"
  chat_template = None  # a jaxlm.chat.ChatTemplate a run keeps beside its tokenizer

  def __init__(self, tokenizer_json: str, source: str = ""):
    from tokenizers import Tokenizer as HFTokenizer
    self.source = source
    try:
      self._tokenizer = HFTokenizer.from_str(tokenizer_json)
    except Exception as e:  # tokenizers raises bare Exceptions on malformed JSON
      raise TokenizerError(f"tokenizer {source or '(in memory)'} is not a tokenizers JSON file "
                           f"({str(e).splitlines()[0][:200]}); pass GPT-2's vocab.json + "
                           f"merges.txt directory instead.") from None
    spec = json.loads(tokenizer_json)
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    self.metaspace = not _is_byte_level(pre) and _is_metaspace(spec)
    if model.get("type") != "BPE" or not (_is_byte_level(pre) or self.metaspace):
      raise TokenizerError(f"tokenizer {source or '(in memory)'} is neither a byte-level BPE nor "
                           f"a SentencePiece-style one (model {model.get('type')}, pre-tokenizer "
                           f"{pre.get('type')}); jaxlm reads BPE tokenizer.json files (GPT-2, "
                           f"Llama, Mistral, Qwen) and SentencePiece .model files.")
    eos = next((i for i in map(self._tokenizer.token_to_id, END_OF_TEXT_TOKENS)
                if i is not None), None)
    if eos is None:
      raise TokenizerError(f"tokenizer {source or '(in memory)'} has no end-of-text token "
                           f"({', '.join(END_OF_TEXT_TOKENS)}), which jaxlm needs between "
                           f"documents; add one (a special token of tokenizer.json, or an "
                           f"entry of GPT-2's vocab.json).")
    self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
    self.eos_id = self.bos_id = self.pad_id = int(eos)
    unk = model.get("unk_token")
    self.unk_id = self._tokenizer.token_to_id(unk) if unk else None
    self.unk_id = -1 if self.unk_id is None else int(self.unk_id)

  @classmethod
  def from_files(cls, vocab_path: str, merges_path: str) -> ByteLevelBPETokenizer:
    """GPT-2's `vocab.json` + `merges.txt` (the Hugging Face / OpenAI layout)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors
    for path in (vocab_path, merges_path):
      if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file {path} does not exist; a GPT-2 tokenizer needs "
                             f"vocab.json and merges.txt side by side.")
    try:
      bpe = models.BPE.from_file(vocab_path, merges_path)
    except Exception as e:
      raise TokenizerError(f"cannot read GPT-2 tokenizer {vocab_path} + {merges_path} "
                           f"({str(e).splitlines()[0][:200]}); they must be GPT-2's vocab.json "
                           f"and merges.txt.") from None
    tokenizer = HFTokenizer(bpe)
    # GPT-2's settings (as in its tokenizer.json): no prefix space, the GPT-2 split regex.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    if tokenizer.token_to_id(END_OF_TEXT) is not None:
      tokenizer.add_special_tokens([END_OF_TEXT])  # matched in text, as transformers does
    return cls(tokenizer.to_str(), os.path.dirname(os.path.abspath(vocab_path)))

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def id_to_token(self, token_id: int) -> str:
    return self._tokenizer.id_to_token(token_id)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    """(`tokenizers` chooses its threads itself: every core, or one where the process sets
    TOKENIZERS_PARALLELISM=false, as prepare_data's workers do; `num_threads` is not used.)"""
    del num_threads
    if not texts:
      return []
    # (encode_batch_fast: the same ids without character offsets, 1.4x faster measured)
    return [e.ids for e in self._tokenizer.encode_batch_fast(list(texts),
                                                             add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode(_checked_ids(ids, self.vocab_size, self.source),
                                  skip_special_tokens=True)

  def byte_lengths(self) -> np.ndarray:
    """[vocab_size] bytes of each token (vocab.json spells bytes as GPT-2's printable
    characters); special tokens 0."""
    byte_chars = _gpt2_byte_chars()
    lengths = np.zeros(self.vocab_size, np.int32)
    special = {t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special}
    for piece, token_id in self._tokenizer.get_vocab(with_added_tokens=True).items():
      if piece in special or token_id == self.unk_id:
        continue
      if self.metaspace:  # "▁" is a space; byte-fallback pieces <0xNN> are one byte each
        is_byte = len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
        lengths[token_id] = 1 if is_byte else len(piece.replace("\u2581", " ").encode("utf-8"))
        continue
      # One character per byte; an added plain-text token is its UTF-8 itself.
      byte_level = all(c in byte_chars for c in piece)
      lengths[token_id] = len(piece) if byte_level else len(piece.encode("utf-8"))
    return lengths

  def save_gpt2_files(self, directory: str) -> None:
    """Writes `vocab.json` + `merges.txt` (what `transformers`' GPT-2 tokenizer loads)."""
    os.makedirs(directory, exist_ok=True)
    self._tokenizer.model.save(directory)

  def serialize(self) -> bytes:
    return self._tokenizer.to_str().encode("utf-8")

  def __repr__(self) -> str:
    return f"ByteLevelBPETokenizer({self.source or '(in memory)'}, vocab={self.vocab_size})"


def from_bytes(content: bytes, file_name: str, source: str = "") -> Tokenizer:
  """The tokenizer `serialize()` wrote to a file called `file_name`."""
  if file_name.endswith(".json"):
    return ByteLevelBPETokenizer(content.decode("utf-8"), source)
  return SentencePieceTokenizer(content, source)


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a tokenizer: a SentencePiece `.model`, a byte-level BPE `tokenizer.json`, or a
  directory with GPT-2's `vocab.json` + `merges.txt`. TokenizerError if missing or invalid."""
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    # tokenizer.json first: it holds the pre-tokenizer's own split rules (Qwen's and Llama 3's
    # differ from GPT-2's, which vocab.json + merges.txt are read with).
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
      return load_tokenizer(os.path.join(path, "tokenizer.json"))
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.isfile(vocab) and os.path.isfile(merges):
      return ByteLevelBPETokenizer.from_files(vocab, merges)
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
      return load_tokenizer(os.path.join(path, "tokenizer.model"))
    raise TokenizerError(f"tokenizer directory {path} has neither vocab.json + merges.txt nor "
                         f"tokenizer.json / tokenizer.model; point at a tokenizer file.")
  if not os.path.isfile(path):
    raise TokenizerError(f"tokenizer file {path} does not exist; set data.tokenizer to a "
                         f"tokenizer file, or leave it empty to train one.")
  with open(path, "rb") as f:
    return from_bytes(f.read(), path, path)


# -- Training -----------------------------------------------------------------------------------

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


def document_chunks(document: str) -> list[str]:
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
      chunks.extend(document_chunks(documents[index]))
      if len(chunks) >= max_sentences:
        break
    if len(chunks) > max_sentences:
      chunks = rng.sample(chunks, max_sentences)
    return chunks
  seen = 0
  for document in documents:
    for chunk in document_chunks(document):
      if len(chunks) < max_sentences:
        chunks.append(chunk)
      else:
        slot = rng.randrange(seen + 1)
        if slot < max_sentences:
          chunks[slot] = chunk
      seen += 1
  return chunks


def train_sentencepiece(documents: Iterable[str], vocab_size: int, model_path: str,
                        max_sentences: int = 300_000, seed: int = 0,
                        vocab_flag: str = "--config.model.vocab_size") -> SentencePieceTokenizer:
  """Trains a BPE model on `documents` and writes it atomically to `model_path` (if not "").

  Deterministic for the same documents, settings and seed. Raises TokenizerError when the
  vocabulary cannot be built (too small for the 4 special + 256 byte pieces, or too large for
  the text), naming `vocab_flag`.
  """
  minimum, name = 4 + 256 + 1, vocab_flag.removeprefix("--config.")
  if vocab_size < minimum:
    raise TokenizerError(f"{name}={vocab_size} is too small for a byte-fallback BPE tokenizer "
                         f"(4 special + 256 byte pieces); use at least {minimum}.")
  sentences = _sample_sentences(documents, max_sentences, seed)
  if not sentences:
    raise TokenizerError("no text to train the tokenizer on: the corpus' train split is empty.")
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  try:
    # SentencePiece logs thousands of lines to stderr; minloglevel=2 keeps only errors.
    # (Its `logstream` argument needs sys.stderr.fileno(), which Jupyter/Colab do not have.)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        minloglevel=2, **_TRAINER_SETTINGS)
  except RuntimeError as e:
    # SentencePiece says e.g. "INTERNAL: file.cc(744) [check] Vocabulary size too high (300).
    # Please set it to a value <= 265." Keep the sentence that names the fix.
    reason = " ".join(str(e).split()).rsplit("] ", 1)[-1]
    raise TokenizerError(f"SentencePiece training with {name}={vocab_size} failed: {reason} "
                         f"(set {vocab_flag} accordingly).") from None
  if model_path:
    files.write_bytes(model_path, model.getvalue())
  return SentencePieceTokenizer(model.getvalue(), model_path)


# -- The tokenizer of a run ---------------------------------------------------------------------

def get_tokenizer(data: DataConfig, vocab_size: int) -> tuple[Tokenizer, str]:
  """The tokenizer for `data` and its file path.

  With `data.tokenizer` set, loads that file (its vocabulary must fit `vocab_size`: a larger
  model.vocab_size pads the embedding, e.g. to a multiple of mesh.tensor or of 64). Otherwise
  trains SentencePiece on the corpus' train split on first use and caches the model under
  `data.data_dir/tokenizers/<corpus_id>-v<vocab_size>-<settings hash>.model`.
  """
  if data.corpus == "tokens":  # (the tokenizer the shards were encoded with)
    from jaxlm import shards  # pylint: disable=import-outside-toplevel
    tokenizer, path = shards.corpus_tokenizer(data)
    if tokenizer.vocab_size > vocab_size:
      raise TokenizerError(
          f"the tokenizer of the shards in data.{'tokens' if data.tokens else 'mixture'} "
          f"({path}) has vocabulary {tokenizer.vocab_size} but model.vocab_size={vocab_size}; "
          f"set --config.model.vocab_size to at least {tokenizer.vocab_size} (a larger size "
          f"pads the embedding).")
    return tokenizer, path
  if data.tokenizer:
    tokenizer = load_tokenizer(data.tokenizer)
    if tokenizer.vocab_size > vocab_size:
      raise TokenizerError(
          f"tokenizer {data.tokenizer} has vocabulary {tokenizer.vocab_size} but "
          f"model.vocab_size={vocab_size}; set --config.model.vocab_size to at least "
          f"{tokenizer.vocab_size} (a larger size pads the embedding).")
    return tokenizer, data.tokenizer
  from jaxlm import corpora  # imports TFDS (slow): only when a tokenizer must be trained
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
  from jaxlm import corpora
  # corpus_id covers the documents and the split; the hash covers how we train on them.
  settings = dict(_TRAINER_SETTINGS, chunk_chars=_CHUNK_CHARS, format=_FORMAT_VERSION,
                  max_sentences=data.tokenizer_max_sentences, seed=0)
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
  name = f"{corpora.corpus_id(data)}-v{vocab_size}-{digest}.model"
  return os.path.join(os.path.expanduser(data.data_dir), "tokenizers", name)
