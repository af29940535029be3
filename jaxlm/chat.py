"""Chat templates: the Jinja template an instruct checkpoint's tokenizer carries, rendered as
`transformers`' `apply_chat_template` renders it (a sandboxed Jinja environment with its
`raise_exception`, `tojson` and `strftime_now`).

A run imported from a Hugging Face directory keeps the template (tokenizer_config.json's
`chat_template`, or chat_template.jinja) in `chat_template.json` beside its tokenizer, and the
tokenizer object carries it as `tokenizer.chat_template` (None without one); fine-tuned runs
inherit it and `export_hf` writes it back. Instruction tuning with
`--config.finetune.template=model` formats records with it, and `experiments.generate --chat`
formats prompts as user turns.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import json
import os
from typing import Any, Sequence

from jaxlm import files
from jaxlm.errors import UserError

RUN_FILE = "chat_template.json"  # in a run directory: {"template", "bos_token", "eos_token"}


class ChatTemplateError(UserError):
  """A chat template cannot be read or rendered; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A Jinja chat template and the special-token strings it may refer to."""
  template: str
  bos_token: str = ""
  eos_token: str = ""
  source: str = ""  # where it was read (for errors)

  def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    """The conversation as text: `messages` [{"role": "user"|"assistant"|"system", "content":
    str}, ...]; add_generation_prompt: end with the opening of an assistant turn."""
    try:
      return _compiled(self.template).render(
          messages=list(messages), add_generation_prompt=add_generation_prompt,
          bos_token=self.bos_token, eos_token=self.eos_token)
    except ChatTemplateError:
      raise
    except Exception as e:  # jinja2's errors (undefined names, bad syntax in a branch...)
      raise ChatTemplateError(f"the chat template {self.source or '(in memory)'} failed to "
                              f"render ({type(e).__name__}: {str(e)[:200]}).") from None

  def prompt(self, user: str) -> str:
    """A user turn followed by the opening of the assistant's answer."""
    return self.render([{"role": "user", "content": user}], add_generation_prompt=True)

  def answer(self, user: str, assistant: str) -> str:
    """What follows `prompt(user)` when the assistant answers `assistant`: the answer as the
    template writes it and its end of turn (trailing whitespace dropped); ChatTemplateError if
    the template writes the user turn differently when an answer follows."""
    prompt = self.prompt(user)
    full = self.render([{"role": "user", "content": user},
                        {"role": "assistant", "content": assistant}], add_generation_prompt=False)
    if not full.startswith(prompt):
      raise ChatTemplateError(f"the chat template {self.source or '(in memory)'} does not write "
                              f"a conversation as its generation prompt followed by the answer; "
                              f"use --config.finetune.template=chat or alpaca instead.")
    return full[len(prompt):].rstrip()

  def end_of_turn(self) -> str:
    """The text the template writes after an assistant's answer (e.g. <|im_end|>, <|eot_id|>),
    without surrounding whitespace."""
    marker = "\u2063answer\u2063"  # (text no template writes itself)
    closing = self.answer("hello", marker)
    return closing[closing.index(marker) + len(marker):].strip()


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
  """The template compiled in transformers' environment for chat templates (once: a dataset
  renders it twice per example)."""
  import jinja2
  from jinja2 import ext, sandbox

  def raise_exception(message):
    raise ChatTemplateError(f"the chat template refused the conversation: {message}")

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(format_string):
    return datetime.datetime.now().strftime(format_string)

  environment = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
  environment.filters["tojson"] = tojson
  environment.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
  try:
    return environment.from_string(template)
  except jinja2.TemplateSyntaxError as e:
    raise ChatTemplateError(f"the chat template is not valid Jinja (line {e.lineno}: "
                            f"{e.message}).") from None


def _token_text(value: Any) -> str:
  """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else ""


def read_hf(hf_dir: str) -> ChatTemplate | None:
  """The chat template of a Hugging Face model directory (chat_template.jinja, or
  tokenizer_config.json's `chat_template`: a string, or named templates of which `default`),
  None without one."""
  config_path = os.path.join(hf_dir, "tokenizer_config.json")
  config: dict[str, Any] = {}
  if os.path.isfile(config_path):
    try:
      config = files.read_json(config_path)
    except json.JSONDecodeError as e:
      raise ChatTemplateError(f"{config_path} is not JSON ({e.msg}); download it again.") from None
  jinja_path = os.path.join(hf_dir, "chat_template.jinja")
  template, source = config.get("chat_template"), config_path
  if os.path.isfile(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      template, source = f.read(), jinja_path
  if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use"...}]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if template is None:
    return None
  if not isinstance(template, str) or not template.strip():
    raise ChatTemplateError(f"{source}: chat_template is not a template string.")
  chat = ChatTemplate(template, _token_text(config.get("bos_token")),
                      _token_text(config.get("eos_token")), source)
  try:
    _compiled(template)  # a syntax error is reported now, not when it is first used
  except ChatTemplateError as e:
    raise ChatTemplateError(f"{source}: {e}") from None
  return chat


def read_run(directory: str) -> ChatTemplate | None:
  """The chat template a run directory keeps (None without one)."""
  path = os.path.join(directory, RUN_FILE)
  saved = files.read_json(path)
  if saved is None:
    return None
  return ChatTemplate(saved["template"], saved.get("bos_token", ""), saved.get("eos_token", ""),
                      path)


def write_run(directory: str, chat: ChatTemplate) -> None:
  files.write_json(os.path.join(directory, RUN_FILE), {
      "template": chat.template, "bos_token": chat.bos_token, "eos_token": chat.eos_token})


def of(tokenizer) -> ChatTemplate:
  """The chat template `tokenizer` carries; ChatTemplateError naming the fix without one."""
  chat = getattr(tokenizer, "chat_template", None)
  if chat is None:
    raise ChatTemplateError("this run has no chat template (a run imported from an instruct "
                            "checkpoint keeps the one of its tokenizer_config.json); format the "
                            "prompts yourself, or fine-tune with --config.finetune.template=chat "
                            "or alpaca.")
  return chat


def turn_tokenizer(tokenizer):
  """`tokenizer` with the template's end-of-turn token as its EOS id: generation then stops
  where the assistant's turn ends. ChatTemplateError if that end is not one token."""
  chat = of(tokenizer)
  closing = chat.end_of_turn()
  ids = tokenizer.encode(closing) if closing else []
  if len(ids) != 1:
    raise ChatTemplateError(f"the chat template {chat.source or '(in memory)'} ends an answer "
                            f"with {closing!r}, not one token, so generation cannot stop there.")
  view = copy.copy(tokenizer)
  view.eos_id = ids[0]
  return view
