"""Text generation: prefill the prompt in one pass, then decode with a KV cache in one jitted loop.

Prompts of different lengths are left-padded: padding gets segment id 0 (so real tokens never
attend to it) and positions count from each row's first real token.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.model import Transformer, init_cache


class GenerationError(ValueError):
  """Generation arguments are invalid; the message names the argument and the fix."""


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  if temperature < 0:
    raise GenerationError(f"temperature={temperature}: must be >= 0 (0 means greedy).")
  if top_k < 0:
    raise GenerationError(f"top_k={top_k}: must be >= 0 (0 means no top-k filter).")
  if not 0.0 < top_p <= 1.0:
    raise GenerationError(f"top_p={top_p}: must be in (0, 1] (1 means no nucleus filter).")


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
  """logits [batch, vocab] float32 -> token ids [batch]; temperature 0 is greedy."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    # Keep the smallest set of most likely tokens whose mass reaches top_p.
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "eos_id"))
def generate_tokens(params: Any, prompt: jax.Array, prompt_lengths: jax.Array, rng: jax.Array, *,
                    config: ModelConfig, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, eos_id: int = -1) -> jax.Array:
  """prompt [batch, prompt_len] left-padded int32, prompt_lengths [batch] -> new tokens
  [batch, max_new_tokens]; after a row emits `eos_id` it emits only `eos_id`."""
  model = Transformer(config)
  batch, prompt_len = prompt.shape
  cache = init_cache(config, batch, prompt_len + max_new_tokens)
  slots = jnp.arange(prompt_len, dtype=jnp.int32)[None, :]
  pad = (prompt_len - prompt_lengths)[:, None]                    # [batch, 1]
  positions = jnp.maximum(slots - pad, 0)                          # [batch, prompt_len]
  segment_ids = (slots >= pad).astype(jnp.int32)                   # 0 = left padding
  logits, variables = model.apply({"params": params, "cache": cache}, prompt,
                                  positions=positions, segment_ids=segment_ids, decode=True,
                                  mutable=["cache"])
  first = sample_logits(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_k, top_p)

  def step(carry, i):
    cache, token, done = carry
    logits, variables = model.apply(
        {"params": params, "cache": cache}, token[:, None],
        positions=(prompt_lengths + i - 1)[:, None], segment_ids=jnp.ones_like(token)[:, None],
        decode=True, mutable=["cache"])
    new = sample_logits(logits[:, -1], jax.random.fold_in(rng, i), temperature, top_k, top_p)
    new = jnp.where(done, eos_id, new)
    return (variables["cache"], new, done | (new == eos_id)), new

  done = first == eos_id
  _, rest = jax.lax.scan(step, (variables["cache"], first, done),
                         jnp.arange(1, max_new_tokens, dtype=jnp.int32))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> ([batch, longest] left-padded int32, [batch] lengths)."""
  longest = max(len(r) for r in rows)
  out = np.full((len(rows), longest), pad_id, np.int32)
  for i, r in enumerate(rows):
    out[i, longest - len(r):] = r
  return out, np.array([len(r) for r in rows], np.int32)


def generate_texts(config: ModelConfig, params: Any, tokenizer, prompts: Sequence[str], *,
                   max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, rng: jax.Array | None = None) -> list[str]:
  """Continuations (text after each prompt, up to EOS) for a batch of prompts."""
  check_sampling(temperature, top_k, top_p)
  rows = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts]
  tokens, lengths = left_pad(rows, tokenizer.pad_id)
  total = tokens.shape[1] + max_new_tokens
  if config.positional == "learned" and total > config.max_seq_len:
    raise GenerationError(
        f"prompt ({tokens.shape[1]} tokens) + max_new_tokens={max_new_tokens} = {total} exceeds "
        f"model.max_seq_len={config.max_seq_len}; shorten the prompt or max_new_tokens.")
  rng = jax.random.PRNGKey(0) if rng is None else rng
  new = generate_tokens(params, jnp.asarray(tokens), jnp.asarray(lengths), rng,
                        config=config, max_new_tokens=max_new_tokens,
                        temperature=float(temperature), top_k=int(top_k),
                        top_p=float(top_p), eos_id=tokenizer.eos_id)
  if not new.is_fully_addressable:  # multi-process: every process gets all rows
    from jax.experimental import multihost_utils
    new = multihost_utils.process_allgather(new, tiled=True)
  new = np.asarray(new)
  texts = []
  for row in new.tolist():
    if tokenizer.eos_id in row:
      row = row[:row.index(tokenizer.eos_id)]
    texts.append(tokenizer.decode(row))
  return texts
