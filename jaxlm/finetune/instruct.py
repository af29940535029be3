"""Instruction following (the book's chapter 7): records {instruction, input?, output} are
formatted with a prompt template (alpaca, chat turns, or the init run's own chat template:
`model`) and trained with the language-model loss on the response tokens only (with `model`,
the response and the template's end of turn, where generation then stops). The best checkpoint
has the lowest validation loss; after training, the test split's prompts are answered greedily
(test_responses.json, exact match).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxlm import chat, files
from jaxlm import data as data_lib
from jaxlm import generate as generate_lib
from jaxlm import loss as loss_lib
from jaxlm.config import Config, FinetuneConfig
from jaxlm.finetune.objective import Batch, Encoded, Example, FinetuneError, Objective, register

ALPACA_HEADER = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.")


def format_prompt(instruction: str, input_text: str, template: str) -> str:
  """The prompt the response follows. alpaca: the Alpaca template (as in the book's ch. 7);
  chat: `<|user|>` / `<|assistant|>` turns; plain: the instruction as written (the input on
  the next line). (model: `chat.ChatTemplate.prompt`.)"""
  if template == "plain":
    return instruction + (f"\n{input_text}" if input_text else "")
  if template == "alpaca":
    prompt = f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction}"
    if input_text:
      prompt += f"\n\n### Input:\n{input_text}"
    return prompt + "\n\n### Response:\n"
  user = instruction + (f"\n{input_text}" if input_text else "")
  return f"<|user|>\n{user}\n<|assistant|>\n"


def read_instructions(path: str, template: str, flag: str = "--data",
                      chat_template: chat.ChatTemplate | None = None) -> list[Example]:
  """Examples of a JSON file (a list of records) or JSONL file (a record per line; or any
  format of `files.read_records`), each with a string `instruction`, an optional string `input`
  and a string `output`. template "model": formatted with `chat_template`, the user's turn
  being the instruction and the input on the next line."""
  records = files.read_records(path, FinetuneError, flag)
  if not records:
    raise FinetuneError(f"{path} has no records.")
  examples = []
  for where, record in records:
    if not isinstance(record, dict):
      raise FinetuneError(f"{where}: a record must be a JSON object with instruction/output.")
    for field in ("instruction", "output"):
      if not isinstance(record.get(field), str):
        raise FinetuneError(f"{where}: field '{field}' is missing or not a string (fields: "
                            f"{', '.join(sorted(map(str, record))) or 'none'}).")
    input_text = record.get("input") or ""
    if not isinstance(input_text, str):
      raise FinetuneError(f"{where}: field 'input' must be a string.")
    if template == "model":
      user = record["instruction"] + (f"\n{input_text}" if input_text else "")
      examples.append(Example(where, chat_template.prompt(user), response=record["output"],
                              record=record, target=chat_template.answer(user, record["output"])))
    else:
      examples.append(Example(where, format_prompt(record["instruction"], input_text, template),
                              response=record["output"], record=record))
  return examples


def encode_instructions(examples: Sequence[Example], tokenizer, max_length: int,
                        classes: Sequence[str] = ()) -> Encoded:
  """Prompt + response + EOS ids per example, or prompt + target where a chat template gave
  one (its end of turn ends it) (`classes`: unused, the interface's)."""
  del classes
  prompts = tokenizer.encode_batch([e.text for e in examples])
  responses = tokenizer.encode_batch([e.target or e.response for e in examples])
  ids, prompt_lengths = [], []
  for example, prompt, response in zip(examples, prompts, responses):
    sequence = list(prompt) + list(response) + ([] if example.target else [tokenizer.eos_id])
    if len(sequence) - 1 > max_length:  # inputs are the sequence minus its last token
      raise FinetuneError(f"{example.where}: prompt + response are {len(sequence)} tokens, "
                          f"longer than max_length={max_length} + 1; shorten the example or "
                          f"raise --config.finetune.max_length (at most the model's context).")
    ids.append(sequence)
    prompt_lengths.append(len(prompt))
  return Encoded(list(examples), ids, prompt_lengths, None)


def _row(split: Encoded, index: int, length: int, pad_id: int) -> Batch:
  """Inputs, targets, weights 1 on the targets ids[prompt_length:]: the response and the EOS."""
  ids = split.ids[index]
  return data_lib.lm_row(ids, length, pad_id, len(ids) - split.prompt_lengths[index])


def _check(config: Config) -> None:
  if config.finetune.balance:
    raise FinetuneError("finetune.balance undersamples the classes of classifier data; "
                        "instruction data has none: drop it.")


def respond(config: Config, params: Any, tokenizer, split: Encoded, max_new_tokens: int,
            batch_size: int = 16) -> list[dict[str, Any]]:
  """Greedy responses to the prompts of `split`: records with `response` and `exact_match`
  (the response equals the expected output after stripping surrounding whitespace). At most
  `max_new_tokens` tokens, and no more than the context leaves after each prompt (room its
  expected response fits: see `encode_instructions`), so prompts are not cut (but for one that
  fills the whole context: it loses its first token to the one new token). Prompts of one
  budget are generated together (most share `max_new_tokens`)."""
  budgets = [max(1, min(max_new_tokens, config.model.max_seq_len - length))
             for length in split.prompt_lengths]
  if config.finetune.template == "model":
    tokenizer = chat.turn_tokenizer(tokenizer)  # answers end with the template's end of turn
  completions: list[Any] = [None] * len(budgets)
  for budget in sorted(set(budgets)):
    rows = [i for i, b in enumerate(budgets) if b == budget]
    for i, completion in zip(rows, generate_lib.generate(
        config.model, params, tokenizer, [split.examples[i].text for i in rows],
        max_new_tokens=budget, temperature=0.0, truncate=True, batch_size=batch_size)):
      completions[i] = completion
  return [dict(e.record or {}, response=c.text, exact_match=c.text.strip() == e.response.strip())
          for e, c in zip(split.examples, completions)]


def answer_test_prompts(prepared, params) -> dict[str, Any]:
  """The test split's prompts answered with the best params: test_responses.json and the
  exact-match rate."""
  if "test" not in prepared.splits:
    return {}
  report = respond(prepared.config, params, prepared.tokenizer, prepared.splits["test"],
                   max_new_tokens=prepared.config.finetune.max_new_tokens)
  if jax.process_index() == 0:
    files.write_json(os.path.join(prepared.workdir, "test_responses.json"), report)
  return {"test_exact_match": float(np.mean([r["exact_match"] for r in report]))}


def read_templated(read: Callable[..., list[Example]], path: str, f: FinetuneConfig, tokenizer,
                   flag: str) -> list[Example]:
  """read(path, template, flag[, chat_template]): the examples of a file formatted by
  finetune.template; with `model`, the init run's chat template (ChatTemplateError, e.g. a run
  without one, as one FinetuneError line naming the key)."""
  if f.template != "model":
    return read(path, f.template, flag)
  try:
    chat.turn_tokenizer(tokenizer)  # (answers must end in one token: checked before training)
    return read(path, f.template, flag, chat.of(tokenizer))
  except chat.ChatTemplateError as e:
    raise FinetuneError(f"--config.finetune.template=model: {e}") from None


def _read(path: str, f: FinetuneConfig, tokenizer, flag: str) -> list[Example]:
  return read_templated(read_instructions, path, f, tokenizer, flag)


OBJECTIVE = register(Objective(
    name="instruct", read=_read, classes=lambda examples, path: [],
    encode=lambda examples, tokenizer, classes, max_length: encode_instructions(
        examples, tokenizer, max_length),
    row=_row, model_length=lambda split, i: len(split.ids[i]) - 1,  # (inputs: all but the last)
    loss=lambda config: loss_lib.loss_for(config),
    metrics=lambda name, sums, loss: {f"{name}_perplexity": math.exp(min(loss, 700.0))},
    rank=lambda r: (-r["validation_loss"],), can_sample=True, check=_check,
    finish=answer_test_prompts))
