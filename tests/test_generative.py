"""jaxlm.generative: the generative tasks' published layouts, their metrics against sacrebleu and
rouge_score called directly, greedy generation through the KV-cache generator, the CLI."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from jaxlm import generate as generate_lib
from jaxlm import generative, tasks
from jaxlm import run as run_lib
from tests.conftest import REPO
from tests.test_tasks import jsonl, prepare_tfds, write

# -- readers ------------------------------------------------------------------------------------


def test_a_prompt_file_keeps_its_prompts_and_every_reference(tmp_path):
  path = jsonl(tmp_path / "p.jsonl", [
      {"prompt": "2 + 2 =", "references": ["4", "four"]},
      {"prompt": "Capital of France:\n", "reference": "Paris"}])
  first, second = tasks.load_task("generate", path).items
  assert (first.prompt, first.references, first.solved()) == ("2 + 2 =", ("4", "four"), "2 + 2 = 4")
  # (a prompt ending in whitespace gets no space before its demonstration's answer)
  assert second.references == ("Paris",) and second.solved() == "Capital of France:\nParis"


def test_short_answer_qa_in_the_triviaqa_and_nq_open_layouts(tmp_path):
  trivia = jsonl(tmp_path / "tqa.jsonl", [{"question": "Who wrote Hamlet", "answer": {
      "value": "William Shakespeare", "aliases": ["Shakespeare", "William Shakespeare"]}}])
  nq = jsonl(tmp_path / "nq.jsonl", [{"question": "where is the eiffel tower?",
                                      "answer": ["Paris", "Paris, France"]}])
  [item] = tasks.load_task("trivia_qa", trivia).items
  assert item.prompt == "Question: Who wrote Hamlet?\nAnswer:"  # (the harness's prompt)
  assert item.references == ("Shakespeare", "William Shakespeare")
  [item] = tasks.load_task("nq_open", nq).items
  assert item.prompt == "Q: where is the eiffel tower?\nA:"
  assert item.references == ("Paris", "Paris, France")


def test_summaries_in_the_cnn_dailymail_and_xsum_layouts_get_gpt2s_tldr_prompt(tmp_path):
  cnn = jsonl(tmp_path / "cnn.jsonl", [{"article": "(CNN) Rain fell.  ", "id": "a1",
                                        "highlights": "Rain fell .\nIt was wet ."}])
  xsum = jsonl(tmp_path / "xsum.jsonl", [{"document": "The match ended 2-1.",
                                          "summary": "A close game.", "id": "1"}])
  [item] = tasks.load_task("cnn_dailymail", cnn).items
  assert item.prompt == "(CNN) Rain fell.\nTL;DR:"
  assert item.references == ("Rain fell .\nIt was wet .",)
  [item] = tasks.load_task("xsum", xsum).items
  assert (item.prompt, item.references) == ("The match ended 2-1.\nTL;DR:", ("A close game.",))


def test_translation_pairs_as_jsonl_plain_text_and_sacrebleu_files(tmp_path):
  records = [{"translation": {"en": "The cat sleeps.", "fr": "Le chat dort."}},
             {"translation": {"en": "Good day.", "fr": "Bonjour."}}]
  path = jsonl(tmp_path / "wmt.jsonl", records)
  first, _ = tasks.load_task("wmt14_en_fr", path).items
  assert first.prompt == "English phrase: The cat sleeps.\nFrench phrase:"  # (the harness's)
  assert first.references == ("Le chat dort.",)
  first, _ = tasks.load_task("wmt14_fr_en", path).items  # the other direction, same file
  assert first.prompt == "French phrase: Le chat dort.\nEnglish phrase:"
  assert first.references == ("The cat sleeps.",)
  # newstest-style NAME.en beside NAME.fr; sacrebleu's NAME.src beside NAME.ref, NAME.ref-B
  source = write(tmp_path / "newstest.en", ["The cat sleeps.", "Good day."])
  write(tmp_path / "newstest.fr", ["Le chat dort.", "Bonjour."])
  assert [i.references for i in tasks.load_task("wmt14_en_fr", source).items] == [
      ("Le chat dort.",), ("Bonjour.",)]
  src = write(tmp_path / "wmt14.en-fr.src", ["The cat sleeps.", "Good day."])
  write(tmp_path / "wmt14.en-fr.ref", ["Le chat dort.", "Bonjour."])
  write(tmp_path / "wmt14.en-fr.ref-B", ["Le chat fait dodo.", "Bonne journée."])
  items = tasks.load_task("wmt14_en_fr", src).items
  assert items[0].prompt == "English phrase: The cat sleeps.\nFrench phrase:"
  assert items[1].references == ("Bonjour.", "Bonne journée.")


def test_tfds_layouts_equal_the_published_files(tmp_path):
  # (trivia_qa and natural_questions_open are registered lazily by TFDS, which then wants the
  # catalog's version: a stand-in prepared here would send it to download; their records are
  # the JSONL layouts above)
  import tensorflow_datasets as tfds
  text = tfds.features.Text()
  cnn = [{"article": "Rain fell.", "highlights": "Rain ."},
         {"article": "Sun.", "highlights": "S ."}]
  prepare_tfds(tmp_path, "cnn_dailymail", "test", {"article": text, "highlights": text}, cnn)
  pairs = [{"de": "Hallo Welt.", "en": "Hello world."}, {"de": "Danke.", "en": "Thanks."}]
  prepare_tfds(tmp_path, "wmt14_translate/de-en", "test", {"de": text, "en": text}, pairs)
  files = {"cnn_dailymail": jsonl(tmp_path / "cnn.jsonl", cnn),
           "wmt14_de_en": jsonl(tmp_path / "wmt.jsonl", [{"translation": p} for p in pairs])}
  loaded = tasks.load_tasks(",".join(f"{name}:tfds" for name in files), data_dir=str(tmp_path))
  for task in loaded:  # (TFDS shuffles the examples as it prepares them)
    published = tasks.load_task(task.name, files[task.name]).items
    assert sorted(task.items, key=str) == sorted(published, key=str), task.name


def test_fewshot_demonstrations_are_solved_prompts_and_keep_the_references(tmp_path):
  path = jsonl(tmp_path / "nq.jsonl", [{"question": f"q{k}", "answer": [f"a{k}", "x"]}
                                       for k in range(3)])
  items = tasks.load_task("nq_open", path, num_fewshot=2).items
  assert items[0].prompt == "Q: q1?\nA: a1\n\nQ: q2?\nA: a2\n\nQ: q0?\nA:" or \
      items[0].prompt == "Q: q2?\nA: a2\n\nQ: q1?\nA: a1\n\nQ: q0?\nA:"
  assert [item.references for item in items] == [(f"a{k}", "x") for k in range(3)]


@pytest.mark.parametrize("name,record,message", [
    ("generate", {"references": ["x"]}, "row 2: no field 'prompt'"),
    ("generate", {"prompt": "p"}, "row 2: no field 'references' or 'reference' or 'target'"),
    ("generate", {"prompt": "p", "references": []}, "row 2: references is an empty list"),
    ("nq_open", {"question": "q", "answer": [3]}, "row 2: answers must be a string or a list"),
    ("cnn_dailymail", {"article": "", "highlights": "h"}, "row 2: the prompt must be non-empty"),
    ("wmt16_en_ro", {"translation": {"en": "x"}}, "row 2: needs the en text and its ro"),
])
def test_bad_records_are_one_line_naming_the_file_and_row(tmp_path, name, record, message):
  good = {"generate": {"prompt": "p", "references": ["r"]}, "nq_open": {"question": "q",
          "answer": "a"}, "cnn_dailymail": {"article": "a", "highlights": "h"},
          "wmt16_en_ro": {"translation": {"en": "x", "ro": "y"}}}[name]
  path = jsonl(tmp_path / "t.jsonl", [good, record])
  with pytest.raises(tasks.TaskError) as e:
    tasks.load_task(name, path)
  assert str(e.value).startswith(f"task file {path}, ") and message in str(e.value)
  assert "\n" not in str(e.value)


def test_unknown_tasks_and_misaligned_translations_are_refused_while_loading(tmp_path):
  with pytest.raises(tasks.TaskError, match="unknown task 'squad_gen'; one of .*cnn_dailymail"):
    tasks.load_tasks(f"squad_gen:{tmp_path}")
  source = write(tmp_path / "n.en", ["a", "b"])
  write(tmp_path / "n.fr", ["a"])
  with pytest.raises(tasks.TaskError, match="has 2 lines but .*n.fr has 1; they must be"):
    tasks.load_task("wmt14_en_fr", source)
  other = write(tmp_path / "n.txt", ["a"])
  with pytest.raises(tasks.TaskError, match="plain-text source file is NAME.en"):
    tasks.load_task("wmt14_en_fr", other)


# -- metrics ------------------------------------------------------------------------------------

HYPOTHESES = ["the cat sat on the mat", "a dog runs in the park today", "hello there"]
REFERENCES = [["the cat is sitting on the mat", "a cat sat on a mat"],
              ["the dog is running in a park", "dogs run in the park"],
              ["hello there my friend", "hi there"]]


def test_bleu_and_chrf_are_sacrebleus_corpus_scores():
  import sacrebleu
  streams = [list(column) for column in zip(*REFERENCES)]
  score, signature = generative.bleu(HYPOTHESES, REFERENCES)
  assert score == sacrebleu.corpus_bleu(HYPOTHESES, streams).score and 0 < score < 100
  assert "nrefs:2" in signature and "tok:13a" in signature
  assert generative.chrf(HYPOTHESES, REFERENCES)[0] == sacrebleu.corpus_chrf(
      HYPOTHESES, streams).score
  one = [[refs[0]] for refs in REFERENCES]
  assert generative.bleu(HYPOTHESES, one)[0] == sacrebleu.corpus_bleu(
      HYPOTHESES, [[r[0] for r in REFERENCES]]).score
  # a varying number of references: the missing ones are skipped, as sacrebleu does
  ragged = [REFERENCES[0], REFERENCES[1][:1], REFERENCES[2]]
  assert generative.bleu(HYPOTHESES, ragged)[0] == sacrebleu.corpus_bleu(
      HYPOTHESES, [[r[0] for r in ragged], [REFERENCES[0][1], None, REFERENCES[2][1]]]).score


def test_rouge_is_rouge_scores_stemmed_f_measure_of_the_best_reference():
  from rouge_score import rouge_scorer
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  got = generative.rouge(HYPOTHESES, REFERENCES)
  for name in ("rouge1", "rouge2", "rougeL"):
    per_example = [max(scorer.score(r, h)[name].fmeasure for r in refs)
                   for h, refs in zip(HYPOTHESES, REFERENCES)]
    assert got[name] == pytest.approx(sum(per_example) / 3, abs=1e-12)
  # with stemming "running" matches "runs": ROUGE-1 of 1.0
  assert generative.rouge(["dogs running"], [["dog runs"]])["rouge1"] == 1.0


def test_exact_match_and_f1_by_hand():
  # normalised: case, punctuation and articles dropped
  assert generative.exact_match(["The Eiffel Tower!"], [["eiffel tower"]]) == 1.0
  assert generative.exact_match(["Eiffel Tower, Paris"], [["eiffel tower"]]) == 0.0
  # "eiffel tower paris" vs "eiffel tower": precision 2/3, recall 1 -> F1 0.8; the best reference
  assert generative.f1(["Eiffel Tower, Paris"], [["London", "the eiffel tower"]]) == \
      pytest.approx(0.8)
  # "red blue green pink" vs "red blue": 2/4 and 2/2 -> 2/3; "x" vs "y": 0; the mean
  assert generative.f1(["red blue green pink", "x"], [["red blue"], ["y"]]) == \
      pytest.approx((2 / 3 + 0) / 2)
  assert generative.exact_match(["x", "Y."], [["y", "x"], ["y"]]) == 1.0


# -- generation ---------------------------------------------------------------------------------

PROMPTS = ["import os\nimport", "def main(", "class Foo(object):", "x = [", "return self."]


@pytest.fixture(scope="module")
def scorer(tiny_lm_run):
  run = run_lib.open_run(tiny_lm_run)
  mesh = run_lib.default_mesh(run.config)
  return tasks.Scorer(run.config, run_lib.restore_params(run, mesh), run.tokenizer, mesh,
                      batch_size=4, samples=len(PROMPTS))



def items_for(prompts, references):
  return [generative.GenItem((p,), (" " + r[0],), 0, references=tuple(r))
          for p, r in zip(prompts, references)]


def test_greedy_answers_drive_the_metrics_through_the_real_generator(scorer):
  task = generative.GenerativeTask(("em", "f1", "bleu", "chrf", "rouge"), 6, ("\x00",))
  wrong = items_for(PROMPTS, [["zzz qqq"]] * len(PROMPTS))
  result = generative.score_generated(scorer, wrong, task)
  answers = [s["answer"] for s in result["samples"]]
  assert len(answers) == result["examples"] == 5 and result["max_new_tokens"] == 6
  assert result["new_tokens"] > 0 and result["prompts_per_second"] > 0
  assert result["new_tokens_per_second"] > 0 and result["bleu"] < 100 and result["em"] == 0
  # the references are now what the model writes (one at a time through the generator): perfect
  alone = [generate_lib.generate(scorer.config, scorer.params, scorer.tokenizer, [p],
                                 max_new_tokens=6, temperature=0.0, stop=("\x00",),
                                 truncate=True)[0].text.strip() for p in PROMPTS]
  assert alone == answers  # batched (4, then 1 filled up to 4) = one at a time
  # (ROUGE counts words, [a-z0-9]+: answers with one are kept)
  known = [item for item, a in zip(items_for(PROMPTS, [[a or "-"] for a in alone]), alone)
           if re.search("[a-z0-9]", a.lower())]
  assert known
  right = generative.score_generated(scorer, known, task)
  assert right["em"] == right["f1"] == 1.0 and right["bleu"] == pytest.approx(100.0)
  assert right["rouge1"] == right["rougeL"] == 1.0 and right["chrf"] == pytest.approx(100.0)


def test_answers_end_at_the_stop_and_the_budget_is_capped(scorer):
  [free] = generate_lib.generate(scorer.config, scorer.params, scorer.tokenizer, [PROMPTS[0]],
                                 max_new_tokens=12, temperature=0.0, truncate=True)
  text = free.text.strip()
  stop = text[len(text) // 2]  # a character the model writes mid-answer
  task = generative.GenerativeTask(("em",), 12, (stop,))
  result = generative.score_generated(scorer, items_for(PROMPTS[:1], [[text]]), task)
  assert result["samples"][0]["answer"] == text[:text.index(stop)].strip()
  assert result["finished"]["stop"] == 1 and result["em"] == 0.0
  # a task's budget is capped at half the context (64 here); an override must fit the context
  assert generative.new_token_budget(scorer, generative.GENERATIVE["cnn_dailymail"][1]) == 32
  with pytest.raises(tasks.TaskError, match="--max_new_tokens=64 leaves no room"):
    generative.new_token_budget(dataclasses.replace(scorer, max_new_tokens=64),
                                generative.GENERATIVE["xsum"][1])


def test_a_stub_generator_scores_perfectly_only_when_it_returns_the_references(scorer, tmp_path,
                                                                              monkeypatch):
  path = jsonl(tmp_path / "wmt.jsonl", [
      {"translation": {"en": f"sentence {k}", "fr": f"la phrase numéro {k} est ici"}}
      for k in range(3)])
  loaded = tasks.load_task("wmt14_en_fr", path)
  replies = {}

  def stub(config, params, tokenizer, prompts, **kwargs):
    assert kwargs["stop"] == ("\n",) and kwargs["temperature"] == 0.0
    return [generate_lib.Completion(p, " " + replies[p], [1, 2], "stop", 3) for p in prompts]
  monkeypatch.setattr(generative.generate_lib, "generate", stub)
  replies.update({i.prompt: i.references[0] for i in loaded.items})
  perfect = tasks.score_task(loaded, scorer)
  assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
  replies.update({i.prompt: "la phrase est" for i in loaded.items})
  worse = tasks.score_task(loaded, scorer)
  assert 0 <= worse["bleu"] < 100 and worse["chrf"] < 100 and worse["task"] == "wmt14_en_fr"


# -- the CLI ------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_cli_prints_metrics_and_keeps_samples_in_eval_results(tiny_lm_run, tmp_path):
  qa = jsonl(tmp_path / "nq.jsonl", [{"question": f"import {k}", "answer": ["os"]}
                                     for k in range(4)])
  xsum = jsonl(tmp_path / "xsum.jsonl", [{"document": "def main(): pass", "summary": "main"}])
  result = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", f"--workdir={tiny_lm_run}",
       "--progress=false", "--max_new_tokens=4", "--samples=1", "--limit=3",
       f"--tasks=nq_open:{qa},xsum:{xsum}"], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  nq, summary = [json.loads(line) for line in result.stdout.splitlines()]
  assert (nq["task"], nq["examples"], nq["max_new_tokens"]) == ("nq_open", 3, 4)
  assert 0 <= nq["em"] <= nq["f1"] <= 1 and "samples" not in nq and nq["new_tokens"] > 0
  assert {"rouge1", "rouge2", "rougeL", "prompts_per_second"} <= set(summary)
  saved = run_lib.read_json(tiny_lm_run, "eval_results.json")
  [sample] = saved["nq_open_0shot"]["samples"]
  assert sample["prompt"] == "Q: import 0?\nA:" and sample["references"] == ["os"]
  assert {k: v for k, v in saved["xsum_0shot"].items() if k != "samples"} == summary
  os.remove(os.path.join(tiny_lm_run, "eval_results.json"))  # (the run is shared)
