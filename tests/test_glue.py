"""jaxlm.glue: GLUE and SuperGLUE read from their published files and TFDS layouts, prompted as
lm-evaluation-harness prompts them, scored with the official metrics, averaged as the papers do."""

import ast
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm import glue, sharding, tasks
from jaxlm import run as run_lib
from tests.conftest import REPO


def write(path, lines, prefix=""):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(prefix + "\n".join(lines) + "\n")
  return str(path)


def tsv(path, rows, prefix=""):
  return write(path, ["\t".join(map(str, row)) for row in rows], prefix)


def jsonl(path, records):
  return write(path, [json.dumps(r) for r in records])


# -- The published files (a few rows each, in their layout) -------------------------------------

QUOTED = 'He said "hi to them.'  # an unbalanced quote: read as text, or it would swallow rows
MNLI_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
               "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
               "sentence2", "label1", "label2", "label3", "label4", "label5", "gold_label"]


def mnli_row(index, premise, hypothesis, gold):
  return [index, 1, f"{index}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", premise,
          hypothesis, gold, gold, gold, gold, gold, gold]


def glue_dir(root):
  """GLUE's dev files as its download script lays them out (CoLA headerless, MRPC with the
  byte-order mark its source file carries)."""
  tsv(root / "CoLA/dev.tsv", [["gj04", 1, "", "The sailors rode the breeze clear."],
                              ["gj04", 0, "*", QUOTED], ["cj99", 1, "", "Bill left."]])
  tsv(root / "SST-2/dev.tsv", [["sentence", "label"], ['a "charming film', 1], ["dull", 0]])
  tsv(root / "MRPC/dev.tsv", [["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                              [1, 11, 12, QUOTED, "He greeted them."],
                              [0, 13, 14, "Stocks fell.", "It rained."]], prefix="\ufeff")
  tsv(root / "QQP/dev.tsv", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                             [1, 2, 3, "How do I cook rice?", "How is rice cooked?", 1],
                             [2, 4, 5, "Why is the sky blue?", "What is 2+2?", 0]])
  tsv(root / "STS-B/dev.tsv", [["index", "genre", "filename", "year", "old_index", "source1",
                                "source2", "sentence1", "sentence2", "score"],
                               [0, "main-captions", "MSRvid", "2012test", 1, "none", "none",
                                "A man plays.", "A man is playing.", 5.0],
                               [1, "main-captions", "MSRvid", "2012test", 2, "none", "none",
                                "A cat eats.", "A plane lands.", 0.4]])
  tsv(root / "MNLI/dev_matched.tsv", [MNLI_HEADER, mnli_row(0, "A man sleeps.", "Nobody sleeps",
                                                             "contradiction"),
                                      mnli_row(1, "Kids play.", "Kids are playing.",
                                               "entailment")])
  tsv(root / "MNLI/dev_mismatched.tsv", [MNLI_HEADER, mnli_row(0, "It is red.", "It is a car.",
                                                               "neutral")])
  tsv(root / "QNLI/dev.tsv", [["index", "question", "sentence", "label"],
                              [0, "Who wrote Hamlet?", "Shakespeare wrote Hamlet.", "entailment"],
                              [1, "Who wrote Hamlet?", "It rained.", "not_entailment"]])
  tsv(root / "RTE/dev.tsv", [["index", "sentence1", "sentence2", "label"],
                             [0, "Paris is in France.", "Paris is French.", "entailment"]])
  tsv(root / "WNLI/dev.tsv", [["index", "sentence1", "sentence2", "label"],
                              [0, "The cup fell; it broke.", "The cup broke.", 1],
                              [1, "The cup fell; it broke.", "The floor broke.", 0]])
  return root


RECORD_TEXT = ("Angela Merkel met Obama in Berlin.\n@highlight\nMerkel hosts Obama\n@highlight\n"
               "Talks in Berlin")


def record_record():
  spans = [(RECORD_TEXT.index(e), RECORD_TEXT.index(e) + len(e) - 1)
           for e in ("Angela Merkel", "Obama", "Berlin", "Merkel")]
  spans.append((RECORD_TEXT.rindex("Obama"), RECORD_TEXT.rindex("Obama") + 4))  # (a repeat)
  return {"source": "Daily mail", "idx": 0, "passage": {
      "text": RECORD_TEXT, "entities": [{"start": s, "end": e} for s, e in spans]},
      "qas": [{"idx": 0, "query": "@placeholder welcomed the president.",
               "answers": [{"start": 0, "end": 12, "text": "Angela Merkel"},
                           {"start": 0, "end": 12, "text": "Angela Merkel"}]},
              {"idx": 1, "query": "The talks were held in @placeholder.",
               "answers": [{"start": 28, "end": 33, "text": "Berlin"}]}]}


MULTIRC = {"idx": 0, "version": 1.1, "passage": {"text": "Sent 1: Tom has a red car.",
                                                  "questions": [
    {"question": "What colour is Tom's car?", "idx": 0, "answers": [
        {"text": "Red", "idx": 0, "label": 1}, {"text": "Blue", "idx": 1, "label": 0}]},
    {"question": "Who has a car?", "idx": 1, "answers": [{"text": "Ann", "idx": 2, "label": 0}]}]}}
WSC = [{"text": "Mark told Pete many lies about himself, which Pete included in his book. He "
                "should have been more skeptical.", "idx": 0, "label": False,
        "target": {"span1_index": 0, "span1_text": "Mark", "span2_index": 13,
                   "span2_text": "He"}},
       # span1 as the published file has it ("The table.", not in the text): wsc.fixed fixes it
       {"text": "the table won't fit through the doorway because it is too wide .", "idx": 1,
        "label": True, "target": {"span1_index": 0, "span1_text": "The table.",
                                  "span2_index": 8, "span2_text": "it"}}]


def superglue_dir(root):
  """SuperGLUE's val.jsonl files as its download lays them out."""
  jsonl(root / "BoolQ/val.jsonl", [{"question": "is it red", "passage": "It is red.", "idx": 0,
                                    "label": True}])
  jsonl(root / "CB/val.jsonl", [{"premise": "It may rain.", "hypothesis": "it will rain",
                                 "label": "neutral", "idx": 0},
                                {"premise": "It rains.", "hypothesis": "it rains",
                                 "label": "entailment", "idx": 1}])
  jsonl(root / "COPA/val.jsonl", [
      {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
       "choice2": "The grass was cut.", "question": "cause", "idx": 0, "label": 0},
      {"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
       "choice2": "He got a hole in his sock.", "question": "effect", "idx": 1, "label": 0}])
  jsonl(root / "MultiRC/val.jsonl", [MULTIRC])
  jsonl(root / "ReCoRD/val.jsonl", [record_record()])
  jsonl(root / "RTE/val.jsonl", [{"premise": "Paris is in France.", "hypothesis": "Paris is "
                                  "French.", "label": "entailment", "idx": 0}])
  jsonl(root / "WiC/val.jsonl", [
      {"word": "place", "sentence1": "Do you want to come over to my place later?",
       "sentence2": "A political system with no place for the less prominent groups.",
       "idx": 0, "label": False, "start1": 31, "start2": 27, "end1": 36, "end2": 32,
       "version": 1.1}])
  jsonl(root / "WSC/val.jsonl", WSC)
  return root


def items(name, path):
  return tasks.load_task(name, str(path)).items


# -- (a) readers --------------------------------------------------------------------------------

def test_glue_tsv_files_are_read_as_published(tmp_path):
  root = glue_dir(tmp_path)
  cola = items("cola", root / "CoLA/dev.tsv")  # (no header row: the first row is an example)
  assert [i.label for i in cola] == [1, 0, 1] and cola[1].contexts[0].startswith(QUOTED + "\n")
  assert cola[0].choices == (" no", " yes")
  assert [i.label for i in items("sst2", root / "SST-2/dev.tsv")] == [1, 0]
  mrpc = items("mrpc", root / "MRPC/dev.tsv")  # (the byte-order mark is not in "Quality")
  assert [i.label for i in mrpc] == [1, 0] and f"Sentence 1: {QUOTED}\n" in mrpc[0].contexts[0]
  assert [i.label for i in items("qqp", root / "QQP/dev.tsv")] == [1, 0]
  stsb = items("stsb", root / "STS-B/dev.tsv")
  assert [(i.target, i.label) for i in stsb] == [(5.0, 5), (0.4, 0)]
  assert stsb[0].choices == (" 0", " 1", " 2", " 3", " 4", " 5")
  mnli = items("mnli", root / "MNLI/dev_matched.tsv")
  assert [i.label for i in mnli] == [2, 0] and mnli[0].choices == (" True", " Neither", " False")
  assert mnli[0].contexts[0] == ("A man sleeps.\nQuestion: Nobody sleeps. True, False or "
                                 "Neither?\nAnswer:")
  assert items("mnli_mismatched", root / "MNLI/dev_mismatched.tsv")[0].label == 1
  assert [i.label for i in items("qnli", root / "QNLI/dev.tsv")] == [0, 1]
  assert items("rte", root / "RTE/dev.tsv")[0].label == 0
  assert [i.label for i in items("wnli", root / "WNLI/dev.tsv")] == [1, 0]


def test_superglue_jsonl_files_are_read_as_published(tmp_path):
  root = superglue_dir(tmp_path)
  assert items("boolq", root / "BoolQ/val.jsonl")[0].label == 1
  assert [i.label for i in items("cb", root / "CB/val.jsonl")] == [2, 0]
  copa = items("copa", root / "COPA/val.jsonl")
  assert copa[0].contexts[0] == "My body cast a shadow over the grass because"
  assert copa[1].contexts[0] == "The man broke his toe therefore"
  assert copa[0].choices == (" the sun was rising.", " the grass was cut.")
  multirc = items("multirc", root / "MultiRC/val.jsonl")  # an item per answer option
  assert [(i.label, i.group) for i in multirc] == [(1, "0/0"), (0, "0/0"), (0, "0/1")]
  assert multirc[0].choices == (" Red\nIs the answer correct? no",
                                " Red\nIs the answer correct? yes")
  record = items("record", root / "ReCoRD/val.jsonl")  # an item per query
  assert record[0].contexts[0] == ("Angela Merkel met Obama in Berlin.\n\n  - Merkel hosts "
                                   "Obama.\n  - Talks in Berlin.\n")
  assert record[0].entities == ("Angela Merkel", "Berlin", "Merkel", "Obama")  # distinct, sorted
  assert record[0].choices[0] == "   - Angela Merkel welcomed the president."
  assert (record[0].answers, record[0].label) == (("Angela Merkel",), 0)
  assert (record[1].answers, record[1].label) == (("Berlin",), 1)
  assert items("wic", root / "WiC/val.jsonl")[0].contexts[0].count("the word 'place'") == 1
  wsc = items("wsc", root / "WSC/val.jsonl")
  assert [i.label for i in wsc] == [0, 1]
  # Few-shot: the demonstration is another example solved; the item keeps its metric fields.
  [first, second] = tasks.load_task("record", str(root / "ReCoRD/val.jsonl"),
                                    num_fewshot=1).items
  assert first.contexts[0] == (record[1].contexts[0] + record[1].choices[1] + "\n\n" +
                               record[0].contexts[0])
  assert (first.entities, first.answers) == (record[0].entities, record[0].answers)
  assert wsc[1].contexts[0] == ("Passage: the table won't fit through the doorway because *it* "
                                "is too wide.\nQuestion: In the passage above, does the pronoun "
                                "\"*it*\" refer to \"*the table*\"?\nAnswer:")


def harness_prompts():
  """lm-evaluation-harness 0.4's GLUE/SuperGLUE task YAMLs ({task: (doc_to_text, choices)}) and
  its prompt functions, read from the installed package (a test extra)."""
  pytest.importorskip("lm_eval")
  import jinja2
  import lm_eval
  import yaml

  class Loader(yaml.SafeLoader):
    pass
  Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
  root = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
  out = {}
  for name in ("glue/cola", "glue/mrpc", "glue/qqp", "glue/qnli", "glue/wnli", "glue/mnli",
               "super_glue/cb", "super_glue/wic", "super_glue/multirc"):
    with open(os.path.join(root, name, "default.yaml")) as f:
      config = yaml.load(f, Loader)
    out[name.split("/")[1]] = (jinja2.Template(config["doc_to_text"]), config["doc_to_choice"])
  return out


def test_prompts_are_the_harness_prompts(tmp_path):
  """Each task's context and choices equal the harness's rendering of the same example."""
  pytest.importorskip("lm_eval")
  import jinja2
  from lm_eval.tasks.glue.mnli import utils as mnli_utils
  from lm_eval.tasks.super_glue.copa import utils as copa_utils
  from lm_eval.tasks.super_glue.wsc import preprocess_wsc
  prompts = harness_prompts()
  glue_root, superglue_root = glue_dir(tmp_path / "glue"), superglue_dir(tmp_path / "superglue")
  docs = {  # the first example of each file, in the Hugging Face layout the harness reads
      "cola": ("CoLA/dev.tsv", {"sentence": "The sailors rode the breeze clear."}),
      "mrpc": ("MRPC/dev.tsv", {"sentence1": QUOTED, "sentence2": "He greeted them."}),
      "qqp": ("QQP/dev.tsv", {"question1": "How do I cook rice?",
                              "question2": "How is rice cooked?"}),
      "qnli": ("QNLI/dev.tsv", {"question": "Who wrote Hamlet?",
                                "sentence": "Shakespeare wrote Hamlet."}),
      "wnli": ("WNLI/dev.tsv", {"sentence1": "The cup fell; it broke.",
                                "sentence2": "The cup broke."}),
      "cb": ("CB/val.jsonl", {"premise": "It may rain.", "hypothesis": "it will rain"}),
      "wic": ("WiC/val.jsonl", {"sentence1": "Do you want to come over to my place later?",
                                "sentence2": "A political system with no place for the less "
                                             "prominent groups.", "start1": 31, "end1": 36})}
  for name, (file, doc) in docs.items():
    root = glue_root if name in glue.GLUE_FILES else superglue_root
    item = items(name, root / file)[0]
    template, choices = prompts[name]
    assert item.contexts[0] == template.render(**doc), name
    assert item.choices == tuple(" " + c for c in choices), name
  mnli = items("mnli", glue_root / "MNLI/dev_matched.tsv")[0]
  assert mnli.contexts[0] == mnli_utils.doc_to_text({"premise": "A man sleeps.",
                                                     "hypothesis": "Nobody sleeps"})
  assert mnli.choices == tuple(" " + c for c in prompts["mnli"][1])
  copa_doc = {"premise": "My body cast a shadow over the grass.", "question": "cause",
              "choice1": "The sun was rising.", "choice2": "The grass was cut.", "label": 0}
  copa = items("copa", superglue_root / "COPA/val.jsonl")[0]
  assert copa.contexts[0] == copa_utils.doc_to_text(copa_doc)
  assert list(copa.choices) == copa_utils.doc_to_choice(copa_doc)
  multirc = items("multirc", superglue_root / "MultiRC/val.jsonl")[0]
  doc = {"paragraph": MULTIRC["passage"]["text"], "question": "What colour is Tom's car?",
         "answer": "Red"}
  template, choices = prompts["multirc"]
  assert multirc.contexts[0] == template.render(**doc)
  # The same wording; the harness's list puts "yes" first: here a right answer (label 1) is yes.
  harness_choices = ast.literal_eval(jinja2.Template(choices).render(**doc))
  assert multirc.choices == (" " + harness_choices[1], " " + harness_choices[0])
  for record, item in zip(WSC, items("wsc", superglue_root / "WSC/val.jsonl")):
    fixed = dict(record["target"], text=record["text"])  # TFDS's wsc.fixed of the record
    fixed["span1_text"] = fixed["span1_text"].rstrip(".").replace("The", "the")
    assert item.contexts[0] == preprocess_wsc.default_doc_to_text(fixed)


def test_tfds_layouts_give_the_items_of_the_published_files(tmp_path):
  """glue/cola, super_glue/multirc and super_glue/record prepared with the catalog's features
  (tensorflow_datasets' glue and super_glue builders) hold the same examples as the files."""
  import tensorflow_datasets as tfds

  from tests.test_tasks import prepare_tfds
  text, label = tfds.features.Text(), tfds.features.ClassLabel
  prepare_tfds(tmp_path, "glue/cola", "validation", {
      "sentence": text, "label": label(names=["unacceptable", "acceptable"]), "idx": np.int32},
      [{"sentence": "Bill left.", "label": 1, "idx": 0}, {"sentence": QUOTED, "label": 0,
                                                          "idx": 1}])
  prepare_tfds(tmp_path, "super_glue/multirc", "validation", {
      "paragraph": text, "question": text, "answer": text, "label": label(names=["False", "True"]),
      "idx": {"paragraph": np.int32, "question": np.int32, "answer": np.int32}}, [
          {"paragraph": MULTIRC["passage"]["text"], "question": q["question"],
           "answer": a["text"], "label": a["label"],
           "idx": {"paragraph": 0, "question": q["idx"], "answer": a["idx"]}}
          for q in MULTIRC["passage"]["questions"] for a in q["answers"]])
  record = record_record()
  prepare_tfds(tmp_path, "super_glue/record", "validation", {
      "passage": text, "query": text, "entities": tfds.features.Sequence(text),
      "answers": tfds.features.Sequence(text), "idx": {"passage": np.int32, "query": np.int32}},
      [{"passage": RECORD_TEXT, "query": qa["query"],
        "entities": ["Angela Merkel", "Berlin", "Merkel", "Obama"],
        "answers": sorted({a["text"] for a in qa["answers"]}), "idx": {"passage": 0,
                                                                         "query": qa["idx"]}}
       for qa in record["qas"]])
  cola = tsv(tmp_path / "cola.tsv", [["x", 1, "", "Bill left."], ["x", 0, "*", QUOTED]])
  multirc = jsonl(tmp_path / "multirc.jsonl", [MULTIRC])
  published = {"cola": cola, "multirc": multirc,
               "record": jsonl(tmp_path / "record.jsonl", [record])}
  key = lambda item: repr(item)  # (TFDS keeps a split's examples in its own shuffled order)
  for task in tasks.load_tasks("cola:tfds,multirc:tfds,record:tfds", data_dir=str(tmp_path)):
    assert sorted(task.items, key=key) == sorted(items(task.name, published[task.name]),
                                                 key=key), task.name
  # The group finds the prepared datasets and no others.
  members = tasks.parse_specs("superglue:tfds", str(tmp_path))
  assert members == [("multirc", f"tfds:super_glue/multirc:validation@{tmp_path / 'tfds'}"),
                     ("record", f"tfds:super_glue/record:validation@{tmp_path / 'tfds'}")]
  with pytest.raises(tasks.TaskError, match=r"^TFDS dataset glue/cola has no split 'dev'; one of "
                     r"train, validation, test \(tasks score the validation split"):
    tasks.load_tasks("cola:tfds:glue/cola:dev", data_dir=str(tmp_path))


# -- (b) metrics ---------------------------------------------------------------------------------

def test_metrics_equal_sklearn_and_scipy():
  from scipy import stats
  from sklearn import metrics
  labels = np.array([0, 1, 1, 0, 1, 2, 2, 0])
  predicted = np.array([0, 1, 0, 0, 2, 2, 1, 1])
  binary_labels, binary_predicted = labels.clip(0, 1), predicted.clip(0, 1)
  assert glue.accuracy(labels, predicted) == metrics.accuracy_score(labels, predicted) == 0.5
  assert glue.mcc(binary_labels, binary_predicted) == pytest.approx(
      metrics.matthews_corrcoef(binary_labels, binary_predicted), abs=0)
  assert glue.f1(binary_labels, binary_predicted) == metrics.f1_score(binary_labels,
                                                                      binary_predicted)
  assert glue.macro_f1(labels, predicted) == pytest.approx(
      np.mean([metrics.f1_score(labels == k, predicted == k) for k in range(3)]))  # harness's CB
  targets, rated = [0.0, 1.5, 2.0, 4.8, 3.3], [0.2, 1.0, 2.5, 3.9, 4.1]
  assert glue.pearson(targets, rated) == stats.pearsonr(targets, rated).statistic
  assert glue.spearman(targets, rated) == stats.spearmanr(targets, rated).statistic
  assert glue.spearman(targets, rated) == pytest.approx(0.9)  # (one swapped pair of five)
  assert math.isnan(glue.pearson(targets, [1.0] * 5)) and math.isnan(glue.spearman([1.0], [2.0]))
  # CoLA's degenerate case: a constant prediction has MCC 0 (sklearn's convention).
  assert glue.mcc([0, 1, 1], [1, 1, 1]) == 0.0


def test_multirc_and_record_metrics_by_hand():
  # MultiRC's EM: question a has both options right, b one of two, c its only one.
  assert glue.exact_match_groups(["a", "a", "b", "b", "c"], [1, 0, 1, 0, 1],
                                 [1, 0, 1, 1, 1]) == pytest.approx(2 / 3)
  # SQuAD's normalisation: case, punctuation, articles, spaces.
  assert glue.normalize_answer("  The  U.S. Army's  band!") == "us armys band"
  assert glue.exact_match("the Obama", "Obama.") == 1.0
  assert glue.token_f1("Angela Merkel", "Merkel") == pytest.approx(2 * 0.5 * 1 / 1.5)
  assert glue.token_f1("the", "a") == 1.0 and glue.token_f1("the", "Obama") == 0.0
  assert glue.token_f1("Berlin Berlin wall", "Berlin wall") == pytest.approx(0.8)
  # ReCoRD: the best over the gold answers.
  assert glue.best_over_answers(glue.token_f1, "Merkel", ["Obama", "Angela Merkel"]) == \
      pytest.approx(2 / 3)
  assert glue.best_over_answers(glue.exact_match, "Merkel", ["Angela Merkel", "merkel"]) == 1.0


# -- (c) the benchmark averages -------------------------------------------------------------------

def test_benchmark_scores_average_each_tasks_metrics_then_the_tasks():
  results = [{"task": "cola", "mcc": 0.2}, {"task": "sst2", "acc": 0.9, "acc_norm": 0.1},
             {"task": "mrpc", "acc": 0.7, "f1": 0.8}, {"task": "qqp", "acc": 0.6, "f1": 0.5},
             {"task": "stsb", "pearson": 0.3, "spearman": 0.5},
             {"task": "mnli", "acc": 0.4}, {"task": "mnli_mismatched", "acc": 0.5},
             {"task": "qnli", "acc": 0.55}, {"task": "rte", "acc": 0.6},
             {"task": "wnli", "acc": 0.45}, {"task": "hellaswag", "acc": 1.0}]
  summary = glue.benchmark_summary("glue", results)
  want = {"cola": 0.2, "sst2": 0.9, "mrpc": 0.75, "stsb": 0.4, "qqp": 0.55, "mnli": 0.45,
          "qnli": 0.55, "rte": 0.6, "wnli": 0.45}
  assert summary["task_scores"] == pytest.approx(want) and summary["missing"] == []
  assert summary["score"] == pytest.approx(sum(want.values()) / 9)
  # Missing tasks are named and not counted (MNLI counts with one of its two parts).
  partial = glue.benchmark_summary("glue", [r for r in results if r["task"] not in
                                            ("wnli", "mnli_mismatched", "qqp")])
  assert partial["missing"] == ["qqp", "mnli_mismatched", "wnli"]
  assert partial["tasks_scored"] == 7 and partial["task_scores"]["mnli"] == 0.4
  assert partial["score"] == pytest.approx((sum(want.values()) - 0.55 - 0.45 - 0.45 + 0.4) / 7)
  superglue = [{"task": "boolq", "acc": 0.6}, {"task": "cb", "acc": 0.5, "f1": 0.3},
               {"task": "copa", "acc": 0.7}, {"task": "multirc", "f1a": 0.5, "em": 0.1,
                                              "acc": 0.9},
               {"task": "record", "f1": 0.8, "em": 0.7}, {"task": "rte", "acc": 0.6},
               {"task": "wic", "acc": 0.5}, {"task": "wsc", "acc": 0.4}]
  summary = glue.benchmark_summary("superglue", superglue)
  assert summary["score"] == pytest.approx((0.6 + 0.4 + 0.7 + 0.3 + 0.75 + 0.6 + 0.5 + 0.4) / 8)
  assert tasks.score_groups("cola:x,superglue:y", superglue) == [{"group": "superglue",
                                                                   **summary}]


def test_groups_expand_to_the_files_found(tmp_path):
  root = glue_dir(tmp_path / "glue")
  os.remove(root / "WNLI/dev.tsv")
  specs = tasks.parse_specs(f"glue:{root}")
  assert [name for name, _ in specs] == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli",
                                         "mnli_mismatched", "qnli", "rte"]
  assert dict(specs)["mnli_mismatched"] == str(root / "MNLI/dev_mismatched.tsv")
  # A task named on its own replaces the group's file; GLUE's RTE serves SuperGLUE's too.
  other = tsv(tmp_path / "cola.tsv", [["x", 1, "", "Fine."]])
  superglue = superglue_dir(tmp_path / "superglue")
  specs = dict(tasks.parse_specs(f"glue:{root},cola:{other},superglue:{superglue}"))
  assert specs["cola"] == other and specs["rte"] == str(root / "RTE/dev.tsv")
  assert specs["record"] == str(superglue / "ReCoRD/val.jsonl") and len(specs) == 16
  for spec, message in [
      (f"glue:{tmp_path}/none", r"write glue:DIR \(the folder holding"),
      (f"superglue:{root}", r"^task superglue:.*: none of its files \(BoolQ/val.jsonl, "),
      ("glue:tfds", r"reads TFDS datasets from data.data_dir"),
      (f"glue:{root},glue:{root}", "task glue is given twice")]:
    with pytest.raises(tasks.TaskError, match=message):
      tasks.parse_specs(spec)


# -- (d) scoring ---------------------------------------------------------------------------------

def prefer(monkeypatch, likes):
  """A model whose log-likelihood is 0 for the (context, continuation) pairs it `likes`, -5 for
  the others (in place of the scorer's forward pass)."""
  def loglikelihoods(scorer, pairs):
    return np.array([0.0 if likes(c, x) else -5.0 for c, x in pairs]), None
  monkeypatch.setattr(tasks, "loglikelihoods", loglikelihoods)


def test_predictions_drive_the_metrics(tmp_path, monkeypatch):
  cola = tsv(tmp_path / "cola.tsv", [["s", 1, "", "good a"], ["s", 0, "*", "bad b"],
                                     ["s", 1, "", "good c"], ["s", 0, "*", "bad d"]])
  score = lambda name, path: tasks.TASKS[name].score(None, items(name, path))
  prefer(monkeypatch, lambda c, x: x == (" yes" if c.startswith("good") else " no"))
  assert score("cola", cola)["mcc"] == 1.0
  prefer(monkeypatch, lambda c, x: x == (" no" if c.startswith("good") else " yes"))
  assert score("cola", cola)["mcc"] == -1.0
  prefer(monkeypatch, lambda c, x: x == " yes")
  assert score("cola", cola)["mcc"] == 0.0
  mrpc = tsv(tmp_path / "mrpc.tsv", [["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                                     [1, 1, 2, "same", "x"], [0, 3, 4, "differ", "y"],
                                     [0, 5, 6, "differ", "z"]])
  prefer(monkeypatch, lambda c, x: x == (" yes" if "1: same" in c else " no"))
  assert score("mrpc", mrpc) == {"acc": 1.0, "acc_stderr": 0.0, "f1": 1.0, "examples": 3}
  prefer(monkeypatch, lambda c, x: x == " yes")
  result = score("mrpc", mrpc)
  assert result["acc"] == pytest.approx(1 / 3) and result["f1"] == pytest.approx(0.5)
  # STS-B: the expected rating under log-likelihoods -(k - gold)^2 follows the gold order.
  stsb = tsv(tmp_path / "stsb.tsv", [["sentence1", "sentence2", "score"]] +
             [[f"gold {g}", "x", g] for g in (0.5, 4.0, 2.2, 3.1)])
  monkeypatch.setattr(tasks, "loglikelihoods", lambda scorer, pairs: (np.array(
      [-(int(x) - float(re.search(r"gold ([\d.]+)", c)[1])) ** 2 for c, x in pairs]), None))
  result = score("stsb", stsb)
  assert result["spearman"] == 1.0 and result["pearson"] > 0.99
  ll = -(np.arange(6) - 0.5) ** 2
  assert glue.expected_ratings(None, items("stsb", stsb)[:1])[0] == pytest.approx(
      np.dot(np.exp(ll) / np.exp(ll).sum(), np.arange(6)))
  # MultiRC: every option right; then " yes" everywhere (labels 1, 0, 0).
  multirc = jsonl(tmp_path / "multirc.jsonl", [MULTIRC])
  prefer(monkeypatch, lambda c, x: x.endswith("yes") == (" Red\n" in x))
  result = score("multirc", multirc)
  assert (result["f1a"], result["em"], result["acc"]) == (1.0, 1.0, 1.0)
  prefer(monkeypatch, lambda c, x: x.endswith("yes"))
  result = score("multirc", multirc)
  assert result["f1a"] == pytest.approx(0.5) and result["em"] == 0.0
  assert result["acc"] == pytest.approx(1 / 3)
  # ReCoRD: the gold entity; then "Merkel" for "Angela Merkel" (F1 2/3) and "Obama" (0).
  record = jsonl(tmp_path / "record.jsonl", [record_record()])
  prefer(monkeypatch, lambda c, x: "Angela Merkel welcomed" in x or " in Berlin." in x)
  assert {k: score("record", record)[k] for k in ("f1", "em")} == {"f1": 1.0, "em": 1.0}
  prefer(monkeypatch, lambda c, x: "- Merkel welcomed" in x or " in Obama." in x)
  result = score("record", record)
  assert result["f1"] == pytest.approx((2 / 3 + 0) / 2) and result["em"] == 0.0


@pytest.fixture(scope="module")
def scorer(tiny_lm_run):
  run = run_lib.open_run(tiny_lm_run)
  mesh = sharding.make_mesh(run.config.mesh, jax.devices()[:1])
  return tasks.Scorer(run.config, run_lib.restore_params(run, mesh), run.tokenizer, mesh)


def test_a_tiny_model_scores_glue_and_superglue_tasks_end_to_end(scorer, tmp_path):
  """Through the real Scorer: each metric is the metric of the model's own predictions (the
  argmax of its per-choice log-likelihoods, recomputed here), and the group averages them."""
  root = glue_dir(tmp_path / "glue")
  for name in ("SST-2", "MRPC", "QQP", "MNLI", "QNLI", "RTE", "WNLI"):
    os.rename(root / name, tmp_path / name)  # (keeps it cheap: CoLA and STS-B)
  loaded = tasks.load_tasks(f"glue:{root},cb:{superglue_dir(tmp_path / 'sg') / 'CB/val.jsonl'}")
  results = [tasks.score_task(task, scorer) for task in loaded]
  assert [r["task"] for r in results] == ["cola", "stsb", "cb"]
  for task, result in zip(loaded, results):
    ll = tasks.choice_loglikelihoods(scorer, task.items)
    predicted, labels = [int(np.argmax(x)) for x in ll], [i.label for i in task.items]
    if task.name == "cola":
      assert result["mcc"] == glue.mcc(labels, predicted) and result["examples"] == 3
    elif task.name == "cb":
      assert result["acc"] == glue.accuracy(labels, predicted)
      assert result["f1"] == glue.macro_f1(labels, predicted)
    else:  # stsb: 2 pairs correlate perfectly, one way or the other
      rated = [np.dot(np.exp(x) / np.exp(x).sum(), np.arange(6)) for x in ll]
      assert result["pearson"] == pytest.approx(np.sign(rated[0] - rated[1]))
  [summary] = tasks.score_groups(f"glue:{root}", results)
  assert summary["tasks_scored"] == 2 and len(summary["missing"]) == 8
  assert summary["score"] == pytest.approx(
      (results[0]["mcc"] + (results[1]["pearson"] + results[1]["spearman"]) / 2) / 2)


# -- (e) bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, file, rows, message", [
    ("mnli", "dev_matched.tsv", [MNLI_HEADER, mnli_row(0, "a", "b", "entailment"),
                                 mnli_row(1, "a", "b", "maybe")],
     r"dev_matched\.tsv, row 2: label 'maybe' is not one of entailment, neutral, contradiction "
     r"\(or 0-2\); fix the row or pass the task's dev/validation file\.$"),
    ("qnli", "dev.tsv", [["index", "sentence", "label"], [0, "s", "entailment"]],
     r"dev\.tsv, row 1: no field 'question'; its fields are \['index', 'label', 'sentence'\]"),
    ("cola", "dev.tsv", [["index", "sentence"], [0, "A test sentence."]],
     r"dev\.tsv, row 1: 2 columns; CoLA's TSV has 4 .* and no header row"),
    ("stsb", "dev.tsv", [["sentence1", "sentence2", "score"], ["a", "b", 7]],
     r"row 1: score '7' is not a similarity from 0 to 5"),
    ("mrpc", "test.tsv", [["Quality", "#1 String", "#2 String"], [-1, "a", "b"]],
     r"row 1: label '-1' .* \(-1: an example of a test split, whose labels are hidden"),
])
def test_bad_glue_files_are_one_line_naming_file_and_row(tmp_path, name, file, rows, message):
  path = tsv(tmp_path / file, rows)
  with pytest.raises(tasks.TaskError, match=message) as error:
    tasks.load_tasks(f"{name}:{path}")
  assert str(error.value).startswith(f"task file {path}, row ") and "\n" not in str(error.value)


def test_bad_superglue_files_and_specs(tmp_path):
  for name, record, message in [
      ("cb", {"premise": "p", "hypothesis": "h", "label": "unsure"},
       r"row 1: label 'unsure' is not one of entailment, contradiction, neutral"),
      ("copa", {"premise": "p.", "choice1": "a", "choice2": "b", "question": "why", "label": 0},
       r"row 1: question 'why' is neither 'cause' nor 'effect'"),
      ("wic", {"sentence1": "a", "sentence2": "b", "start1": 0, "end1": 1},
       r"row 1: no field 'label'"),
      ("wsc", {"text": "a b", "label": True, "target": {"span1_index": 0}},
       r"row 1: no field 'span1_text' \(top-level or in target\)"),
      ("record", dict(record_record(), qas=[{"query": "@placeholder x", "answers": [
          {"text": "Paris"}]}]), r"row 1: none of the answers \['Paris'\] is one of the "),
      ("multirc", {"passage": {"text": "p", "questions": [{"question": "q", "answers": [
          {"text": "a", "label": 2}]}]}}, r"row 1: label 2 is not one of False, True")]:
    path = jsonl(tmp_path / f"{name}.jsonl", [record])
    with pytest.raises(tasks.TaskError, match=f"^task file {path}, " + message):
      tasks.load_task(name, path)
  with pytest.raises(tasks.TaskError, match=r"^unknown task 'colaa'; one of .*cola, .*glue, "
                     r"superglue\.$"):
    tasks.parse_specs(f"colaa:{path}")


# -- The command line -----------------------------------------------------------------------------

@pytest.mark.e2e
def test_cli_scores_a_benchmark_and_reports_its_average(tiny_lm_run, tmp_path):
  root = tmp_path / "glue"
  tsv(root / "CoLA/dev.tsv", [["s", k % 2, "", f"sentence {k}"] for k in range(4)])
  tsv(root / "WNLI/dev.tsv", [["index", "sentence1", "sentence2", "label"],
                              [0, "It fell.", "It fell.", 1], [1, "It rose.", "It fell.", 0]])
  result = subprocess.run([sys.executable, "-m", "experiments.evaluate",
                           f"--workdir={tiny_lm_run}", "--progress=false", f"--tasks=glue:{root}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  cola, wnli, summary = [json.loads(line) for line in result.stdout.splitlines()]
  assert (cola["task"], wnli["task"], summary["group"]) == ("cola", "wnli", "glue")
  assert summary["score"] == pytest.approx((cola["mcc"] + wnli["acc"]) / 2)
  assert summary["missing"][:2] == ["sst2", "mrpc"] and summary["num_fewshot"] == 0
  assert "the score averages 2 of its 9 tasks; missing: sst2, mrpc" in result.stderr
  saved = run_lib.read_json(tiny_lm_run, "eval_results.json")
  assert saved["glue_0shot"] == summary and saved["cola_0shot"] == cola
  os.remove(os.path.join(tiny_lm_run, "eval_results.json"))  # (the run is shared)
