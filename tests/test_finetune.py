"""Fine-tuning: classification, instruction following and preference tuning, fully and with
LoRA, on tasks the tests generate, starting from a small model pretrained here on the same kind
of text."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import preference_study
from jaxlm import config as config_lib
from jaxlm import finetune, sharding
from jaxlm import generate as generate_lib
from jaxlm import params as params_lib
from jaxlm import run as run_lib
from jaxlm import steps as steps_lib
from jaxlm.model import Transformer, count_params
from tests.conftest import REPO, USER_XLA_FLAGS

ADJECTIVES = ["red", "big", "small", "green", "old", "new", "quiet", "bright", "dark", "happy"]
NOUNS = ["cat", "dog", "bird", "fish", "tree", "house", "river", "road", "car", "book", "lamp",
         "chair", "garden", "window", "door", "city"]
VERBS = ["sees", "likes", "finds", "takes", "moves", "paints", "opens", "follows", "watches"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "twelve"]
REVERSE_WORDS = ["cat", "dog", "bird", "fish", "tree", "house", "road", "car", "book", "lamp",
                 "door", "city"]


def sentence(rng: random.Random, with_number: bool) -> str:
  """'the old cat sees the red door' (with a number word in one adjective slot if asked)."""
  words = ["the", rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS), "the",
           rng.choice(ADJECTIVES), rng.choice(NOUNS)]
  if rng.random() < 0.5:
    words += ["near", "the", rng.choice(NOUNS)]
  if with_number:
    words[rng.choice([1, 5])] = rng.choice(NUMBERS)
  return " ".join(words)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  return pretrain_base(tmp_path_factory.mktemp("base"))


def pretrain_base(root) -> str:
  """A 2-layer model pretrained for 300 steps on sentences like the tasks' (with and without
  number words); returns its workdir. (Its validation loss is 0.72-0.74 at 300 steps and 0.72
  at 500; the fine-tuning results below were the same from both.)"""
  rng = random.Random(0)
  corpus = root / "corpus"
  corpus.mkdir()
  for i in range(60):
    lines = [sentence(rng, rng.random() < 0.5) + "." for _ in range(60)]
    (corpus / f"{i}.txt").write_text("\n".join(lines) + "\n")
  values = {
      "model": {"num_layers": 2, "num_heads": 4, "embed_dim": 128, "mlp_dim": 256,
                "vocab_size": 320, "max_seq_len": 64},
      "data": {"corpus": "text_files", "files": f"{corpus}/*.txt", "seq_len": 32, "stride": 32,
               "data_dir": str(root / "cache"), "validation_fraction": 0.1},
      "train": {"num_steps": 300, "global_batch_size": 16, "eval_every": 300, "eval_batches": 2,
                "checkpoint_every": 300, "sample_every": 1000, "sample_max_new_tokens": 0},
      "optim": {"name": "adamw", "learning_rate": 3e-3, "min_learning_rate": 3e-4,
                "warmup_steps": 20},
  }
  workdir = root / "run"
  # Through the CLI, in its own process, like the fine-tuning runs below: the base model then
  # does not depend on what earlier tests left in this process.
  result = run_script("pretrain", [f"--workdir={workdir}"] + [
      f"--config.{section}.{key}={value}" for section, fields in values.items()
      for key, value in fields.items()])
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["eval_loss"] < 1.5  # it learned the sentences
  return str(workdir)


def classification_csv(path, count: int, seed: int) -> None:
  rng = random.Random(seed)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["text", "label"])
    for _ in range(count):
      has_number = rng.random() < 0.5
      writer.writerow([sentence(rng, has_number), "number" if has_number else "none"])


def reversal_json(path, count: int, seed: int, num_words: int = 3) -> None:
  rng = random.Random(seed)
  records = []
  for _ in range(count):
    words = rng.sample(REVERSE_WORDS, num_words)
    records.append({"instruction": "Reverse the words.", "input": " ".join(words),
                    "output": " ".join(reversed(words))})
  with open(path, "w") as f:
    json.dump(records, f)


def run_script(name: str, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
  """Runs experiments.`name` with XLA's default optimization (hundreds of steps)."""
  return subprocess.run([sys.executable, "-m", f"experiments.{name}", "--noprogress", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, XLA_FLAGS=USER_XLA_FLAGS))


def _final(metrics_path: str) -> dict:
  with open(metrics_path) as f:
    records = [json.loads(line) for line in f]
  return [r for r in records if "test_accuracy" in r or "test_loss" in r][-1]


@pytest.fixture(scope="module")
def classifiers(base_run, tmp_path_factory):
  """The documented defaults (all weights, 0.064 / embed_dim, 5 epochs, batch 8) and LoRA
  rank 8 on the number-word task: their summaries."""
  root = tmp_path_factory.mktemp("cls")
  data = root / "numbers.csv"
  classification_csv(data, 1000, seed=1)
  results = {}
  for name, extra in [("full", []),
                      # On query/key/value: with query/value alone the adapters found the
                      # task only on some numeric paths (0.70-1.0 measured across runs).
                      ("lora", ["--config.model.lora_rank=8",
                                "--config.model.lora_targets=query,key,value",
                                "--config.optim.learning_rate=3e-3",
                                "--config.finetune.epochs=8",
                                "--config.train.global_batch_size=16",
                                # (train metrics on a 64-example sample: not asserted here)
                                "--config.finetune.train_eval_examples=64"])]:
    workdir = root / name
    result = run_script("finetune_classifier", [
        f"--init={base_run}", f"--data={data}", f"--workdir={workdir}", *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    results[name] = (json.loads(result.stdout.strip().splitlines()[-1]), workdir)
  return results


@pytest.mark.e2e
def test_classifier_learns_the_number_word_task(classifiers):
  summary, workdir = classifiers["full"]
  # The bar the defaults were chosen to clear (docs/finetuning.md). Measured across base runs
  # pretrained on different splits and three data seeds: 0.94-1.0 (1.0 in 7 of 8).
  assert summary["test_accuracy"] >= 0.90, summary
  assert summary["trainable_params"] == summary["total_params"]
  for name in ("config.json", "labels.json", "metrics.jsonl", "summary.json", "source.json",
               "tokenizer.model"):
    assert (workdir / name).is_file(), name
  assert json.loads((workdir / "labels.json").read_text()) == ["none", "number"]
  final = _final(str(workdir / "metrics.jsonl"))
  assert {"train_accuracy", "validation_accuracy", "test_accuracy", "train_loss"} <= set(final)


@pytest.mark.e2e
def test_lora_classifier_matches_full_finetuning_with_few_parameters(classifiers):
  full, _ = classifiers["full"]
  lora_summary, workdir = classifiers["lora"]
  assert lora_summary["trainable_params"] < 0.05 * lora_summary["total_params"]
  # The same bar as full fine-tuning, not "within 2 points of it", which a 200-example split
  # turns into a 4-example coin toss. Measured as above: 0.93-1.0 (0.995-1.0 on this base).
  assert lora_summary["test_accuracy"] >= 0.90, (lora_summary, full)
  assert (workdir / "adapters.safetensors").is_file()


@pytest.mark.e2e
def test_predict_labels_new_texts(classifiers, tmp_path):
  _, workdir = classifiers["full"]
  rng = random.Random(7)
  texts = [sentence(rng, i % 2 == 0) for i in range(20)]
  (tmp_path / "new.txt").write_text("\n".join(texts) + "\n")
  result = subprocess.run([sys.executable, "-m", "experiments.finetune_classifier",
                           f"--workdir={workdir}", f"--predict={tmp_path / 'new.txt'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert [r["text"] for r in rows] == texts
  correct = sum(r["label"] == ("number" if i % 2 == 0 else "none") for i, r in enumerate(rows))
  assert correct >= 19
  assert abs(sum(rows[0]["probabilities"].values()) - 1.0) < 1e-4
  # A table's column instead; in a TSV quote characters are text (as in the SMS Spam file).
  quoted = ['"' + texts[0], texts[1] + '"']
  (tmp_path / "new.tsv").write_text("id\tmessage\n" + "".join(
      f"{i}\t{t}\n" for i, t in enumerate(quoted)))
  result = subprocess.run([sys.executable, "-m", "experiments.finetune_classifier",
                           f"--workdir={workdir}", f"--predict={tmp_path / 'new.tsv'}",
                           "--config.finetune.text_column=message"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert [json.loads(line)["text"] for line in result.stdout.strip().splitlines()] == quoted


@pytest.mark.e2e
def test_instruction_tuning_learns_to_reverse_words(base_run, tmp_path):
  # Two words: learned with certainty (12 epochs at 1e-3: exact match 1.0 on data seeds 2-5,
  # on 1 and on 8 simulated devices; 8 epochs at 2e-3, this test: 1.0, 0.983, 1.0, 1.0, 1.0 on
  # data seeds 2-6; 6 epochs at 3e-3 fell to 0.79-0.81 on two of them). Three words sat at
  # the threshold: 0.889-0.967 across numeric paths, so the test passed or failed by luck.
  data = tmp_path / "reverse.json"
  reversal_json(data, 900, seed=2, num_words=2)
  workdir = tmp_path / "instruct"
  result = run_script("finetune_instruct", [
      f"--init={base_run}", f"--data={data}", f"--workdir={workdir}",
      "--config.finetune.template=chat", "--config.finetune.epochs=8",
      "--config.finetune.train_eval_examples=64",
      "--config.finetune.max_new_tokens=12", "--config.train.global_batch_size=16",
      "--config.optim.learning_rate=2e-3", "--config.optim.schedule=cosine",
      "--config.optim.min_learning_rate=1e-5", "--config.optim.warmup_steps=20",
      # Every 4 of the 8 epochs (40 steps each), not every epoch: the same training, 2
      # evaluations instead of 8 (the best was the last every time).
      "--config.train.eval_every=160"])
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["best_step"] == 320, summary
  assert summary["test_exact_match"] >= 0.9, summary
  report = json.loads((workdir / "test_responses.json").read_text())
  assert len(report) == 180 and {"instruction", "input", "output", "response"} <= set(report[0])
  final = _final(str(workdir / "metrics.jsonl"))
  assert {"train_loss", "validation_loss", "test_loss", "test_perplexity"} <= set(final)
  # The untuned model never answers the task.
  config, params, tokenizer = run_lib.load_run(base_run)
  split = finetune.encode_instructions(
      finetune.read_instructions(str(data), "chat")[-40:], tokenizer, 64)
  untuned = finetune.respond(config, params, tokenizer, split, max_new_tokens=12)
  assert sum(r["exact_match"] for r in untuned) == 0


@pytest.mark.e2e
def test_preference_tuning_makes_the_model_prefer_what_it_did_not(base_run, tmp_path):
  """DPO on pairs preferring 'bright' among the adjectives (experiments/preference_study.py,
  whose table docs/finetuning.md shows). The base model's greedy answers never pick it, and its
  own log-probabilities prefer the chosen answer for about half the pairs; after 2 epochs every
  held-out pair is ranked right and the greedy answers say 'bright' (thresholds 0.9 and 0.8;
  measured with 360 pairs, data seeds 1-3: accuracy 1.0 and 1.0, the base's log-probabilities
  0.65, 0.63, 0.46)."""
  data = tmp_path / "pairs.jsonl"
  preference_study.write_pairs(str(data), 360, seed=1, liked="bright")
  workdir = tmp_path / "dpo"
  result = run_script("finetune_preference", [
      f"--init={base_run}", f"--data={data}", f"--workdir={workdir}",
      "--config.finetune.template=plain", "--config.finetune.epochs=2",
      "--config.finetune.max_new_tokens=6", "--config.optim.learning_rate=1e-4"])
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["test_preference_accuracy"] >= 0.9, summary
  assert 0.25 <= summary["test_reference_preference_accuracy"] <= 0.75, summary
  evaluations = [r for r in map(json.loads, open(workdir / "metrics.jsonl"))
                 if "eval_preference_accuracy" in r]
  assert len(evaluations) == 2 and evaluations[-1]["eval_preference_accuracy"] >= 0.9
  report = json.loads((workdir / "test_responses.json").read_text())
  liked = lambda answers: np.mean([a["response"].strip().startswith("bright") for a in answers])
  assert len(report) == 72 and liked(report) >= 0.8, report[:5]
  config, params, tokenizer = run_lib.load_run(base_run)
  prompts = finetune.encode_instructions(
      [finetune.Example("", r["prompt"], response=r["chosen"]) for r in report], tokenizer, 64)
  untuned = finetune.respond(config, params, tokenizer, prompts, max_new_tokens=6)
  assert liked(untuned) <= 0.2, untuned[:5]


# ---------------------------------------------------------------------------------------------
# Masking, trainable selection and bad input (fast)
# ---------------------------------------------------------------------------------------------

class _WordTokenizer:
  """One id per character: enough to test batching and masking."""
  pad_id, eos_id, vocab_size = 0, 1, 130

  def encode_batch(self, texts):
    return [[2 + (ord(c) % 128) for c in t] for t in texts]

  def decode(self, ids):
    return "".join(chr(i - 2) for i in ids if i >= 2)


def test_test_answers_never_cut_their_prompts_whatever_max_new_tokens(monkeypatch):
  """The default finetune.max_new_tokens (128) on a 64-token context: each answer gets what the
  context leaves after its prompt, instead of a failure after training."""
  examples = [finetune.Example(f"a:{i}", "x" * length + ": ", response="abc")
              for i, length in enumerate((10, 40, 10))]
  budgets, generate = {}, generate_lib.generate

  def recording_generate(model_config, params, tokenizer, prompts, *, max_new_tokens, **kwargs):
    budgets.update({len(p): max_new_tokens for p in prompts})
    return generate(model_config, params, tokenizer, prompts, max_new_tokens=max_new_tokens,
                    **kwargs)
  monkeypatch.setattr(generate_lib, "generate", recording_generate)
  split = finetune.encode_instructions(examples, _WordTokenizer(), max_length=64)
  config = config_lib.validate({"model": {"num_layers": 1, "num_heads": 2, "embed_dim": 16,
                                          "mlp_dim": 32, "vocab_size": 130, "max_seq_len": 64},
                                "data": {"seq_len": 64, "stride": 64}})
  params = nn.unbox(Transformer(config.model).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
  report = finetune.respond(config, params, _WordTokenizer(), split, max_new_tokens=128)
  assert [r["exact_match"] for r in report] == [False, False, False]
  assert budgets == {12: 64 - 12, 42: 64 - 42}  # prompt characters (= tokens here) -> budget
  assert len(report[1]["response"]) <= 64 - 42


def test_prompt_and_padding_never_enter_the_instruction_loss():
  examples = [finetune.Example("a:1", "prompt one: ", response="abc"),
              finetune.Example("a:2", "p: ", response="longer response")]
  encoded = finetune.encode_instructions(examples, _WordTokenizer(), max_length=64)
  batch = finetune.make_batch(encoded, [0, 1], 4, 64, 0, "instruct")
  # Weighted targets are exactly the response characters and the final EOS.
  for row, example in enumerate(examples):
    weighted = batch["targets"][row][batch["weights"][row] > 0]
    assert list(weighted) == _WordTokenizer().encode_batch([example.response])[0] + [1]
  assert batch["weights"][2:].sum() == 0  # filler rows
  config = config_lib.validate({"model": {"num_layers": 1, "num_heads": 2, "embed_dim": 16,
                                          "mlp_dim": 32, "vocab_size": 130, "max_seq_len": 64},
                                "data": {"seq_len": 64, "stride": 64}})
  model = Transformer(config.model)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
  loss = steps_lib.lm_loss()
  _, sums = loss(model, params, jax.tree.map(jnp.asarray, batch), None)
  changed = dict(batch, targets=np.where(batch["weights"] > 0, batch["targets"],
                                         (batch["targets"] + 7) % 130))
  _, changed_sums = loss(model, params, jax.tree.map(jnp.asarray, changed), None)
  assert float(changed_sums["loss_sum"]) == pytest.approx(float(sums["loss_sum"]), rel=1e-6)
  assert float(sums["weight_sum"]) == 3 + 1 + 15 + 1


class _FixedLogits:
  """A stand-in model whose forward pass returns given logits [batch, length, classes]."""

  def __init__(self, logits):
    self.logits = logits

  def apply(self, *args, **kwargs):
    return self.logits


def test_classifier_reads_the_last_real_token():
  examples = [finetune.Example("f:2", "ab", "x"), finetune.Example("f:3", "abcde", "y")]
  encoded = finetune.encode_classifier(examples, _WordTokenizer(), ["x", "y"], 32)
  batch = finetune.make_batch(encoded, [0, 1], 2, 32, 0, "classifier")
  assert list(batch["last_index"]) == [1, 4] and list(batch["labels"]) == [0, 1]
  logits = np.zeros(batch["inputs"].shape + (2,), np.float32)
  logits[0, 1] = [5.0, 0.0]   # row 0, last real token: says class 0 (right)
  logits[1, 4] = [5.0, 0.0]   # row 1, last real token: says class 0 (wrong)
  logits[1, 10] = [0.0, 9.0]  # padding after the text: must be ignored
  _, sums = steps_lib.classifier_loss(_FixedLogits(jnp.asarray(logits)), None,
                                      jax.tree.map(jnp.asarray, batch), None)
  assert float(sums["correct"]) == 1.0 and float(sums["weight_sum"]) == 2.0


@pytest.mark.parametrize("trainable,last_n,expected", [
    ("head", 1, {"classifier"}),
    ("last_n_blocks", 1, {"classifier", "final_norm", "layers_2"}),
    ("last_n_blocks", 2, {"classifier", "final_norm", "layers_1", "layers_2"}),
    ("all", 1, {"classifier", "final_norm", "layers_0", "layers_1", "layers_2", "token_embed"}),
])
def test_trainable_selection_and_optimizer_state(trainable, last_n, expected):
  config = config_lib.validate({
      "model": {"num_layers": 3, "num_heads": 2, "embed_dim": 16, "mlp_dim": 32,
                "vocab_size": 130, "num_classes": 3},
      "finetune": {"objective": "classifier", "trainable": trainable, "last_n_blocks": last_n},
      "optim": {"warmup_steps": 0}, "train": {"global_batch_size": 8}})
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  steps = steps_lib.make_steps(config, mesh, trainable=finetune.trainable_filter(config))
  abstract = steps.abstract_state
  trainable_tree, frozen = steps.split(abstract.params)
  assert set(trainable_tree) == expected
  assert count_params(trainable_tree) + count_params(frozen) == count_params(abstract.params)
  # AdamW keeps two moments per trainable parameter and nothing for frozen ones.
  moments = [x for x in jax.tree.leaves(abstract.opt_state) if len(x.shape) > 0]
  assert sum(math.prod(x.shape) for x in moments) == 2 * count_params(trainable_tree)
  if (trainable, last_n) != ("last_n_blocks", 1):
    return  # (one real step is enough to show the step honours the selection)
  # One step of the shared train step moves the trainable params only.
  state = steps.init(jax.random.PRNGKey(0))
  encoded = finetune.encode_classifier(
      [finetune.Example(f"f:{i}", "abcdef"[:i + 1], "xyz"[i % 3]) for i in range(8)],
      _WordTokenizer(), ["x", "y", "z"], 16)
  batch = finetune.make_batch(encoded, list(range(8)), 8, 16, 0, "classifier")
  before = jax.device_get(state.params)
  state, metrics = steps.train(state, sharding.global_batch(batch, mesh))
  after = jax.device_get(state.params)
  assert np.isfinite(float(metrics["train_loss"]))
  moved = {path[0].key for path, a in jax.tree_util.tree_flatten_with_path(after)[0]
           if not np.array_equal(a, _leaf(before, path))}
  assert moved == expected


def _leaf(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def _write(path, text):
  path.write_text(text)
  return str(path)


def test_bad_classifier_data_names_file_and_row(tmp_path):
  good = _write(tmp_path / "good.csv", "text,label\na b,x\nc d,y\n")
  cases = [
      (_write(tmp_path / "cols.csv", "sentence,label\na,x\n"), "cols.csv has no column 'text'"),
      (_write(tmp_path / "empty.csv", ""), "empty.csv is empty"),
      (_write(tmp_path / "header.csv", "text,label\n"), "header.csv has no examples"),
      (_write(tmp_path / "nolabel.csv", "text,label\na,x\nb,\n"), "nolabel.csv:3"),
  ]
  for path, message in cases:
    with pytest.raises(finetune.FinetuneError, match=message.replace(".", r"\.")):
      finetune.read_labeled(path)
  unknown = finetune.read_labeled(_write(tmp_path / "val.csv", "text,label\na,x\nb,z\n"))
  with pytest.raises(finetune.FinetuneError, match=r"val\.csv:3: label 'z'"):
    finetune.label_ids(unknown, ["x", "y"])
  for text, message in [("text,label\ncat, river house,0\n", r"f\.csv:2 has 3 fields but the "
                          r"header has 2; quote fields that hold commas\.$"),
                        ("text,label\nonly\n", r"f\.csv:2 has 1 fields .* all its columns\.$")]:
    with pytest.raises(finetune.FinetuneError, match=message):
      finetune.read_labeled(_write(tmp_path / "f.csv", text))
  examples = finetune.read_labeled(good)
  with pytest.raises(finetune.FinetuneError, match=r"good\.csv:2: the text is 3 tokens, longer"):
    finetune.encode_classifier(examples, _WordTokenizer(), ["x", "y"], max_length=2)


def test_labeled_data_reads_the_same_from_every_format(tmp_path):
  rows = [("a \"quoted\" text, with a comma", "x"), ("plain", "y"), ("7 is a number", "7")]
  tsv_rows = [('"starts with a quote', "x"), ("plain", "y")]  # TSV: quotes are text
  as_json = [{"text": t, "label": label} for t, label in rows]
  files = {
      "d.csv": "text,label\n" + "".join(f'"{t.replace(chr(34), 2 * chr(34))}",{label}\n'
                                        for t, label in rows),
      "d.jsonl": "".join(json.dumps(r) + "\n" for r in as_json),
      "d.json": json.dumps(as_json),
      "lines.json": "".join(json.dumps(r) + "\n" for r in as_json),  # JSONL named .json
  }
  files["UPPER.CSV"] = files["d.csv"]
  files["bom.csv"] = "\ufeff" + files["d.csv"]  # a byte-order mark, as Excel writes
  files["bom.jsonl"] = "\ufeff" + files["d.jsonl"]
  for name, text in files.items():
    examples = finetune.read_labeled(_write(tmp_path / name, text))
    assert [(e.text, e.label) for e in examples] == rows, name
  tsv = _write(tmp_path / "d.tsv", "label\ttext\n" + "".join(f"{label}\t{t}\n"
                                                             for t, label in tsv_rows))
  examples = finetune.read_labeled(tsv)
  assert [(e.text, e.label) for e in examples] == tsv_rows
  assert [e.where for e in examples] == [f"{tsv}:2", f"{tsv}:3"]
  numbers = finetune.read_labeled(_write(tmp_path / "n.json", '[{"text": "t", "label": 1}]'))
  assert numbers[0].label == "1"  # JSON numbers are labels as written


def test_the_sms_spam_collection_is_read_as_published(tmp_path, tiny_lm_run):
  """The raw `SMSSpamCollection` file of the book's chapter 6: `ham`/`spam`, a tab, the message
  (quotes and commas are text), no header row, no file extension; read with
  finetune.table_columns=label,text, up to the prepared splits."""
  lines = ["ham\tGo until jurong point, crazy.. Available only in bugis n great world la e "
           "buffet...", 'spam\tFree entry in 2 a wkly comp to win FA Cup final tkts "21st May"',
           "ham\tOk lar... Joking wif u oni...", "spam\tWINNER!! claim your prize now",
           "ham\tI'm gonna be home soon", "spam\tURGENT! You have won a 1 week FREE membership"]
  raw = _write(tmp_path / "SMSSpamCollection", "\n".join(lines * 4) + "\n")
  examples = finetune.read_labeled(raw, table_columns=("label", "text"))
  assert [(e.label, e.text) for e in examples[:2]] == [tuple(x.split("\t")) for x in lines[:2]]
  assert examples[1].where == f"{raw}:2"
  prepared = finetune.prepare(tiny_lm_run, str(tmp_path / "spam"), "classifier", raw, {
      "finetune.table_columns": "label,text", "finetune.balance": True,
      "train.global_batch_size": 8})
  assert prepared.classes == ["ham", "spam"] and len(prepared.splits["train"].ids) == 17
  with pytest.raises(finetune.FinetuneError, match=r"SMSSpamCollection: not JSON .* "):
    finetune.read_labeled(raw)  # (without the columns: no header, no table extension)
  with pytest.raises(finetune.FinetuneError,
                     match=r"bad:2 has 3 fields but the columns given have 2"):
    finetune.read_labeled(_write(tmp_path / "bad", "ham\tok\nspam\tx\ty\n"),
                          table_columns=("label", "text"))
  with pytest.raises(config_lib.ConfigError, match=r"finetune.table_columns='label,message' has "
                                                   r"no column 'text' \(finetune.text_column\)"):
    finetune.prepare(tiny_lm_run, str(tmp_path / "w"), "classifier", raw,
                     {"finetune.table_columns": "label,message"})
  assert not (tmp_path / "w").exists()


def test_texts_to_label_are_read_from_every_format(tmp_path):
  texts = ["a cat, with a comma", "plain"]
  records = [{"msg": t, "n": i} for i, t in enumerate(texts)]
  for name, content in [("p.txt", "\n".join(texts[:1] + [""] + texts[1:]) + "\n"),
                        ("p.csv", 'msg,n\n"a cat, with a comma",0\nplain,1\n'),
                        ("p.jsonl", "".join(json.dumps(r) + "\n" for r in records)),
                        ("p.json", json.dumps(records))]:
    assert finetune.read_texts(_write(tmp_path / name, content), "msg") == texts, name
  for name, content, message in [
      ("short.csv", "n,msg\n1\n", r"short\.csv:2 has 1 fields"),
      ("other.jsonl", '{"text": "x"}\n', r"other\.jsonl:1: no text in field 'msg'"),
      ("nope.txt", None, r"nope\.txt does not exist")]:
    path = _write(tmp_path / name, content) if content else str(tmp_path / name)
    with pytest.raises(finetune.FinetuneError, match=message):
      finetune.read_texts(path, "msg")
  (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
  with pytest.raises(finetune.FinetuneError, match=r"latin\.txt is not UTF-8 text"):
    finetune.read_texts(str(tmp_path / "latin.txt"), "msg")


def test_bad_instruction_data_names_file_and_record(tmp_path):
  cases = [
      (_write(tmp_path / "a.json", '[{"instruction": "x"}]'), r"a\.json:record 0: field 'output'"),
      (_write(tmp_path / "b.json", '{"instruction": "x"}'), r"b\.json must hold a JSON list"),
      (_write(tmp_path / "c.jsonl", '{"instruction": "x", "output": "y"}\nnot json\n'),
       r"c\.jsonl:2: not JSON"),
      (_write(tmp_path / "d.json", "[]"), r"d\.json has no records"),
  ]
  for path, message in cases:
    with pytest.raises(finetune.FinetuneError, match=message):
      finetune.read_instructions(path, "alpaca")
  long = finetune.read_instructions(
      _write(tmp_path / "e.json", '[{"instruction": "x", "output": "' + "y" * 80 + '"}]'), "chat")
  with pytest.raises(finetune.FinetuneError, match=r"e\.json:record 0: prompt \+ response"):
    finetune.encode_instructions(long, _WordTokenizer(), max_length=64)


@pytest.mark.e2e
def test_cli_errors_are_one_line_and_write_nothing(tmp_path):
  data = _write(tmp_path / "d.csv", "text,label\na,x\n")
  cases = [
      (["--data=" + data, f"--workdir={tmp_path}/w"], "--init required"),
      ([f"--init={tmp_path}/nope", "--data=" + data, f"--workdir={tmp_path}/w"],
       "does not exist"),
      ([f"--init={tmp_path}", "--data=" + data, f"--workdir={tmp_path}/w",
        "--config.model.lora_rank=abc"], "lora_rank"),
  ]
  for args, message in cases:
    result = run_script("finetune_classifier", args, timeout=120)
    assert result.returncode == 2, result.stderr[-1000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.e2e
def test_a_classifier_fine_tunes_from_an_imported_gpt2(tmp_path):
  """An imported GPT-2 run (its vocab.json + merges.txt tokenizer) is an init run like any
  other. (Instruction tuning with LoRA from an imported model, exported back with the adapters
  merged: tests/test_convert_llama.py.)"""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tokenizers import ByteLevelBPETokenizer

  from jaxlm import convert
  rng = random.Random(3)
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator([sentence(rng, i % 2 == 0) for i in range(400)], vocab_size=300,
                          special_tokens=["<|endoftext|>"], show_progress=False)
  bpe.save_model(str(hf_dir))
  vocab = len(json.loads((hf_dir / "vocab.json").read_text()))
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=2))
  model.save_pretrained(str(hf_dir))
  base = tmp_path / "gpt2"
  convert.import_gpt2(str(hf_dir), str(base))

  classification_csv(tmp_path / "numbers.csv", 120, seed=4)
  result = run_script("finetune_classifier", [
      f"--init={base}", f"--data={tmp_path / 'numbers.csv'}", f"--workdir={tmp_path / 'cls'}",
      "--config.finetune.epochs=1"])
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  # The default: every weight trains, at 0.064 / embed_dim.
  assert summary["trainable_params"] == summary["total_params"]
  config = json.loads((tmp_path / "cls" / "config.json").read_text())
  assert config["optim"]["learning_rate"] == pytest.approx(0.064 / 32)


def test_balance_and_split_are_seeded_and_complete():
  examples = [finetune.Example(f"f:{i}", f"t{i}", "a" if i < 30 else "b") for i in range(40)]
  balanced = finetune.balance(examples, seed=0)
  assert sorted(e.label for e in balanced).count("a") == 10 == len(balanced) - 10
  assert balanced == finetune.balance(examples, seed=0)
  train, validation, test = finetune.split_examples(examples, 0.7, 0.1, seed=5)
  assert (len(train), len(validation), len(test)) == (28, 4, 8)
  assert sorted(e.where for e in train + validation + test) == sorted(e.where for e in examples)
  assert finetune.class_names(["10", "9", "2"]) == ["2", "9", "10"]


def _trainable_names(adapter: dict) -> tuple[set[str], config_lib.Config]:
  """The '/'-joined paths that train in a 2-layer classifier with `adapter`'s model keys."""
  config = config_lib.validate({
      "model": {"num_layers": 2, "num_heads": 2, "embed_dim": 16, "mlp_dim": 32,
                "vocab_size": 50, "num_classes": 2, **adapter},
      "finetune": {"objective": "classifier"}})
  params = Transformer(config.model).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  trainable, _ = params_lib.partition(nn.unbox(params["params"]),
                                      finetune.trainable_filter(config))
  return {"/".join(p.key for p in path) for path, _ in
          jax.tree_util.tree_flatten_with_path(trainable)[0]}, config


def test_lora_trains_only_adapters_and_the_head():
  names, config = _trainable_names({"lora_rank": 4, "lora_targets": ("query", "value")})
  assert names == {"classifier/kernel", "classifier/bias"} | {
      f"layers_{i}/attention/{m}/lora_{x}" for i in (0, 1) for m in ("query", "value")
      for x in "ab"}
  assert finetune.resolved_trainable(config) == "lora"


def test_prefix_tuning_trains_only_the_prefixes_and_the_head(tmp_path):
  """model.prefix_length: the layers' prefix slots (and a classification head) train; an init
  run's prefixes stay (they cannot be merged into the weights); pretraining and Hugging Face
  export refuse them."""
  import dataclasses

  from jaxlm import convert
  from jaxlm import pretrain as pretrain_lib
  from jaxlm.finetune import FinetuneError, core
  names, config = _trainable_names({"prefix_length": 4})
  assert names == {"classifier/kernel", "classifier/bias"} | {
      f"layers_{i}/attention/prefix_{x}" for i in (0, 1) for x in ("key", "value")}
  assert finetune.resolved_trainable(config) == "prefix"
  base = config_lib.validate({})
  tuned = core.finetune_config(base, "instruct", {"model.prefix_length": 8})
  assert tuned.model.prefix_length == 8 and finetune.resolved_trainable(tuned) == "prefix"
  # A prefix-tuned init run keeps its prefixes, and refuses to drop or resize them.
  assert core.finetune_config(tuned, "preference", {}).model.prefix_length == 8
  with pytest.raises(FinetuneError, match=r"model\.prefix_length=0: the init run was "
                     r"prefix-tuned with 8 slots"):
    core.finetune_config(tuned, "preference", {"model.prefix_length": 0})
  with pytest.raises(config_lib.ConfigError, match=r"model\.prefix_length is for fine-tuning"):
    pretrain_lib.prepare(tuned, str(tmp_path / "run"))
  with pytest.raises(convert.ConvertError, match=r"model\.prefix_length=8 \(prefix tuning"):
    convert.check_exportable(dataclasses.replace(base.model, prefix_length=8))


def test_fine_tuning_uses_adamw_and_no_batch_warmup_whatever_the_init_run_trained_with():
  """The default pretraining config trains with Muon (and a run may use a batch-size warmup);
  fine-tuning's measured defaults are AdamW's, with its own epochs of batches."""
  from jaxlm.finetune import core
  init = config_lib.validate({"optim": {"name": "muon", "learning_rate": 0.02},
                              "train": {"global_batch_size": 16, "batch_warmup_tokens": 1000,
                                        "batch_warmup_start": 4}})
  config = core.finetune_config(init, "classifier", {})
  assert config.optim.name == "adamw"
  assert (config.train.batch_warmup_tokens, config.train.batch_warmup_start) == (0, 0)
  assert core.finetune_config(init, "classifier", {"optim.name": "muon"}).optim.name == "muon"
