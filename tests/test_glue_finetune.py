"""GLUE and SuperGLUE fine-tuning (jaxlm/finetune/glue.py): every task read from its published
layout, pair inputs joined by the delimiter, STS-B's regression loss, the benchmark's metrics at
evaluation, bad input refused before anything is written, and two tiny in-process fine-tunes
(from conftest's random-init `tiny_lm_run`) that learn generated pair tasks."""

from __future__ import annotations

import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import finetune, glue, sharding, tasks
from jaxlm import loss as loss_lib
from jaxlm import run as run_lib
from jaxlm import steps as steps_lib
from jaxlm.finetune import glue as glue_finetune
from tests.test_glue import glue_dir, superglue_dir, tsv


class _WordTokenizer:
  """One id per word (its characters' sum, + 2): token-level checks by hand."""
  pad_id, eos_id, vocab_size = 0, 1, 1000

  def encode_batch(self, texts):
    return [[2 + sum(map(ord, w)) % 998 for w in t.split()] for t in texts]


def read(task, path):
  return glue_finetune.task(task).read(str(path), task)


def test_every_task_is_read_from_its_published_files(tmp_path):
  """The texts and labels of each task's examples, from the files tests/test_glue.py writes
  in the benchmarks' layouts (the candidates of COPA and ReCoRD, MultiRC's answer options)."""
  g, s = glue_dir(tmp_path / "glue"), superglue_dir(tmp_path / "superglue")
  texts = lambda examples: [(e.record["texts"], e.label) for e in examples]
  assert texts(read("cola", g / "CoLA/dev.tsv"))[:2] == [
      (("The sailors rode the breeze clear.",), "acceptable"),
      (('He said "hi to them.',), "unacceptable")]
  assert texts(read("mrpc", g / "MRPC/dev.tsv")) == [
      (('He said "hi to them.', "He greeted them."), "equivalent"),
      (("Stocks fell.", "It rained."), "not_equivalent")]
  assert texts(read("mnli", g / "MNLI/dev_matched.tsv"))[0] == (
      ("A man sleeps.", "Nobody sleeps"), "contradiction")
  assert [e.record["score"] for e in read("stsb", g / "STS-B/dev.tsv")] == [5.0, 0.4]
  for name, folder in [("sst2", "SST-2"), ("qqp", "QQP"), ("qnli", "QNLI"), ("rte", "RTE"),
                       ("wnli", "WNLI")]:
    examples = read(name, g / f"{folder}/dev.tsv")
    assert examples and all(e.label in glue_finetune.TASKS[name].classes for e in examples)
  assert texts(read("wnli", g / "WNLI/dev.tsv"))[0][1] == "entailment"  # (1 = entailment)
  assert texts(read("boolq", s / "BoolQ/val.jsonl")) == [(("It is red.", "is it red"), "True")]
  assert texts(read("wic", s / "WiC/val.jsonl"))[0][0][2] == "place"
  assert texts(read("wsc", s / "WSC/val.jsonl"))[1] == (
      ("the table won't fit through the doorway because *it* is too wide.", "it", "the table"),
      "True")
  assert texts(read("cb", s / "CB/val.jsonl"))[0][1] == "neutral"
  assert texts(read("rte", s / "RTE/val.jsonl"))[0][1] == "entailment"
  copa = read("copa", s / "COPA/val.jsonl")  # an example per choice, grouped by row
  assert texts(copa[:2]) == [
      (("My body cast a shadow over the grass.", "cause", "The sun was rising."), "True"),
      (("My body cast a shadow over the grass.", "cause", "The grass was cut."), "False")]
  assert [e.record["group"] for e in copa] == [0, 0, 1, 1]
  multirc = read("multirc", s / "MultiRC/val.jsonl")  # an example per answer option
  assert [(e.record["texts"][1:], e.label, e.record["group"]) for e in multirc] == [
      (("What colour is Tom's car?", "Red"), "True", "0/0"),
      (("What colour is Tom's car?", "Blue"), "False", "0/0"),
      (("Who has a car?", "Ann"), "False", "0/1")]
  record = read("record", s / "ReCoRD/val.jsonl")  # an example per entity of each query
  first = [e for e in record if e.record["group"] == (0, 0)]
  assert [(e.record["entity"], e.label) for e in first] == [
      ("Angela Merkel", "True"), ("Berlin", "False"), ("Merkel", "False"), ("Obama", "False")]
  assert first[0].record["texts"][1] == "Angela Merkel welcomed the president."
  assert first[0].record["answers"] == ("Angela Merkel",)


def test_pair_inputs_are_the_texts_joined_by_the_delimiter():
  """ids(text1) + ids("$") + ids(text2), each text tokenized on its own; too long: the first
  text's end is cut; still too long, or empty: refused, naming the row."""
  tok = _WordTokenizer()
  example = glue_finetune._example(
      tasks._Row({}, "f.tsv", 0), "mrpc", ["the cat sat", "a dog ran far"], "equivalent")
  classes = list(glue_finetune.TASKS["mrpc"].classes)
  encoded = glue_finetune.encode([example], tok, classes, max_length=64)
  [one, two], [delimiter] = tok.encode_batch(["the cat sat", "a dog ran far"]), tok.encode_batch(
      ["$"])
  assert encoded.ids == [one + delimiter + two] and len(delimiter) == 1
  assert list(encoded.labels) == [1]
  cut = glue_finetune.encode([example], tok, classes, max_length=6)
  assert cut.ids == [one[:1] + delimiter + two]
  with pytest.raises(finetune.FinetuneError,
                     match=r"^task file f\.tsv, row 1: the input is 8 tokens, longer than "
                           r"max_length=5"):
    glue_finetune.encode([example], tok, classes, max_length=5)
  # Three texts (WiC, MultiRC, COPA): two delimiters; the batch row reads the last token.
  three = glue_finetune._example(tasks._Row({}, "f", 1), "copa", ["p q", "cause", "r"], "True")
  split = glue_finetune.encode([three], tok, ["False", "True"], 64)
  ids = tok.encode_batch(["p q", "$", "cause", "$", "r"])
  assert split.ids == [ids[0] + ids[1] + ids[2] + ids[3] + ids[4]]
  batch = finetune.make_batch(split, [0], 2, 64, 0, "glue")
  assert int(batch["last_index"][0]) == 5 and list(batch["labels"]) == [1, 0]
  assert list(batch["row_weight"]) == [1.0, 0.0]


class _FixedLogits:
  """A stand-in model whose forward pass returns given outputs [batch, length, classes]."""

  def __init__(self, logits):
    self.logits = logits

  def apply(self, *args, **kwargs):
    return self.logits


def test_the_regression_loss_is_the_mean_squared_error():
  tok = _WordTokenizer()
  examples = [glue_finetune._example(tasks._Row({}, "s.tsv", i), "stsb", [a, b], "score",
                                     score=score)
              for i, (a, b, score) in enumerate([("a b", "c", 4.5), ("d", "e f g", 0.2),
                                                 ("h", "i", 3.0)])]
  split = glue_finetune.encode(examples, tok, ["score"], 64)
  assert split.labels.dtype == np.float32
  batch = finetune.make_batch(split, [0, 1, 2], 4, 64, 0, "glue")
  outputs = np.zeros(batch["inputs"].shape + (1,), np.float32)
  predicted = [1.0, 0.7, 3.5]
  for row, value in enumerate(predicted):
    outputs[row, batch["last_index"][row]] = value
  outputs[0, -1] = 100.0  # padding after the text: ignored
  model = _FixedLogits(jnp.asarray(outputs))
  device_batch = jax.tree.map(jnp.asarray, batch)
  objective, sums = loss_lib.regression_loss(model, None, device_batch, None)
  mse = np.mean((np.array(predicted) - np.array([4.5, 0.2, 3.0])) ** 2)
  assert float(sums["loss_sum"]) / float(sums["weight_sum"]) == pytest.approx(mse, rel=1e-6)
  assert float(sums["weight_sum"]) == 3.0 and float(objective) == float(sums["loss_sum"])
  config = config_lib.validate({"model": {"num_classes": 1},
                                "finetune": {"objective": "glue", "glue_task": "stsb"}})
  assert loss_lib.loss_for(config) is loss_lib.regression_loss
  _, glue_sums = glue_finetune.loss(config)(model, None, device_batch, None)
  assert float(glue_sums["loss_sum"]) == pytest.approx(float(sums["loss_sum"]))
  assert np.allclose(glue_sums["logits"][:3, 0], predicted)  # the per-row output


def _examples(task, labels, **records):
  """Examples of `task` with the given labels and per-example record fields."""
  rows = [dict(zip(records, values)) for values in zip(*records.values())] or [{}] * len(labels)
  return [glue_finetune._example(tasks._Row({}, "f", i), task, ["x"], label, **row)
          for i, (label, row) in enumerate(zip(labels, rows))]


def _glue_metric(task, metric, labels, predicted, groups):
  if metric == "em":
    return glue.exact_match_groups(groups, labels, predicted)
  if metric == "f1" and task == "cb":
    return glue.macro_f1(labels, predicted)
  return {"mcc": glue.mcc, "acc": glue.accuracy, "f1": glue.f1, "f1a": glue.f1}[metric](
      labels, predicted)


def test_metrics_at_evaluation_are_glue_py_s_on_the_predictions():
  rng = np.random.default_rng(0)
  cases = {"cola": ("mcc",), "mrpc": ("acc", "f1"), "cb": ("acc", "f1"), "multirc": ("f1a", "em")}
  for task, metric_names in cases.items():
    classes = glue_finetune.TASKS[task].classes
    labels = rng.integers(0, len(classes), 40)
    logits = rng.normal(size=(40, len(classes)))
    groups = {"group": [i // 3 for i in range(40)]} if task == "multirc" else {}
    examples = _examples(task, [classes[k] for k in labels], **groups)
    split = glue_finetune.encode(examples, _WordTokenizer(), list(classes), 64)
    result = glue_finetune.split_metrics("validation", split, {"logits": logits})
    predicted = logits.argmax(-1)
    expected = {m: _glue_metric(task, m, labels, predicted, groups.get("group"))
                for m in metric_names}
    assert result == pytest.approx(
        {**{f"validation_{m}": expected[m] for m in metric_names},
         "validation_score": np.mean([expected[m] for m in metric_names])}), task
    assert tuple(glue.BENCHMARKS["glue" if task in ("cola", "mrpc") else "superglue"][task][
        task]) == metric_names  # the benchmark's metrics, hence its score
  # STS-B: correlations of the output with the gold similarities.
  targets, outputs = rng.uniform(0, 5, 30), rng.normal(size=(30, 1))
  split = glue_finetune.encode(_examples("stsb", ["score"] * 30, score=targets),
                               _WordTokenizer(), ["score"], 64)
  result = glue_finetune.split_metrics("test", split, {"logits": outputs})
  assert result["test_pearson"] == pytest.approx(glue.pearson(targets, outputs[:, 0]))
  assert result["test_spearman"] == pytest.approx(glue.spearman(targets, outputs[:, 0]))
  # COPA and ReCoRD: per group, the candidate of the largest log-odds of True.
  copa = _examples("copa", ["True", "False", "False", "True"], group=[0, 0, 1, 1])
  split = glue_finetune.encode(copa, _WordTokenizer(), ["False", "True"], 64)
  logits = np.array([[0.0, 2.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])  # right, then wrong
  assert glue_finetune.split_metrics("v", split, {"logits": logits}) == {"v_acc": 0.5,
                                                                        "v_score": 0.5}
  record = _examples("record", ["True", "False", "False", "True"], group=[0, 0, 1, 1],
                     entity=["Angela Merkel", "Obama", "the Berlin", "Paris"],
                     answers=[("Angela Merkel",)] * 2 + [("Berlin", "Paris")] * 2)
  split = glue_finetune.encode(record, _WordTokenizer(), ["False", "True"], 64)
  result = glue_finetune.split_metrics("v", split, {"logits": logits})
  # group 0 picks "Angela Merkel" (f1 1, em 1); group 1 "the Berlin" (normalised: "berlin")
  assert result == {"v_f1": 1.0, "v_em": 1.0, "v_score": 1.0}


WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon"]


def same_word_task(path, count, seed):
  """MRPC's TSV layout: "equivalent" (1) when the two one-word sentences are the same word."""
  rng = random.Random(seed)
  rows = [["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]]
  for i in range(count):
    same = rng.random() < 0.5
    a = rng.choice(WORDS)
    b = a if same else rng.choice([w for w in WORDS if w != a])
    rows.append([int(same), i, i, a, b])
  return tsv(path, rows)


def similarity_task(path, count, seed):
  """STS-B's TSV layout: the similarity of word i and word j is 5 - |i - j|."""
  rng = random.Random(seed)
  rows = [["index", "sentence1", "sentence2", "score"]]
  for k in range(count):
    i, j = rng.randrange(len(WORDS)), rng.randrange(len(WORDS))
    rows.append([k, WORDS[i], WORDS[j], f"{5 - abs(i - j):.1f}"])
  return tsv(path, rows)


# Measured with these settings (400 training examples, 8 epochs of batch 16, learning rate
# 0.01), seeds 0, 1, 2: the same-word task's validation score 0.978, 0.962, 0.959; the
# similarity's validation Pearson 0.791, 0.870, 0.827.
LEARNING = {"train.global_batch_size": 16, "optim.learning_rate": 0.01, "finetune.epochs": 8}


def fine_tune(tiny_lm_run, root, task, write, seed=0):
  train = write(root / "train.tsv", 400, seed)
  dev = write(root / "dev.tsv", 100, seed + 100)
  prepared = finetune.prepare(tiny_lm_run, str(root / "run"), "glue", train,
                              {"finetune.glue_task": task, "seed": seed, **LEARNING},
                              validation_data=dev)
  return prepared, finetune.finetune(prepared, show_progress=False)


def test_a_pair_task_is_learned_and_scored_as_glue_py_scores_it(tiny_lm_run, tmp_path):
  prepared, summary = fine_tune(tiny_lm_run, tmp_path, "mrpc", same_word_task)
  assert summary["validation_score"] > 0.85 and summary["validation_acc"] > 0.85
  workdir = str(tmp_path / "run")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evaluations = [r for r in map(json.loads, f) if "validation_score" in r]
  assert len(evaluations) == 8 and all(
      r["validation_score"] == pytest.approx((r["validation_acc"] + r["validation_f1"]) / 2)
      for r in evaluations)
  assert summary["best_step"] == max(evaluations, key=lambda r: (r["validation_score"],
                                                                 -r["validation_loss"]))["step"]
  # The kept checkpoint's predictions, computed apart from training, give the summary's metrics.
  run = run_lib.open_run(workdir)
  assert run_lib.labels(workdir) == ["not_equivalent", "equivalent"]
  params = run_lib.restore_params(run, prepared.mesh)
  logits_of = steps_lib.make_eval_step(run.config.model, prepared.mesh, lambda m, p, b, r: (
      0.0, {"logits": loss_lib.class_logits(m, p, b)}))
  split = prepared.splits["validation"]
  logits = np.concatenate([
      jax.device_get(logits_of(params, sharding.global_batch(batch, prepared.mesh)))["logits"]
      for batch in finetune.batches(split, 16, 64, run.tokenizer.pad_id, "glue")])
  predicted = logits[:len(split.ids)].argmax(-1)
  assert summary["validation_acc"] == pytest.approx(glue.accuracy(split.labels, predicted))
  assert summary["validation_f1"] == pytest.approx(glue.f1(split.labels, predicted))


def test_sts_b_regression_learns_a_similarity(tiny_lm_run, tmp_path):
  prepared, summary = fine_tune(tiny_lm_run, tmp_path, "stsb", similarity_task)
  assert prepared.config.model.num_classes == 1
  assert summary["validation_pearson"] > 0.6 and summary["validation_spearman"] > 0.6
  assert summary["validation_score"] == pytest.approx(
      (summary["validation_pearson"] + summary["validation_spearman"]) / 2)


def test_bad_input_is_one_line_naming_file_and_row_before_anything_is_written(tiny_lm_run,
                                                                              tmp_path):
  good = same_word_task(tmp_path / "good.tsv", 8, 0)
  header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
  bad_label = tmp_path / "label.tsv"
  bad_label.write_text(header + "1\t1\t1\ta\tb\n7\t2\t2\tc\td\n")
  no_field = tmp_path / "field.jsonl"
  no_field.write_text('{"premise": "p", "label": "entailment"}\n')
  workdir = tmp_path / "w"
  cases = [
      ({"finetune.glue_task": "mrcp"}, good, good,
       r"finetune\.glue_task='mrcp' \(--task\): no such GLUE or SuperGLUE task; choose one of "
       r"cola, sst2, mrpc"),
      ({}, good, good, r"needs its task: --task=NAME"),
      ({"finetune.glue_task": "mrpc"}, good, str(bad_label),
       r"task file .*label\.tsv, row 2: label '7' is not one of not_equivalent, equivalent"),
      ({"finetune.glue_task": "cb"}, str(no_field), good,
       r"task file .*field\.jsonl, row 1: no field 'hypothesis'"),
      ({"finetune.glue_task": "mrpc"}, good, "",
       r"pass --data=TRAIN_FILE --validation_data=DEV_FILE"),
  ]
  for overrides, data, validation, message in cases:
    with pytest.raises((finetune.FinetuneError, tasks.TaskError), match=message) as error:
      finetune.prepare(tiny_lm_run, str(workdir), "glue", str(data), overrides,
                       validation_data=str(validation) if validation else "")
    assert "\n" not in str(error.value)
    assert not workdir.exists()
  with pytest.raises(finetune.FinetuneError, match=r"finetune\.glue_task is for GLUE"):
    finetune.prepare(tiny_lm_run, str(workdir), "classifier", good,
                     {"finetune.glue_task": "mrpc"})
  with pytest.raises(tasks.TaskError, match=r"TFDS dataset glue/mrpc has no split 'dev'"):
    read("mrpc", "tfds:glue/mrpc:dev@/nowhere")
  assert not workdir.exists()
