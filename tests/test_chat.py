"""Chat templates: rendered as `transformers` renders them, kept through import, fine-tuning and
export, used by `finetune.template=model` and `generate --chat`; bad templates refused in one
line."""

from __future__ import annotations

import json
import os
import sysconfig

import numpy as np
import pytest

from jaxlm import chat, convert, finetune
from jaxlm import run as run_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.config import FinetuneConfig
from tests.helpers import LLAMA3_CHAT_TEMPLATE

transformers = pytest.importorskip("transformers")

# Shortened forms of the published templates (their structure: Llama 3's headers and eot,
# Qwen's ChatML turns with a default system prompt).
LLAMA3 = LLAMA3_CHAT_TEMPLATE
QWEN = ("{%- if messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
        "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
        "{%- endif %}{%- for message in messages %}"
        "{%- if message.role == 'assistant' and loop.first %}"
        "{{- raise_exception('the first turn must not be the assistant') }}{%- endif %}"
        "{%- if not (message.role == 'system' and loop.first) %}"
        "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
SPECIAL = {"llama": ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>",
                     "<|end_header_id|>", "<|eot_id|>"],
           "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}
TOKENS = {"llama": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
          "qwen": {"bos_token": None, "eos_token": "<|im_end|>"}}
TEMPLATES = {"llama": LLAMA3, "qwen": QWEN}
CONVERSATIONS = [
    [{"role": "user", "content": "Reverse the words.\ncat dog"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": " hi "},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
]


def write_tokenizer(directory, family: str) -> None:
  """tokenizer.json (byte-level BPE trained on stdlib text, the family's special tokens) and
  tokenizer_config.json with its chat template."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  folder = os.path.join(sysconfig.get_paths()["stdlib"], "json")
  texts = [open(os.path.join(folder, n), encoding="utf-8").read()
           for n in sorted(os.listdir(folder)) if n.endswith(".py")]
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"\s?\w+|\s?[^\w\s]+|\s+"), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIAL[family], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tokenizer.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATES[family],
       **TOKENS[family]}))


def hf_tokenizer(directory):
  return transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_rendering_and_ids_equal_transformers(family, tmp_path):
  write_tokenizer(tmp_path, family)
  template = chat.read_hf(str(tmp_path))
  ours = tokenizer_lib.load_tokenizer(str(tmp_path))
  reference = hf_tokenizer(tmp_path)
  for messages in CONVERSATIONS:
    for add in (False, True):
      text = template.render(messages, add_generation_prompt=add)
      assert text == reference.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=add)
      ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=add,
                                          return_dict=False)
      assert ours.encode(text) == list(ids)
  # An answer is what follows the generation prompt, up to the end of the turn.
  end = {"llama": "<|eot_id|>", "qwen": "<|im_end|>"}[family]
  assert template.end_of_turn() == end
  assert template.answer("cat dog", " dog cat ") == {"llama": "dog cat", "qwen": " dog cat "}[
      family] + end
  assert chat.turn_tokenizer(_carrying(ours, template)).eos_id == ours.encode(end)[0]
  assert ours.eos_id != ours.encode(end)[0]  # (plain generation still stops at end of text)


def _carrying(tokenizer, template):
  tokenizer.chat_template = template
  return tokenizer


def test_where_a_template_is_read_from(tmp_path):
  write_tokenizer(tmp_path, "qwen")
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  config["chat_template"] = [{"name": "tool_use", "template": "{{ 'tools' }}"},
                             {"name": "default", "template": QWEN}]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  assert chat.read_hf(str(tmp_path)).template == QWEN
  (tmp_path / "chat_template.jinja").write_text(LLAMA3)  # (transformers >= 4.43 writes this)
  assert chat.read_hf(str(tmp_path)).template == LLAMA3
  os.remove(tmp_path / "chat_template.jinja")
  del config["chat_template"]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  assert chat.read_hf(str(tmp_path)) is None
  # The template's own refusals and failures are one line.
  with pytest.raises(chat.ChatTemplateError, match="must not be the assistant"):
    chat.ChatTemplate(QWEN).render([{"role": "assistant", "content": "x"}], False)
  with pytest.raises(chat.ChatTemplateError, match="failed to render"):
    chat.ChatTemplate("{{ messages[0]['content'] + 1 }}").prompt("x")


def _llama_dir(tmp_path, template: str | None = LLAMA3):
  """A small random Llama with the Llama 3-style tokenizer (and chat template)."""
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  write_tokenizer(hf_dir, "llama")
  if template is None:
    os.remove(hf_dir / "tokenizer_config.json")
  elif template != LLAMA3:
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=template)))
  config = transformers.LlamaConfig(vocab_size=405, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, max_position_embeddings=128)
  transformers.LlamaForCausalLM(config).save_pretrained(str(hf_dir))
  return hf_dir


def test_import_keeps_the_template_fine_tuning_formats_with_it_and_export_writes_it(tmp_path):
  hf_dir = _llama_dir(tmp_path)
  workdir = tmp_path / "run"
  convert.import_hf(str(hf_dir), str(workdir))
  assert (workdir / chat.RUN_FILE).is_file()
  config, params, tokenizer = run_lib.load_run(str(workdir))
  assert tokenizer.chat_template.template == LLAMA3
  assert tokenizer.chat_template.bos_token == "<|begin_of_text|>"

  # finetune.template=model: the prompt is the template's, the target its answer + end of turn.
  data = tmp_path / "data.json"
  data.write_text(json.dumps([{"instruction": "Reverse the words.", "input": "cat dog",
                               "output": "dog cat"}]))
  [example] = finetune.instruct._read(
      str(data), FinetuneConfig(template="model"), tokenizer, "--data")
  assert example.text == LLAMA3_PROMPT and example.target == "dog cat<|eot_id|>"
  split = finetune.encode_instructions([example], tokenizer, 64)
  [ids] = split.ids
  assert ids == tokenizer.encode(LLAMA3_PROMPT) + tokenizer.encode("dog cat<|eot_id|>")
  assert ids[-1] == tokenizer.encode("<|eot_id|>")[0]  # no end-of-text after the turn
  row = finetune.instruct._row(split, 0, 48, tokenizer.pad_id)
  assert float(np.sum(row["weights"])) == len(tokenizer.encode("dog cat<|eot_id|>"))

  out = tmp_path / "exported"
  convert.export_hf(config.model, params, tokenizer, str(out))
  reloaded = hf_tokenizer(out)
  for messages in CONVERSATIONS:
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
        == tokenizer.chat_template.render(messages, add_generation_prompt=True)


LLAMA3_PROMPT = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                 "Reverse the words.\ncat dog<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_template_model_without_a_template_or_with_a_broken_one_is_one_line(tmp_path):
  plain = tmp_path / "plain"
  plain.mkdir()
  convert.import_hf(str(_llama_dir(plain, template=None)), str(plain / "run"))
  data = tmp_path / "data.json"
  data.write_text(json.dumps([{"instruction": "Say hi.", "output": "hi"}] * 20))
  with pytest.raises(finetune.FinetuneError, match="template=model: this run has no chat "
                                                    "template") as raised:
    finetune.prepare(str(plain / "run"), str(tmp_path / "tuned"), "instruct", str(data),
                     {"finetune.template": "model"})
  assert "\n" not in str(raised.value) and not (tmp_path / "tuned").exists()

  broken = tmp_path / "broken"
  broken.mkdir()
  with pytest.raises(convert.ConvertError, match="not valid Jinja"):
    convert.import_hf(str(_llama_dir(broken, template="{% for m in messages %}")),
                      str(broken / "run"))
  assert not (broken / "run").exists()

  # An answer that does not end in one token: generation could not stop there.
  words = tmp_path / "words"
  words.mkdir()
  convert.import_hf(str(_llama_dir(words, template=(
      "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' END OF TURN ' }}"
      "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"))), str(words / "run"))
  with pytest.raises(finetune.FinetuneError, match="not one token"):
    finetune.prepare(str(words / "run"), str(tmp_path / "tuned"), "instruct", str(data),
                     {"finetune.template": "model"})
  assert not (tmp_path / "tuned").exists()
