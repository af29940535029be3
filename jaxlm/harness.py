"""lm-evaluation-harness adapter: any jaxlm run as lm-eval's model "jaxlm".

  python -m experiments.harness --model jaxlm --model_args workdir=runs/x,step=2000 \
      --tasks hellaswag,lambada_openai --batch_size 32

  import lm_eval
  from jaxlm.harness import JaxLM
  results = lm_eval.simple_evaluate(model=JaxLM(workdir="runs/x", batch_size=32),
                                    tasks=["hellaswag"])

Importing this module registers the model; the `lm_eval` console script itself does not import
third-party models (lm-eval 0.4 has no model plugin entry point), hence the launcher
`experiments.harness`, which takes exactly lm_eval's command line.

The three request types go to jaxlm's own scorer (jaxlm/tasks.py): `loglikelihood` is
`tasks.loglikelihoods` (the harness's tokenization, length-bucketed batches sharded over the
run's mesh), `loglikelihood_rolling` is `tasks.document_loglikelihoods` (disjoint windows of the
model's context, as the harness forms them), `generate_until` is `generate.generate` with the
stop strings (greedy unless the task asks for sampling; prompts keep their last tokens when
they do not fit). Requests are scored SPMD over all of this process's devices; one process (lm-eval
splits requests across processes itself, which jaxlm's global batches do not do).
"""

from __future__ import annotations

from typing import Any

from absl import logging
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from jaxlm import generate as generate_lib
from jaxlm import run as run_lib
from jaxlm import tasks
from jaxlm.errors import UserError

# gen_kwargs keys the harness's generative tasks pass, and what jaxlm does with them.
_SAMPLING_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


class HarnessError(UserError):
  """The adapter cannot run as asked; the message names the argument and the fix."""


def _positive_int(name: str, value: Any) -> int:
  try:
    number = int(value)
  except (TypeError, ValueError):
    number = 0
  if number < 1 or isinstance(value, bool):
    raise HarnessError(f"{name}={value!r} must be a positive integer (e.g. --batch_size 32; "
                       f"'auto' is not supported: jaxlm compiles one batch shape).")
  return number


@register_model("jaxlm")
class JaxLM(LM):
  """A jaxlm run directory (pretrained here, imported GPT-2, fine-tuned, LoRA) behind lm-eval's
  LM API. Args (model_args): workdir, step (default: the latest checkpoint), batch_size (rows
  per forward pass, default 8), max_gen_toks (default 256; at most half the context window,
  the rest is the prompt's)."""

  def __init__(self, workdir: str, step: int | None = None, batch_size: int | str | None = 8,
               max_gen_toks: int = 256, max_batch_size: Any = None, device: Any = None,
               **unknown: Any) -> None:
    super().__init__()
    if unknown:
      raise HarnessError(f"unknown model_args {sorted(unknown)}; jaxlm takes workdir, step, "
                         f"batch_size and max_gen_toks.")
    del max_batch_size, device  # lm-eval's torch options; jaxlm uses all devices it sees
    self.batch_size = _positive_int("batch_size", 8 if batch_size is None else batch_size)
    self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
    self.run = run_lib.open_run(workdir, None if step is None else int(step),
                                language_model=True)
    self.config, self.tokenizer = self.run.config, self.run.tokenizer
    self.mesh = run_lib.default_mesh(self.config)
    self.params = run_lib.restore_params(self.run, self.mesh)
    self.scorer = tasks.Scorer(self.config, self.params, self.tokenizer, self.mesh,
                               self.batch_size)

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """(log P(continuation | context), whether greedy decoding reproduces it) per request;
    request.args = (context, continuation)."""
    self.scorer.progress = not disable_tqdm
    ll, greedy = tasks.loglikelihoods(self.scorer, [tuple(r.args[:2]) for r in requests])
    return [(float(a), bool(b)) for a, b in zip(ll, greedy)]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """log P(text) of each request's whole text (request.args = (text,)), every token scored
    once after end-of-text."""
    self.scorer.progress = not disable_tqdm
    ll, _ = tasks.document_loglikelihoods(self.scorer, [r.args[0] for r in requests])
    return [float(x) for x in ll]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """The continuation of each request.args = (context, gen_kwargs), cut before the first
    `until` string; requests sharing gen_kwargs are generated batch_size at a time."""
    del disable_tqdm
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
      groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
    texts = [""] * len(requests)
    for indices in groups.values():
      completions = generate_lib.generate(
          self.config.model, self.params, self.tokenizer, [requests[i].args[0] for i in indices],
          self._sampling(requests[indices[0]].args[1]), truncate=True, mesh=self.mesh,
          batch_size=self.batch_size)
      for i, completion in zip(indices, completions):
        texts[i] = completion.text
    return texts

  def _sampling(self, gen_kwargs: dict[str, Any]) -> generate_lib.SamplingParams:
    """The SamplingParams of one request's gen_kwargs."""
    ignored = sorted(set(gen_kwargs) - set(_SAMPLING_KEYS))
    if ignored:
      logging.warning("jaxlm ignores the generation options %s", ignored)
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else [s for s in until if s]
    # The prompt needs room in the context window: at most half of it is generated.
    max_new = min(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
                  max(self.config.model.max_seq_len // 2, 1))
    # Greedy unless the task samples (as transformers' generate: do_sample decides).
    sample = bool(gen_kwargs.get("do_sample", False))
    return generate_lib.SamplingParams(
        stop=until, max_new_tokens=max_new,
        temperature=float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
        top_k=int(gen_kwargs.get("top_k", 0) or 0) if sample else 0,
        top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0) if sample else 1.0)
