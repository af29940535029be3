"""jaxlm.tasks: the published task formats, harness-style scoring, the --tasks CLI."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import pretrain, sharding, tasks
from jaxlm import run as run_lib
from jaxlm.model import Transformer
from tests.conftest import REPO


def write(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def jsonl(path, records):
  return write(path, [json.dumps(r) for r in records])


# -- task files -------------------------------------------------------------------------------

def test_hellaswag_is_read_as_the_harness_preprocesses_it(tmp_path):
  path = jsonl(tmp_path / "hs.jsonl", [{
      "activity_label": "Baking cookies", "ctx_a": "A woman [title] mixes flour.",
      "ctx_b": "she", "ctx": "ignored when ctx_a/ctx_b exist",
      "endings": ["adds  eggs.", "[header] runs away."], "label": 0}])
  [item] = tasks.read_hellaswag(path)
  assert item.contexts == ("Baking cookies: A woman. mixes flour. She",) * 2
  # (the bracket tag leaves its space, then the target delimiter adds one: as in the harness)
  assert item.choices == (" adds eggs.", "  runs away.") and item.label == 0


def test_multiple_choice_formats(tmp_path):
  piqa = jsonl(tmp_path / "valid.jsonl", [{"goal": "Open a jar", "sol1": "twist", "sol2": "eat"}])
  write(tmp_path / "valid-labels.lst", ["0"])
  [item] = tasks.read_piqa(piqa)
  assert item.contexts[0] == "Question: Open a jar\nAnswer:" and item.choices == (" twist",
                                                                                  " eat")
  arc = jsonl(tmp_path / "arc.jsonl", [{"question": {"stem": "2+2?", "choices": [
      {"text": "3", "label": "A"}, {"text": "4", "label": "B"}]}, "answerKey": "B"}])
  assert tasks.read_arc(arc)[0].label == 1
  wino = jsonl(tmp_path / "wino.jsonl", [{"sentence": "The cup fell off the table because _ was "
                                                      "slippery.", "option1": "the cup",
                                          "option2": "the table", "answer": "2"}])
  [item] = tasks.read_winogrande(wino)
  assert item.contexts == ("The cup fell off the table because the cup",
                           "The cup fell off the table because the table")
  assert item.choices == (" was slippery.",) * 2 and item.label == 1
  boolq = jsonl(tmp_path / "boolq.jsonl", [{"passage": "P", "question": "is it", "label": True}])
  assert tasks.read_boolq(boolq)[0].label == 1
  rte = jsonl(tmp_path / "rte.jsonl", [{"premise": "A", "hypothesis": "B",
                                        "label": "not_entailment"}])
  assert tasks.read_rte(rte)[0].label == 1 and tasks.read_rte(rte)[0].choices == (" True",
                                                                                  " False")
  sst2 = write(tmp_path / "dev.tsv", ["sentence\tlabel", "a fine film\t1", "dull\t0"])
  assert [i.label for i in tasks.read_sst2(sst2)] == [1, 0]


def test_lambada_and_wikitext(tmp_path):
  lambada = write(tmp_path / "lambada.txt", ["he opened the door and saw his dog"])
  [item] = tasks.read_lambada(lambada)
  assert item.contexts == ("he opened the door and saw his",) and item.choices == (" dog",)
  wiki = write(tmp_path / "wiki.test.raw", ["", " = Valkyria = ", "", " text one . ",
                                            " = = Plot = = ", " more . ", " = Tower = ", " two "])
  articles = tasks.read_wikitext(wiki)
  assert len(articles) == 2 and articles[0].startswith("= Valkyria =") and "Plot" in articles[0]


def prepare_tfds(data_dir, dataset: str, split: str, features: dict, examples: list) -> None:
  """A TFDS dataset named `dataset` ("name" or "name/config") with the catalog's features,
  prepared as array_record in data_dir/tfds, as `tfds build` leaves it (no network here)."""
  import tensorflow_datasets as tfds
  dataset_name, _, config = dataset.partition("/")

  class Prepared(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = dataset_name
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config)] if config else []
    code_path = None  # (see jaxlm/corpora.py)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples()}

    def _generate_examples(self):
      yield from enumerate(examples)

  Prepared(config=config or None, data_dir=str(data_dir / "tfds"),
          file_format="array_record").download_and_prepare()


def test_tasks_read_from_prepared_tfds_datasets_equal_their_published_files(tmp_path):
  """The catalog's features (tensorflow_datasets' hellaswag, ai2_arc, winogrande, super_glue,
  lambada builders) of the same examples give the same items as the published files."""
  import tensorflow_datasets as tfds
  text, label = tfds.features.Text(), tfds.features.ClassLabel
  arc_keys = ["A", "B", "C", "D", "E"]
  prepare_tfds(tmp_path, "hellaswag", "validation", {
      "context": text, "endings": tfds.features.Sequence(text), "activity_label": text,
      "label": np.int32, "split_type": text, "source_id": text}, [
          {"context": "A man [title] sits.", "endings": ["stands.", "[step] sleeps."],
           "activity_label": "Sitting", "label": 1, "split_type": "indomain",
           "source_id": "x"}])
  prepare_tfds(tmp_path, "ai2_arc/ARC-Easy", "test", {
      "id": text, "question": text,
      "choices": tfds.features.Sequence({"text": text, "label": label(names=arc_keys)}),
      "answerKey": label(names=arc_keys)}, [
          {"id": "1", "question": "2+2?", "choices": {"text": ["3", "4"], "label": ["A", "B"]},
           "answerKey": "B"}])
  prepare_tfds(tmp_path, "winogrande/winogrande_xl", "validation", {
      "sentence": text, "option1": text, "option2": text, "label": label(names=["1", "2"])}, [
          {"sentence": "It fell because _ was wet.", "option1": "it", "option2": "the floor",
           "label": "2"}])
  prepare_tfds(tmp_path, "super_glue/boolq", "validation", {
      "question": text, "passage": text, "idx": np.int32,
      "label": label(names=["False", "True"])}, [
          {"question": "is it", "passage": "P", "idx": 0, "label": "True"}])
  prepare_tfds(tmp_path, "lambada", "test", {"passage": text},
               [{"passage": "he opened the door and saw his dog"}])
  prepare_tfds(tmp_path, "my_wiki", "test", {"text": text},
               [{"text": " = A = \n a . "}, {"text": " = B = \n b . "}])
  published = {
      "hellaswag": jsonl(tmp_path / "hs.jsonl", [{
          "ctx": "A man [title] sits.", "endings": ["stands.", "[step] sleeps."],
          "activity_label": "Sitting", "label": 1}]),
      "arc_easy": jsonl(tmp_path / "arc.jsonl", [{"question": {"stem": "2+2?", "choices": [
          {"text": "3", "label": "A"}, {"text": "4", "label": "B"}]}, "answerKey": "B"}]),
      "winogrande": jsonl(tmp_path / "wino.jsonl", [{
          "sentence": "It fell because _ was wet.", "option1": "it", "option2": "the floor",
          "answer": "2"}]),
      "boolq": jsonl(tmp_path / "boolq.jsonl", [{"passage": "P", "question": "is it",
                                                  "label": True}]),
      "lambada": write(tmp_path / "lambada.txt", ["he opened the door and saw his dog"])}
  specs = ",".join(f"{name}:tfds" for name in published) + ",wikitext:tfds:my_wiki"
  from_tfds = tasks.load_tasks(specs, data_dir=str(tmp_path))
  assert [t.path for t in from_tfds][:2] == [
      f"tfds:hellaswag:validation@{tmp_path / 'tfds'}", f"tfds:ai2_arc/ARC-Easy:test@"
      f"{tmp_path / 'tfds'}"]
  for task in from_tfds[:-1]:
    assert task.items == tasks.load_task(task.name, published[task.name]).items, task.name
  # (TFDS stores a split's examples in its own shuffled order, as for the catalog datasets.)
  assert sorted(from_tfds[-1].documents) == [" = A = \n a . ", " = B = \n b . "]
  # Not prepared, or no data_dir: one line saying how to prepare it.
  with pytest.raises(tasks.TaskError, match=r"TFDS dataset 'piqa' is not prepared in .*tfds; "
                     r"prepare it .*`tfds build piqa --data_dir="):
    tasks.parse_specs("piqa:tfds", str(tmp_path))
  with pytest.raises(tasks.TaskError, match="name the TFDS dataset"):
    tasks.parse_specs("wikitext:tfds", str(tmp_path))
  with pytest.raises(tasks.TaskError, match="no split 'train'|cannot be read"):
    tasks.load_tasks("lambada:tfds:lambada:train", data_dir=str(tmp_path))


def test_wikitext_is_detokenized_as_the_harness_does_it():
  pytest.importorskip("lm_eval")
  from lm_eval.tasks.wikitext import preprocess_wikitext  # the reference, in the test extra
  page = (" = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles ( "
          "Japanese : 戦場のヴァルキュリア3 , lit . Valkyria of the Battlefield 3 ) , is a "
          "role @-@ "
          "playing game . The game 's 1 @,@ 000 units at 3 @.@ 5 ° C , \" quoted \" and [ "
          "bracketed ] , the players ' guns ; N items ! really ? { braces } ' single ' \n \n "
          " = = Gameplay = = \n = = = Sub = = = \n = = = = Sub sub = = = = \n")
  assert tasks.wikitext_detokenize(page) == preprocess_wikitext.wikitext_detokenizer(
      {"page": page})
  assert "role-playing" in tasks.wikitext_detokenize(page)


@pytest.mark.parametrize("records, message", [
    ([{"goal": "g", "sol1": "a", "sol2": "b", "label": 5}], "label 5 is not one of the 2"),
    ([{"goal": "g", "sol1": "a", "label": 0}], "row 1: no field 'sol2'"),
])
def test_bad_task_files_are_named_with_the_row(tmp_path, records, message):
  with pytest.raises(tasks.TaskError, match=message):
    tasks.read_piqa(jsonl(tmp_path / "p.jsonl", records))


def test_malformed_task_records_are_one_line(tmp_path):
  hellaswag = {"ctx_a": "a", "ctx_b": "b", "endings": ["x", "y"], "label": 0}
  for name, records, message in [
      ("hellaswag", [dict(hellaswag, label="B")], r"malformed record \(ValueError: invalid lit"),
      ("hellaswag", [dict(hellaswag, ctx_a=None)], r"malformed record \(TypeError"),
      ("hellaswag", [dict(hellaswag, endings="abc")], r"row 1: endings must be a list"),
      ("winogrande", [{"sentence": "a _ b", "option1": "x", "option2": "y", "answer": ""}],
       r"malformed record \(ValueError")]:
    with pytest.raises(tasks.TaskError, match=message):
      tasks.load_task(name, jsonl(tmp_path / f"{name}.jsonl", records))
  piqa = jsonl(tmp_path / "valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 3)
  write(tmp_path / "valid-labels.lst", ["0", "1"])
  with pytest.raises(tasks.TaskError, match=r"valid-labels\.lst holds 2 labels for the 3 "):
    tasks.load_task("piqa", piqa)
  with pytest.raises(tasks.TaskError, match=r"^--num_fewshot=-1 must be >= 0\.$"):
    tasks.load_task("piqa", piqa, num_fewshot=-1)
  with pytest.raises(tasks.TaskError, match=r"unknown task 'lambda'"):  # (read as LAMBADA)
    tasks.load_task("lambda", piqa)


def test_task_specs_are_checked(tmp_path):
  path = write(tmp_path / "l.txt", ["a b"])
  assert tasks.parse_specs(f"lambada:{path}") == [("lambada", path)]
  for spec, message in [("mmlu:x", "unknown task 'mmlu'"), ("lambada", "write NAME:PATH"),
                        (f"lambada:{tmp_path}/none.txt", "does not exist"), ("", "no tasks")]:
    with pytest.raises(tasks.TaskError, match=message):
      tasks.parse_specs(spec)


def test_fewshot_examples_exclude_the_example_and_follow_the_seed():
  items = [tasks.Item((f"q{i}:",), (f" a{i}", " x"), 0) for i in range(6)]
  shots = tasks.with_fewshot(items, 3, seed=1, limit=4)
  assert len(shots) == 4
  for index, item in enumerate(shots):
    demos = item.contexts[0].split("\n\n")
    assert len(demos) == 4 and demos[-1] == f"q{index}:"
    assert f"q{index}: a{index}" not in demos[:3] and len(set(demos[:3])) == 3
  assert tasks.with_fewshot(items, 3, seed=1) [:4] == shots
  assert tasks.with_fewshot(items, 3, seed=2) != tasks.with_fewshot(items, 3, seed=1)
  with pytest.raises(tasks.TaskError, match="needs more than 6"):
    tasks.with_fewshot(items, 6, seed=1)


# -- scoring ----------------------------------------------------------------------------------

def direct_loglikelihood(model_config, params, context_ids, continuation_ids):
  """Log-probability of the continuation from one unpadded forward pass."""
  x = (list(context_ids) + list(continuation_ids))[-(model_config.max_seq_len + 1):]
  logits = Transformer(model_config).apply({"params": params}, jnp.asarray([x[:-1]]))[0]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  n = min(len(continuation_ids), len(x) - 1)
  targets = np.asarray(x[1:])[-n:]
  picked = np.asarray(log_probs)[-n:][np.arange(n), targets]
  greedy = bool(np.all(np.asarray(jnp.argmax(logits, -1))[-n:] == targets))
  return float(picked.sum()), greedy


@pytest.mark.parametrize("mesh_shape", [{"data": 1}, {"data": 4, "fsdp": 2}])
def test_loglikelihoods_equal_a_direct_forward_pass(tiny_lm_run, mesh_shape):
  run = run_lib.open_run(tiny_lm_run)
  config = config_lib.replace(run.config, mesh=dict({"fsdp": 1, "tensor": 1}, **mesh_shape))
  devices = jax.devices()[:mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)]
  mesh = sharding.make_mesh(config.mesh, devices)
  params = run_lib.restore_params(run, mesh)
  pairs = [("def main(", "):\n  return 0"), ("", "import os"), ("x = ", " 1"),
           ("import json\n" * 30, "import sys")]  # the last exceeds the 64-token context
  ll, greedy = tasks.loglikelihoods(
      tasks.Scorer(config, params, run.tokenizer, mesh, batch_size=3), pairs)
  host_params = jax.device_get(params)
  for (context, continuation), got, got_greedy in zip(pairs, ll, greedy):
    want, want_greedy = direct_loglikelihood(
        config.model, host_params, *tasks.encode_pair(run.tokenizer, context, continuation))
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4) and got_greedy == want_greedy


def test_greedy_flag_marks_a_continuation_the_model_would_write(tiny_lm_run):
  run = run_lib.open_run(tiny_lm_run)
  mesh = sharding.make_mesh(run.config.mesh, jax.devices()[:1])
  params = run_lib.restore_params(run, mesh)
  model = Transformer(run.config.model)
  context = run.tokenizer.encode("for item in items:")
  greedy_ids = list(context)
  for _ in range(2):
    logits = model.apply({"params": params}, jnp.asarray([greedy_ids]))
    greedy_ids.append(int(jnp.argmax(logits[0, -1])))
  other = [greedy_ids[-2], (greedy_ids[-1] + 1) % run.config.model.vocab_size]
  scorer = tasks.make_scorer(run.config.model, mesh)
  rows = [data_lib.lm_row(context + continuation, 64, run.tokenizer.pad_id, len(continuation))
          for continuation in (greedy_ids[-2:], other)]
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  scores = jax.device_get(scorer(params, sharding.global_batch(batch, mesh)))
  ll, greedy = scores["loglikelihood"], scores["greedy"]
  assert list(greedy) == [True, False] and ll[0] > ll[1]


def test_acc_and_acc_norm(monkeypatch):
  items = [tasks.Item(("q",) * 2, (" ab", " abcdefgh"), 1), tasks.Item(("q",) * 2, (" a", " b"), 0)]
  # log-likelihoods: item 0 favours the short choice in sum, the long one per byte.
  monkeypatch.setattr(tasks, "loglikelihoods",
                      lambda *a, **k: (np.array([-3.0, -4.0, -1.0, -2.0]), None))
  result = tasks.score_items(None, items)
  assert result["acc"] == 0.5 and result["acc_norm"] == 1.0 and result["examples"] == 2
  assert result["acc_stderr"] == pytest.approx(0.5)


def test_wikitext_word_perplexity_follows_the_total_loss(tiny_lm_run, tmp_path):
  run = run_lib.open_run(tiny_lm_run)
  mesh = sharding.make_mesh(run.config.mesh, jax.devices()[:1])
  params = run_lib.restore_params(run, mesh)
  documents = ["the quick brown fox jumps", "over the lazy dog again and again"]
  scorer = tasks.Scorer(run.config, params, run.tokenizer, mesh)
  result = tasks.score_documents(scorer, documents)
  from jaxlm import evaluate
  plain = evaluate.evaluate_documents(run.config, params, run.tokenizer, documents, seq_len=64,
                                      stride=64, batch_size=8, mesh=mesh)
  # jaxlm.evaluate's windows and loss (another code path): the same summed loss, per word and
  # per byte (logs compared: a random model's perplexities are ~1e9).
  assert result["tokens"] == plain["tokens"]
  assert math.log(result["word_perplexity"]) == pytest.approx(
      plain["loss"] * plain["tokens"] / 12, rel=1e-5)
  assert result["bits_per_byte"] == pytest.approx(plain["bits_per_byte"], rel=1e-5)
  assert math.log2(result["byte_perplexity"]) == pytest.approx(plain["bits_per_byte"], rel=1e-5)
  for documents, message in [("one string", r"documents is one string; pass a list"),
                             (["", ""], r"the documents hold no text to score")]:
    with pytest.raises(evaluate.EvaluationError, match=message):  # (0 tokens read as loss 0)
      evaluate.evaluate_documents(run.config, params, run.tokenizer, documents, seq_len=64,
                                  stride=64, batch_size=8, mesh=mesh)
  # The wikitext task scores the detokenized text; words and bytes stay the original's.
  raw = ["the quick , brown fox @-@ jumps", "over the lazy dog ( again ) and again"]
  detokenized = tasks.score_documents(scorer, raw, detokenize=True)
  plain = tasks.score_documents(scorer, [tasks.wikitext_detokenize(d) for d in raw])
  words = lambda docs: sum(len(d.split()) for d in docs)
  assert math.log(detokenized["word_perplexity"]) * words(raw) == pytest.approx(
      math.log(plain["word_perplexity"]) * words([tasks.wikitext_detokenize(d) for d in raw]),
      rel=1e-5)


# -- the CLI ----------------------------------------------------------------------------------

def run_evaluate(*args):
  return subprocess.run([sys.executable, "-m", "experiments.evaluate", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
def test_cli_scores_tasks_and_merges_eval_results(tiny_lm_run, tmp_path):
  hellaswag = jsonl(tmp_path / "hs.jsonl", [
      {"activity_label": "Code", "ctx_a": "def f(x):", "ctx_b": "return",
       "endings": [f"x + {i}" for i in range(4)], "label": i % 4} for i in range(10)])
  lambada = write(tmp_path / "lambada.txt", [f"import os and import sys{i}" for i in range(5)])
  wiki = write(tmp_path / "wiki.raw", [" = A = ", " some text here . ", " = B = ", " more "])
  result = run_evaluate(f"--workdir={tiny_lm_run}", "--progress=false", "--num_fewshot=1",
                        f"--tasks=hellaswag:{hellaswag},lambada:{lambada},wikitext:{wiki}")
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  assert [r["task"] for r in lines] == ["hellaswag", "lambada", "wikitext"]
  assert lines[0]["examples"] == 10 and 0 <= lines[0]["acc"] <= 1 and "acc_norm" in lines[0]
  assert lines[1]["examples"] == 5 and lines[1]["perplexity"] > 1
  assert lines[2]["documents"] == 2 and lines[2]["word_perplexity"] > 1
  saved = run_lib.read_json(tiny_lm_run, "eval_results.json")
  # (WikiText is scored as whole documents: 0-shot)
  assert saved["hellaswag_1shot"] == lines[0] and saved["wikitext_0shot"] == lines[2]
  again = run_evaluate(f"--workdir={tiny_lm_run}", "--progress=false", "--limit=3",
                       f"--tasks=hellaswag:{hellaswag}")
  assert json.loads(again.stdout)["examples"] == 3
  saved = run_lib.read_json(tiny_lm_run, "eval_results.json")
  assert saved["hellaswag_0shot"]["examples"] == 3 and "lambada_1shot" in saved
  os.remove(os.path.join(tiny_lm_run, "eval_results.json"))  # (the run is shared)


@pytest.mark.e2e
def test_cli_refuses_an_unknown_task_before_loading_anything(tiny_lm_run, tmp_path):
  result = run_evaluate(f"--workdir={tiny_lm_run}", f"--tasks=mmlu:{tmp_path}/x.jsonl")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: unknown task 'mmlu'")
  assert not os.path.exists(os.path.join(tiny_lm_run, "eval_results.json"))


@pytest.mark.e2e
def test_tasks_are_scored_at_every_evaluation_of_a_pretraining_run(tmp_path):
  import email
  lambada = write(tmp_path / "lambada.txt", [f"from email import message number{i}"
                                             for i in range(6)])
  sst2 = write(tmp_path / "sst2.tsv", ["sentence\tlabel", "good code\t1", "bad code\t0"])
  values = {"model": {"num_layers": 1, "num_heads": 2, "embed_dim": 32, "mlp_dim": 64,
                      "vocab_size": 512, "max_seq_len": 32},
            "data": {"corpus": "text_files", "seq_len": 32, "stride": 32,
                     "files": os.path.join(os.path.dirname(email.__file__), "*.py"),
                     "data_dir": str(tmp_path / "cache"), "tokenizer_max_sentences": 5000},
            "train": {"num_steps": 4, "global_batch_size": 8, "log_every": 1, "eval_every": 2,
                      "eval_batches": 1, "checkpoint_every": 4, "sample_every": 0,
                      "sample_max_new_tokens": 0, "eval_tasks": f"lambada:{lambada},sst2:{sst2}",
                      "eval_tasks_limit": 4}}
  bad = dict(values, train=dict(values["train"], eval_tasks=f"lambada:{tmp_path}/none.txt"))
  with pytest.raises(tasks.TaskError, match="none.txt"):
    pretrain.train(config_lib.validate(bad), str(tmp_path / "bad"), show_progress=False)
  assert not os.path.exists(tmp_path / "bad")
  pretrain.train(config_lib.validate(values), str(tmp_path / "run"), show_progress=False)
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    evals = [r for r in map(json.loads, f) if "eval_loss" in r]
  assert [r["step"] for r in evals] == [2, 4]
  for record in evals:
    assert 0 <= record["eval_lambada_acc"] <= 1 and record["eval_lambada_perplexity"] > 1
    assert 0 <= record["eval_sst2_acc"] <= 1 and "eval_sst2_acc_norm" in record


@pytest.mark.e2e
def test_fine_tuning_runs_score_tasks_too_and_classifiers_refuse_them(tiny_lm_run, tmp_path):
  from jaxlm import finetune
  lambada = write(tmp_path / "lambada.txt", [f"import os and import sys{i}" for i in range(4)])
  instructions = tmp_path / "instruct.json"
  instructions.write_text(json.dumps([{"instruction": "Repeat", "input": f"word{i}",
                                       "output": f"word{i}"} for i in range(24)]))
  overrides = {"finetune.epochs": 1, "train.global_batch_size": 8,
               "train.eval_tasks": f"lambada:{lambada}", "finetune.max_new_tokens": 2,
               "finetune.template": "chat"}
  labels = write(tmp_path / "labels.csv", ["text,label", "a,x", "b,y"] * 1)
  with pytest.raises(finetune.FinetuneError, match="train.eval_tasks uses the language-model"):
    finetune.prepare(tiny_lm_run, str(tmp_path / "cls"), "classifier", labels, overrides)
  assert not os.path.exists(tmp_path / "cls")
  prepared = finetune.prepare(tiny_lm_run, str(tmp_path / "instruct"), "instruct",
                              str(instructions), overrides)
  summary = finetune.finetune(prepared, show_progress=False)
  assert 0 <= summary["eval_lambada_acc"] <= 1 and summary["eval_lambada_perplexity"] > 1


def test_a_task_given_twice_is_refused_and_wikitext_is_always_zero_shot(tmp_path):
  first, second = write(tmp_path / "a.txt", ["a b c"]), write(tmp_path / "b.txt", ["d e f"])
  with pytest.raises(tasks.TaskError, match=r"task lambada is given twice"):
    tasks.parse_specs(f"lambada:{first},lambada:{second}")
  wiki = write(tmp_path / "wiki.raw", [" = Title = ", "", " Some text . "])
  assert tasks.load_task("wikitext", wiki, num_fewshot=3).num_fewshot == 0
