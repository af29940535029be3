"""Text generation: prefill the prompt in one pass, then decode with a KV cache in a jitted loop.

Layout of one batch (B rows, P prompt slots, N new-token slots; all static shapes):

  tokens [B, P + N]   row r: P - len_r padding slots | its len_r prompt tokens | generated tokens
  positions           count from each row's first real token; padding has segment id 0, so real
                      tokens never attend to it
  cache               [B, P + N, heads, head_dim] per layer, logical axes as in the model (heads
                      over `tensor`), so decoding runs on a mesh like training does

P is the longest prompt rounded up to a power of two (>= 16) and N is max_new_tokens rounded up
to a multiple of 64, so the two jitted functions, `_start` (prefill + first token) and
`_continue` (a `lax.while_loop` of decode steps up to a *traced* stop step), compile once per
(batch, P, N, kv_cache): a new prompt length, a different max_new_tokens in the same bucket,
other sampling values (all traced) or another streaming chunk size reuse the compiled code.
Attention always spans the whole P + N cache (unwritten slots are masked), so the time per
token does not grow during a generation.

`kv_cache=False` is the reference path: the same loop and sampling code, but every step runs
the model over the whole [B, P + N] buffer and reads the logits at the current slot.

Sampling: temperature (0 = greedy), then top-k, top-p (nucleus: the smallest set of most likely
tokens whose mass reaches p), min-p (drop tokens below min_p * the top token's probability).
Row r's step t draws with fold_in(fold_in(key(seed), r), t): reproducible from the seed,
independent of chunking and of the kv_cache switch.

Stopping: each row stops at EOS (on device), at max_new_tokens, or at a stop string. Stop
strings are checked on the host, on decoded text, after every chunk of decode steps: a stop
string has many tokenizations (a BPE token may hold it together with neighbouring characters),
so matching token sequences on device would miss some; text matching is exact, costs at most
one chunk of extra steps for that row, and the text is cut just before the stop string.

`stream()` yields text pieces as chunks finish (text that could still turn out to be the start
of a stop string, or an incomplete UTF-8 character, is held back); `generate()` collects them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Iterator, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxlm import config as config_lib
from jaxlm import metrics, sharding
from jaxlm.config import Config, ModelConfig
from jaxlm.errors import UserError
from jaxlm.model import Transformer, init_cache


class GenerationError(UserError):
  """Generation arguments are invalid; the message names the argument and the fix."""


MIN_PROMPT_BUCKET = 16
NEW_TOKENS_MULTIPLE = 64


# -- Settings -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """What to generate: how many tokens, how each is drawn, where a row stops.

  temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 switch their filter off. seed fixes
  the draws (row r, step t use fold_in(fold_in(key(seed), r), t)); rng, a PRNG key, overrides
  it. stop: strings that end a row (its text is cut before them)."""
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  seed: int = 0
  stop: tuple[str, ...] = ()
  rng: Any = None

  def __post_init__(self):
    stop = self.stop
    object.__setattr__(self, "stop", (stop,) if isinstance(stop, str) else tuple(stop))

  def check(self) -> None:
    """Raises GenerationError naming the first bad field (before anything compiles)."""
    check_sampling(self.temperature, self.top_k, self.top_p, self.min_p)
    check_max_new_tokens(self.max_new_tokens)
    if any(not isinstance(s, str) or not s for s in self.stop):
      raise GenerationError(f"stop={list(self.stop)!r}: stop strings must be non-empty strings.")


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How to run a generation (none of it changes the tokens drawn).

  chunk_size: decode steps per jitted call between host checks (stop strings, streaming);
  kv_cache=False: the uncached reference path; truncate: keep a too-long prompt's last tokens
  instead of refusing it; mesh: decode under this mesh (default: the one the params live on);
  with_logits: keep every step's logits [B, max_new_tokens, vocab] (tests)."""
  chunk_size: int = 8
  kv_cache: bool = True
  truncate: bool = False
  mesh: Mesh | None = None
  with_logits: bool = False

  def check(self) -> None:
    size = self.chunk_size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
      raise GenerationError(f"chunk_size={size}: must be an integer >= 1.")


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """The ids decoding needs from a tokenizer: end-of-text, padding, and the vocabulary size
  (ids from it on, an embedding padded beyond the tokenizer, are never drawn; None: the
  model's)."""
  eos_id: int
  pad_id: int
  vocab_size: int | None = None

  @classmethod
  def of(cls, tokenizer) -> "TokenIds":
    return cls(tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size)


_FIELDS = {f.name: cls for cls in (SamplingParams, DecodeOptions)
           for f in dataclasses.fields(cls)}


def settings(sampling: SamplingParams | None = None, options: DecodeOptions | None = None,
             **fields: Any) -> tuple[SamplingParams, DecodeOptions]:
  """`sampling` and `options` with keyword `fields` of either replacing theirs (so
  `generate(..., max_new_tokens=20, temperature=0)` works), checked; GenerationError names an
  unknown or bad field."""
  unknown = sorted(set(fields) - set(_FIELDS))
  if unknown:
    raise GenerationError(f"unknown generation argument(s) {unknown}; the fields of "
                          f"SamplingParams and DecodeOptions are {sorted(_FIELDS)}.")
  sampling = dataclasses.replace(sampling or SamplingParams(), **{
      k: v for k, v in fields.items() if _FIELDS[k] is SamplingParams})
  options = dataclasses.replace(options or DecodeOptions(), **{
      k: v for k, v in fields.items() if _FIELDS[k] is DecodeOptions})
  sampling.check()
  options.check()
  return sampling, options


def check_sampling(temperature: float, top_k: int, top_p: float, min_p: float = 0.0) -> None:
  """Raises GenerationError naming the first bad sampling argument."""
  number = (int, float, np.integer, np.floating)
  if isinstance(temperature, bool) or not (isinstance(temperature, number)
                                           and math.isfinite(temperature) and temperature >= 0):
    raise GenerationError(f"temperature={temperature}: must be a finite number >= 0 "
                          f"(0 means greedy).")
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise GenerationError(f"top_k={top_k}: must be an integer >= 0 (0 means no top-k filter).")
  if not 0.0 < top_p <= 1.0:
    raise GenerationError(f"top_p={top_p}: must be in (0, 1] (1 means no nucleus filter).")
  if not 0.0 <= min_p <= 1.0:
    raise GenerationError(f"min_p={min_p}: must be in [0, 1] (0 means no min-p filter).")


def check_max_new_tokens(max_new_tokens: int) -> None:
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
      or max_new_tokens < 1:
    raise GenerationError(f"max_new_tokens={max_new_tokens}: must be an integer >= 1.")


def prompt_bucket(longest: int) -> int:
  """Prompt slots for a batch whose longest prompt has `longest` tokens (a power of 2, >= 16)."""
  return max(MIN_PROMPT_BUCKET, 1 << max(longest - 1, 0).bit_length())


# -- Sampling (pure jnp; every argument may be traced) ------------------------------------------

def filter_logits(logits: jax.Array, temperature, top_k, top_p, min_p) -> jax.Array:
  """logits [batch, vocab] -> float32 logits / temperature with removed tokens at -inf.

  top_k > 0 keeps the k largest; top_p < 1 then keeps the smallest most-likely set whose mass
  (renormalized after top-k) reaches top_p; min_p > 0 drops tokens whose probability is below
  min_p times the most likely token's. Ties at a cutoff are kept.
  """
  temperature = jnp.asarray(temperature, jnp.float32)
  top_k, top_p = jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)
  logits = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
  vocab = logits.shape[-1]

  def by_rank(logits):
    sorted_desc = -jnp.sort(-logits, axis=-1)                          # [batch, vocab]
    rank = jnp.arange(vocab)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_top_k = rank < k
    sorted_desc = jnp.where(in_top_k, sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs                   # mass of better tokens
    keep = in_top_k & ((mass_before < top_p) | (top_p >= 1.0))         # rank 0 always kept
    count = jnp.sum(keep, axis=-1, keepdims=True)                      # [batch, 1] >= 1
    cutoff = jnp.take_along_axis(sorted_desc, count - 1, axis=-1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)

  logits = jax.lax.cond((top_k > 0) | (top_p < 1.0), by_rank, lambda x: x, logits)
  # log(0) = -inf: min_p = 0 removes nothing.
  threshold = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(jnp.asarray(min_p, jnp.float32))
  return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_logits(logits: jax.Array, keys: jax.Array, temperature, top_k=0, top_p=1.0,
                  min_p=0.0) -> jax.Array:
  """logits [batch, vocab], keys [batch] PRNG keys (one per row) -> token ids [batch] int32.

  temperature 0 is greedy (argmax; the filters are skipped).
  """
  def greedy(_):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sample(_):
    filtered = filter_logits(logits, temperature, top_k, top_p, min_p)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

  return jax.lax.cond(jnp.asarray(temperature) == 0, greedy, sample, None)


# -- The compiled part --------------------------------------------------------------------------

@flax.struct.dataclass
class DecodeState:
  """A batch in flight between jitted calls (B rows, P prompt slots, N new-token slots)."""
  tokens: jax.Array          # [B, P + N] int32: left-padded prompt, then generated tokens
  lengths: jax.Array         # [B] int32: real prompt tokens per row
  done: jax.Array            # [B] bool: the row emitted EOS or was stopped by the host
  step: jax.Array            # [] int32: tokens generated so far; the next goes to slot P + step
  keys: jax.Array            # [B, 2] uint32: per-row PRNG keys
  cache: Any                 # the KV cache (unboxed), None with kv_cache=False
  logits: Any                # [B, N, vocab] float32 logits of every step (tests), else None


def _constrain_cache(cache: Any, names: Any) -> Any:
  return jax.tree.map(lambda x, spec: nn.with_logical_constraint(x, tuple(spec)), cache, names)


def _cache_names(config: ModelConfig, batch: int, length: int) -> Any:
  return nn.get_partition_spec(jax.eval_shape(lambda: init_cache(config, batch, length)))


def _slot_inputs(config: ModelConfig, width: int, lengths, prompt_len: int) -> dict[str, Any]:
  """positions and segment_ids [B, width] of the buffer's first `width` slots: positions count
  from each row's first real token, and its left padding has segment id 0."""
  slots = jnp.arange(width, dtype=jnp.int32)[None, :]
  pad = (prompt_len - lengths)[:, None]                                # [B, 1]
  # Slots after the current one hold filler: causally invisible, but their positions must stay
  # inside a learned table (an out-of-range lookup is NaN, and 0 * NaN leaks through softmax).
  return {"positions": jnp.clip(slots - pad, 0, config.max_seq_len - 1),
          "segment_ids": (slots >= pad).astype(jnp.int32)}


def _full_forward(config: ModelConfig, params, tokens, lengths, prompt_len):
  """The uncached reference: logits [B, P + N, vocab] of the whole buffer."""
  return Transformer(config).apply({"params": params}, tokens,
                                   **_slot_inputs(config, tokens.shape[1], lengths, prompt_len))


def forward_logits(config: ModelConfig | Config, params: Any, tokens: np.ndarray) -> np.ndarray:
  """Logits [batch, length, vocab] (float32, host) of one full forward pass over `tokens`
  [batch, length] at positions 0..length-1, no cache: for scoring and parity checks."""
  config = config_lib.language_model(config, "forward_logits")
  tokens = np.asarray(tokens, np.int32)
  apply = jax.jit(lambda p, t: Transformer(config).apply({"params": p}, t))
  return sharding.to_host(_under_mesh(_mesh_of(params), tokens.shape[0], apply, params, tokens))


def _sample_step(state: DecodeState, logits: jax.Array, prompt_len: int, sampling
                 ) -> DecodeState:
  """Samples step `state.step`'s tokens from its logits [B, vocab] (row r with the key
  fold_in(row key, step)) and writes them (pad for finished rows) and the logits."""
  keys = jax.vmap(lambda key: jax.random.fold_in(key, state.step))(state.keys)
  # Rows of a padded embedding (ids the tokenizer lacks) are never drawn.
  allowed = jnp.arange(logits.shape[-1]) < sampling["vocab_size"]
  new = sample_logits(jnp.where(allowed, logits, -jnp.inf), keys, sampling["temperature"],
                      sampling["top_k"], sampling["top_p"], sampling["min_p"])
  new = jnp.where(state.done, sampling["pad_id"], new)
  tokens = jax.lax.dynamic_update_slice(state.tokens, new[:, None], (0, prompt_len + state.step))
  saved = state.logits
  if saved is not None:
    saved = jax.lax.dynamic_update_slice(saved, logits[:, None], (0, state.step, 0))
  return state.replace(tokens=tokens, done=state.done | (new == sampling["eos_id"]),
                       step=state.step + 1, logits=saved)


@functools.partial(jax.jit, static_argnames=("config", "new_slots", "kv_cache", "with_logits"))
def _start(params, prompts, sampling, *, config: ModelConfig, new_slots: int, kv_cache: bool,
           with_logits: bool) -> DecodeState:
  """prompts: "tokens" [B, P] left-padded and their "lengths" [B]; sampling: the traced values
  (with "rng") -> the state after prefill and the first new token."""
  prompt, lengths, rng = prompts["tokens"], prompts["lengths"], sampling["rng"]
  batch, prompt_len = prompt.shape
  total = prompt_len + new_slots
  tokens = jnp.pad(prompt, ((0, 0), (0, new_slots)), constant_values=sampling["pad_id"])
  keys = jax.vmap(lambda row: jax.random.fold_in(rng, row))(jnp.arange(batch))
  cache = None
  if kv_cache:
    names = _cache_names(config, batch, total)
    cache = _constrain_cache(nn.unbox(init_cache(config, batch, total)), names)
    logits, variables = Transformer(config).apply(
        {"params": params, "cache": cache}, prompt,
        **_slot_inputs(config, prompt_len, lengths, prompt_len), decode=True, mutable=["cache"])
    cache = _constrain_cache(variables["cache"], names)
    last = logits[:, -1]                                               # [B, vocab]
  else:
    last = _full_forward(config, params, tokens, lengths, prompt_len)[:, prompt_len - 1]
  state = DecodeState(
      tokens=tokens, lengths=lengths, done=jnp.zeros([batch], bool), step=jnp.int32(0),
      keys=keys, cache=cache,
      logits=jnp.zeros((batch, new_slots, last.shape[-1]), jnp.float32) if with_logits else None)
  return _sample_step(state, last, prompt_len, sampling)


@functools.partial(jax.jit, static_argnames=("config", "prompt_len", "kv_cache"),
                   donate_argnames=("state",))
def _continue(params, state: DecodeState, halt, sampling, *, config: ModelConfig,
              prompt_len: int, kv_cache: bool) -> DecodeState:
  """Decode steps until `state.step == halt["step"]` or every row is done. The step is traced:
  one compiled loop serves any chunk size. halt["rows"] [B] bool: rows the host has stopped."""
  stop_at = halt["step"]
  model = Transformer(config)
  names = (_cache_names(config, state.tokens.shape[0], state.tokens.shape[1])
           if kv_cache else None)

  def body(state: DecodeState) -> DecodeState:
    slot = prompt_len + state.step - 1                                 # the last written token
    if kv_cache:
      token = jax.lax.dynamic_slice_in_dim(state.tokens, slot, 1, axis=1)   # [B, 1]
      logits, variables = model.apply(
          {"params": params, "cache": state.cache}, token,
          positions=(state.lengths + state.step - 1)[:, None],
          segment_ids=jnp.ones_like(token), decode=True, mutable=["cache"])
      state = state.replace(cache=_constrain_cache(variables["cache"], names))
      last = logits[:, 0]
    else:
      logits = _full_forward(config, params, state.tokens, state.lengths, prompt_len)
      last = jax.lax.dynamic_index_in_dim(logits, slot, axis=1, keepdims=False)
    return _sample_step(state, last, prompt_len, sampling)

  state = state.replace(done=state.done | halt["rows"])
  return jax.lax.while_loop(lambda s: (s.step < stop_at) & ~jnp.all(s.done), body, state)


# -- Host side: batches, stop strings, streaming ------------------------------------------------

@dataclasses.dataclass
class Piece:
  """Streamed text of row `row`; `finish_reason` ('eos', 'stop' or 'length') on its last piece."""
  row: int
  text: str
  finish_reason: str | None = None


@dataclasses.dataclass
class Completion:
  prompt: str
  text: str                  # the continuation (without EOS or the stop string)
  tokens: list[int]          # generated ids (up to EOS; for 'stop', all generated so far)
  finish_reason: str         # 'eos' | 'stop' | 'length'
  prompt_tokens: int         # tokens the model saw (after truncation)
  truncated: bool = False


def _mesh_of(params) -> Mesh | None:
  for leaf in jax.tree.leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
      return sharding.mesh
  return None


def _rules(batch: int, mesh: Mesh):
  """The training rules; batch stays replicated if it does not split over data x fsdp."""
  rules = sharding.LOGICAL_RULES
  if batch % (mesh.shape["data"] * mesh.shape["fsdp"]):
    rules = tuple((name, None if name == "batch" else axes) for name, axes in rules)
  return rules


def _under_mesh(mesh: Mesh | None, batch: int, fn, *args, **kwargs):
  """fn(*args, **kwargs), under `mesh` and the logical-axis rules for `batch` rows if any."""
  if mesh is None:
    return fn(*args, **kwargs)
  with jax.set_mesh(mesh), nn.logical_axis_rules(_rules(batch, mesh)):
    return fn(*args, **kwargs)


def _prompt_list(prompts: Sequence[str]) -> list[str]:
  """`prompts` as a list; GenerationError for one string (a list of its characters else)."""
  if isinstance(prompts, str):
    raise GenerationError("prompts is one string; pass a list of prompts, e.g. [prompt].")
  return list(prompts)


def encode_prompts(config: ModelConfig, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                   truncate: bool = False) -> tuple[list[list[int]], list[bool]]:
  """Token ids per prompt (an empty prompt becomes [EOS], a document boundary) and whether each
  was left-truncated; GenerationError if a prompt does not fit the context window."""
  check_max_new_tokens(max_new_tokens)
  room = config.max_seq_len - max_new_tokens
  if room < 1:
    raise GenerationError(
        f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the context window "
        f"(model.max_seq_len={config.max_seq_len}); use max_new_tokens <= "
        f"{config.max_seq_len - 1}.")
  prompts = _prompt_list(prompts)
  if not prompts:
    raise GenerationError("no prompts given; pass at least one prompt.")
  rows, truncated = [], []
  for i, ids in enumerate(tokenizer.encode_batch(list(prompts))):
    ids = list(ids) or [tokenizer.eos_id]
    cut = len(ids) > room
    if cut and not truncate:
      raise GenerationError(
          f"prompt {i} has {len(ids)} tokens, but the context window (model.max_seq_len="
          f"{config.max_seq_len}) minus max_new_tokens={max_new_tokens} leaves room for {room}; "
          f"shorten the prompt, lower max_new_tokens, or truncate (truncate=True / --truncate) "
          f"to keep its last {room} tokens.")
    rows.append(ids[-room:] if cut else ids)
    truncated.append(cut)
  return rows, truncated


def _held_back(text: str, stop: Sequence[str]) -> int:
  """How many trailing characters of `text` must wait: an incomplete UTF-8 character (decoded
  as U+FFFD) or the beginning of a stop string."""
  keep = len(text) - len(text.rstrip("\ufffd"))
  for s in stop:
    for n in range(min(len(s) - 1, len(text)), 0, -1):
      if text.endswith(s[:n]):
        keep = max(keep, n)
        break
  return keep


class Generation:
  """The text pieces of a generation (an iterator of Piece). While it runs, `stats` gets the
  timings and counts; when it ends, `completions` holds one Completion per prompt."""

  def __init__(self):
    self.stats: dict[str, Any] = {}
    self.completions: list[Completion] = []
    self._pieces: Iterator[Piece] = iter(())

  def __iter__(self) -> "Generation":
    return self

  def __next__(self) -> Piece:
    return next(self._pieces)


def stream(config: ModelConfig | Config, params: Any, tokenizer, prompts: Sequence[str],
           sampling: SamplingParams | None = None, options: DecodeOptions | None = None,
           **fields: Any) -> Generation:
  """Generates continuations for a batch of prompts, yielding text pieces as they are produced.

  Each row stops at EOS, at a stop string (cut before it), or after sampling.max_new_tokens.
  Decoding runs options.chunk_size steps per jitted call (traced: any size reuses the compiled
  loop). `fields`: SamplingParams/DecodeOptions fields by keyword (`settings`). `config`: the
  run's Config or its ModelConfig. All argument errors are raised here, before anything is
  compiled; the returned Generation runs as it is iterated.
  """
  config = config_lib.language_model(config, "generation")
  sampling, options = settings(sampling, options, **fields)
  rows, truncated = encode_prompts(config, tokenizer, prompts, sampling.max_new_tokens,
                                   options.truncate)
  generation = Generation()
  generation.stats.update(batch=len(rows), prompt_tokens=sum(len(r) for r in rows),
                          kv_cache=options.kv_cache)
  chunks = decode_tokens(config, params, rows, sampling, TokenIds.of(tokenizer), options,
                         info=generation.stats)
  generation._pieces = _pieces(tokenizer, list(prompts), rows, truncated, chunks, sampling,
                               generation)
  return generation


def decode_tokens(config: ModelConfig, params: Any, rows: Sequence[Sequence[int]],
                  sampling: SamplingParams, token_ids: TokenIds,
                  options: DecodeOptions = DecodeOptions(), info: dict | None = None
                  ) -> Iterator[np.ndarray]:
  """Token-level generation (no tokenizer; prompts already fit the context window).

  A generator: after the prefill (1 token) and after each call of up to `options.chunk_size`
  decode steps it yields the host array [B, steps so far] of generated ids (pad after a row's
  EOS); every yield waits for the device, so the time between yields is the decode time.
  `send()` a [B] bool array to stop rows (the host's stop strings). It ends when every row is
  done or sampling.max_new_tokens are generated (sampling.stop is the caller's: text). info:
  gets prompt_bucket, cache_length and, at the end, `logits` [B, max_new_tokens, vocab] when
  options.with_logits.
  """
  batch, max_new_tokens = len(rows), sampling.max_new_tokens
  prompt_len = prompt_bucket(max(len(r) for r in rows))
  new_slots = -(-max_new_tokens // NEW_TOKENS_MULTIPLE) * NEW_TOKENS_MULTIPLE
  prompt = np.full((batch, prompt_len), token_ids.pad_id, np.int32)
  for i, ids in enumerate(rows):
    prompt[i, prompt_len - len(ids):] = ids
  prompts = {"tokens": prompt, "lengths": np.array([len(r) for r in rows], np.int32)}
  # Traced (not static) sampling values: changing them never recompiles.
  traced = {"temperature": np.float32(sampling.temperature), "top_k": np.int32(sampling.top_k),
            "top_p": np.float32(sampling.top_p), "min_p": np.float32(sampling.min_p),
            "eos_id": np.int32(token_ids.eos_id), "pad_id": np.int32(token_ids.pad_id),
            "vocab_size": np.int32(token_ids.vocab_size or config.vocab_size),
            "rng": jax.random.PRNGKey(sampling.seed) if sampling.rng is None else sampling.rng}
  mesh = options.mesh if options.mesh is not None else _mesh_of(params)
  info = {} if info is None else info
  info.update(prompt_bucket=prompt_len, cache_length=prompt_len + new_slots)
  state = _under_mesh(mesh, batch, _start, params, prompts, traced, config=config,
                      new_slots=new_slots, kv_cache=options.kv_cache,
                      with_logits=options.with_logits)
  while True:
    tokens, done, step = map(sharding.to_host, (state.tokens, state.done, state.step))
    step = int(step)
    stop_rows = yield tokens[:, prompt_len:prompt_len + step]
    stop_rows = np.zeros(batch, bool) if stop_rows is None else np.asarray(stop_rows, bool)
    if step >= max_new_tokens or np.all(done | stop_rows):
      break
    halt = {"step": np.int32(min(step + options.chunk_size, max_new_tokens)), "rows": stop_rows}
    state = _under_mesh(mesh, batch, _continue, params, state, halt, traced, config=config,
                        prompt_len=prompt_len, kv_cache=options.kv_cache)
  if options.with_logits:
    info["logits"] = sharding.to_host(state.logits)[:, :max_new_tokens]


def _pieces(tokenizer, prompts, rows, truncated, chunks, sampling: SamplingParams,
            generation: Generation) -> Iterator[Piece]:
  """The text pieces of `chunks` (a `decode_tokens` generator, not yet started); fills
  generation.stats and, at the end, generation.completions."""
  batch, stats = len(rows), generation.stats
  max_new_tokens, stop = sampling.max_new_tokens, sampling.stop
  compile_start, wall_start = metrics.compile_seconds(), time.perf_counter()
  new = next(chunks)
  stats["first_token_seconds"] = time.perf_counter() - wall_start

  finished: list[str | None] = [None] * batch
  emitted, texts, generated = [""] * batch, [""] * batch, [[] for _ in range(batch)]
  while True:
    for r in range(batch):
      if finished[r]:
        continue
      ids = new[r].tolist()
      if tokenizer.eos_id in ids:
        ids, finished[r] = ids[:ids.index(tokenizer.eos_id)], "eos"
      generated[r] = ids
      text = tokenizer.decode(ids)
      hits = [i for i in (text.find(s) for s in stop) if i >= 0]
      if hits:
        text, finished[r] = text[:min(hits)], "stop"
      elif not finished[r] and new.shape[1] >= max_new_tokens:
        finished[r] = "length"
      texts[r] = text
      if not finished[r]:
        text = text[:len(text) - _held_back(text, stop)]
      start = len(os.path.commonprefix([emitted[r], text]))  # len(emitted[r]), barring odd decodes
      if text[start:] or finished[r]:
        emitted[r] = text
        yield Piece(r, text[start:], finished[r])
    try:
      new = chunks.send(np.array([f is not None for f in finished]))
    except StopIteration:
      break
  assert all(finished), finished

  seconds = time.perf_counter() - wall_start
  new_tokens = sum(len(g) for g in generated)
  stats.update(seconds=seconds, compile_seconds=metrics.compile_seconds() - compile_start,
               new_tokens=new_tokens, steps=new.shape[1])
  stats["tokens_per_second"] = new_tokens / max(seconds - stats["compile_seconds"], 1e-9)
  generation.completions[:] = [Completion(p, t, g, f, len(ids), cut) for p, t, g, f, ids, cut
                               in zip(prompts, texts, generated, finished, rows, truncated)]


def generate(config: ModelConfig | Config, params: Any, tokenizer, prompts: Sequence[str],
             sampling: SamplingParams | None = None, options: DecodeOptions | None = None, *,
             batch_size: int = 0, **fields: Any) -> list[Completion]:
  """The batch API: one Completion per prompt (the arguments of `stream`), `batch_size` prompts
  at a time (0: all in one batch). Unless options.chunk_size is given, the whole generation is
  one jitted call without stop strings, and chunks of 16 steps with them."""
  chosen_chunks = "chunk_size" in fields or options is not None
  sampling, options = settings(sampling, options, **fields)
  if not chosen_chunks:
    options = dataclasses.replace(
        options, chunk_size=16 if sampling.stop else sampling.max_new_tokens)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
    raise GenerationError(f"batch_size={batch_size!r}: must be an integer >= 0 (0: all prompts "
                          f"in one batch).")
  prompts = _prompt_list(prompts)
  step = batch_size or max(len(prompts), 1)
  completions: list[Completion] = []
  for start in range(0, max(len(prompts), 1), step):  # (no prompts: `stream` says so)
    generation = stream(config, params, tokenizer, prompts[start:start + step], sampling,
                        options)
    for _ in generation:
      pass
    completions += generation.completions
  return completions


def generate_texts(config: ModelConfig, params: Any, tokenizer, prompts: Sequence[str],
                   sampling: SamplingParams | None = None, **fields: Any) -> list[str]:
  """Continuations (text after each prompt, up to EOS) for a batch of prompts (the arguments
  of `generate`)."""
  return [c.text for c in generate(config, params, tokenizer, prompts, sampling, **fields)]
