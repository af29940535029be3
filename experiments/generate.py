r"""Generate text from a trained run, streaming it to stdout.

  python -m experiments.generate --workdir=runs/x --prompt="def fibonacci(" \
      --max_new_tokens=200 --temperature=0.8 --top_k=50
  python -m experiments.generate --workdir=runs/x --prompts_file=prompts.txt --num_samples=2 \
      --stop='\n\n' --temperature=0                                      # greedy, batched

Standard output carries only the generated text: each sample is its prompt followed by the
continuation, streamed as it is produced; several samples are separated by a blank line.
Progress and statistics (compile time, tokens/s) go to standard error, so the output can be
piped. All prompts (times --num_samples) decode together as one batch.

--prompts_file: one prompt per line (empty lines skipped), or, for a file ending in .jsonl, one
JSON string or {"prompt": ...} object per line (for prompts spanning several lines).
--chat: each prompt is a user turn of the run's chat template (a run imported from an instruct
checkpoint keeps it); the rendered prompt is printed and each answer stops at the end of its turn.
--stop: repeatable, or a comma-separated list; `\n`, `\t`, `\,` and `\\` are unescaped. The
continuation ends just before the first stop string (which is not printed).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from experiments import common
from jaxlm.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory written by experiments.pretrain.")
_PROMPT = flags.DEFINE_string("prompt", None, "the prompt text.")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, "file of prompts (one per line, or .jsonl); decoded as one batch.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "tokens to generate per sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0: off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass in (0, 1] (1: off).")
_MIN_P = flags.DEFINE_float("min_p", 0.0,
                            "drop tokens below min_p x the top token's probability (0: off).")
_SEED = flags.DEFINE_integer("seed", 0, "random seed: the same seed gives the same text.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "samples per prompt.")
_KV_CACHE = flags.DEFINE_bool("kv_cache", True,
                              "decode with the KV cache; false = full recompute each step "
                              "(the reference path, slow).")
_CHAT = flags.DEFINE_bool(
    "chat", False, "format each prompt as a user turn with the run's chat template (kept from an "
    "instruct checkpoint) and stop where the assistant's turn ends.")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step to load (default: the latest).")
_STOP = flags.DEFINE_multi_string("stop", [], "stop string(s): repeatable or comma-separated")
_TRUNCATE = flags.DEFINE_bool("truncate", False,
                              "keep the last tokens of a prompt that does not fit the context "
                              "window (default: refuse it).")


def parse_stop(values: list[str]) -> list[str]:
  r"""Comma-separated stop strings with \n, \t, \, and \\ escapes."""
  escapes = {"n": "\n", "t": "\t", ",": ",", "\\": "\\"}
  out = []
  for value in values:
    current, i = "", 0
    while i < len(value):
      c = value[i]
      if c == "\\" and i + 1 < len(value) and value[i + 1] in escapes:
        current += escapes[value[i + 1]]
        i += 2
        continue
      if c == ",":
        out.append(current)
        current = ""
      else:
        current += c
      i += 1
    out.append(current)
  return [s for s in out if s]


def read_prompts(path: str) -> list[str]:
  from jaxlm.generate import GenerationError
  if not os.path.isfile(path):
    problem = "is a directory" if os.path.isdir(path) else "does not exist"
    raise GenerationError(f"--prompts_file={path} {problem}; pass a text file with one prompt "
                          f"per line (or a .jsonl file).")
  try:
    with open(path, encoding="utf-8-sig") as f:
      lines = f.read().splitlines()
  except UnicodeDecodeError as e:
    raise GenerationError(f"--prompts_file={path} is not UTF-8 text ({e.reason} at byte "
                          f"{e.start}); save it as UTF-8.") from None
  if not path.endswith(".jsonl"):
    return [line for line in lines if line.strip()]
  prompts = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      value = json.loads(line)
    except json.JSONDecodeError as e:
      raise GenerationError(f"{path}:{number} is not JSON ({e.msg}); write one JSON string or "
                            f'{{"prompt": ...}} object per line.') from None
    if isinstance(value, dict):
      value = value.get("prompt")
    if not isinstance(value, str):
      raise GenerationError(f'{path}:{number}: expected a JSON string or {{"prompt": "..."}}.')
    prompts.append(value)
  return prompts


class OrderedWriter:
  """Writes the samples of a batch to stdout in order: the current sample streams live, later
  ones are buffered until it is finished."""

  def __init__(self, prompts: list[str], out=sys.stdout):
    self.prompts, self.out = prompts, out
    self.buffers = [""] * len(prompts)
    self.finished = [False] * len(prompts)
    self.current = -1
    self._advance()

  def _write(self, text: str) -> None:
    if text:
      self.out.write(text)
      self.out.flush()

  def _advance(self) -> None:
    while self.current < len(self.prompts) and (self.current < 0 or
                                                self.finished[self.current]):
      self.current += 1
      if self.current >= len(self.prompts):
        return
      if self.current > 0:
        self._write("\n\n")
      self._write(self.prompts[self.current] + self.buffers[self.current])
      self.buffers[self.current] = ""

  def add(self, row: int, text: str, finished: bool) -> None:
    if row == self.current:
      self._write(text)
    else:
      self.buffers[row] += text
    if finished:
      self.finished[row] = True
      self._advance()


def run(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from jaxlm import generate as generate_lib
  from jaxlm import run as run_lib
  GenerationError = generate_lib.GenerationError
  if not _WORKDIR.value:
    raise GenerationError("--workdir is required: the run directory to generate from.")
  prompts = []
  if _PROMPT.value is not None:
    prompts.append(_PROMPT.value)
  if _PROMPTS_FILE.value:
    prompts += read_prompts(_PROMPTS_FILE.value)
  if not prompts:
    raise GenerationError(f"no prompt: --prompts_file={_PROMPTS_FILE.value} holds none (blank "
                          f"lines are skipped)." if _PROMPTS_FILE.value else
                          "no prompt: pass --prompt=TEXT or --prompts_file=FILE.")
  if _NUM_SAMPLES.value < 1:
    raise GenerationError(f"--num_samples={_NUM_SAMPLES.value}: must be >= 1.")
  sampling, options = generate_lib.settings(
      max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
      top_p=_TOP_P.value, min_p=_MIN_P.value, seed=_SEED.value, stop=parse_stop(_STOP.value),
      truncate=_TRUNCATE.value, kv_cache=_KV_CACHE.value)
  rows = [p for p in prompts for _ in range(_NUM_SAMPLES.value)]

  start = time.perf_counter()
  run_info = run_lib.open_run(_WORKDIR.value, _STEP.value, language_model=True)
  config, tokenizer = run_info.config, run_info.tokenizer
  if _CHAT.value:  # (the rendered prompts are printed: what the model continues)
    from jaxlm import chat
    rows = [chat.of(tokenizer).prompt(p) for p in rows]
    tokenizer = chat.turn_tokenizer(tokenizer)
  # Refuse prompts that do not fit before the (slower) restore.
  generate_lib.encode_prompts(config.model, tokenizer, rows, sampling.max_new_tokens,
                              options.truncate)
  params = run_lib.restore_params(run_info)
  common.log(f"loaded {_WORKDIR.value} step {run_info.step} ({config.model.num_layers} layers, "
             f"{config.model.embed_dim} dims) in {time.perf_counter() - start:.1f}s")
  pieces = generate_lib.stream(config.model, params, tokenizer, rows, sampling, options)
  stats, completions = pieces.stats, pieces.completions
  writer = OrderedWriter(rows)
  for piece in pieces:
    writer.add(piece.row, piece.text, piece.finish_reason is not None)
  if sys.stdout.isatty():
    sys.stdout.write("\n")
    sys.stdout.flush()
  for i, c in enumerate(completions):
    if c.truncated:
      common.log(f"sample {i}: prompt truncated to its last {c.prompt_tokens} tokens")
  reasons = {}
  for c in completions:
    reasons[c.finish_reason] = reasons.get(c.finish_reason, 0) + 1
  common.log(f"{stats['new_tokens']} new tokens for {stats['batch']} samples in "
             f"{stats['seconds']:.2f}s (compile {stats['compile_seconds']:.2f}s, "
             f"{stats['tokens_per_second']:.1f} tokens/s after compile, "
             f"kv_cache={stats['kv_cache']}); stopped: "
             + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))


def main(argv: list[str]) -> None:
  common.quiet_logs()
  try:
    run(argv)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except BrokenPipeError:  # e.g. piped into `head`
    try:
      sys.stdout = open(os.devnull, "w")
    finally:
      sys.exit(0)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
