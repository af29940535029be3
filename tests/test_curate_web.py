"""Curation from web archives: WARC/WET records built here with warcio from generated HTML
pages, main-text extraction (both extractors), charsets, block lists, skipped and damaged
records counted or refused in one line, PII scrubbing, and the quality classifier (held-out
AUC, saved without pickle and scoring identically when loaded, Pareto sampling seeded per
document)."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from jaxlm import corpora
from jaxlm.curate import classifier, extract, local, messy, messy_web, pii, settings, urls
from jaxlm.curate import throughput as throughput_lib
from tests.conftest import REPO

QUIET = {"log": lambda _: None}


def config_with(**overrides):
  return settings.load(overrides=overrides)


def _article(i: int) -> str:
  return messy.clean_documents(docstrings=False)[i]


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
  """A WARC file of every kind of record curation meets, and a WET file; their truth."""
  folder = tmp_path_factory.mktemp("crawl")
  rng = random.Random(0)
  good = [{"url": f"https://www.news.example.com/a/{i}", "date": f"2021-05-0{i + 1}T10:00:00Z",
           "body": messy_web.page_html(f"Story {i}", _article(i), rng).encode()}
          for i in range(3)]
  pages = good + [
      {"url": "https://www.news.example.com/gone", "status": "404 Not Found",
       "body": b"<html><body><p>Not here.</p></body></html>"},
      {"url": "https://www.news.example.com/logo.png", "content_type": "image/png",
       "body": b"\x89PNG\r\n\x1a\n\x00\x00"},
      {"url": "https://cdn.casino.example/win", "body": good[0]["body"]},
      {"url": "https://www.news.example.com/tag/python", "body": good[1]["body"]},
      {"url": "https://www.news.example.com/odd", "body": good[2]["body"],
       "content_type": "text/html; charset=x-no-such-charset"},
      {"url": "https://deals.example.com/", "body": messy_web.page_html(
          "Deals", messy_web.junk_text("spam", rng, []), rng).encode()}]
  messy_web.write_warc(str(folder / "crawl.warc.gz"), pages)
  messy_web.write_wet(str(folder / "crawl.warc.wet.gz"),
                      [("https://plain.example.org/notes", _article(5))])
  (folder / "blocklist.txt").write_text("# test\ncasino.example\n*/tag/*\n")
  return folder


def _outputs(folder) -> list[dict]:
  return [json.loads(line) for name in sorted(os.listdir(folder)) if name.endswith(".jsonl")
          for line in open(os.path.join(folder, name), encoding="utf-8")]


def test_both_extractors_keep_the_article_and_drop_navigation_comments_and_footer():
  text = _article(7)
  page = messy_web.page_html("A title", text, random.Random(1))
  first, last = text.split("\n\n")[0], text.split("\n\n")[-1]
  for name in ("resiliparse", "trafilatura"):
    pytest.importorskip(name)
    extracted = extract.EXTRACTORS[name](page)
    assert " ".join(first.split()) in " ".join(extracted.split()), name
    assert " ".join(last.split()) in " ".join(extracted.split()), name
    assert not [m for m in messy_web.BOILERPLATE_MARKERS if m in extracted], (name, extracted)


def test_charsets_declared_sniffed_defaulted_or_refused():
  page = "<html><head>{}</head><body><p>Caf\u00e9 cr\u00e8me</p></body></html>"
  assert extract.decode(page.format("").encode("latin-1"), "text/html; charset=ISO-8859-1"
                        ).endswith("Caf\u00e9 cr\u00e8me</p></body></html>")
  sniffed = page.format('<meta charset="windows-1252">').encode("cp1252")
  assert "Caf\u00e9" in extract.decode(sniffed, "text/html")
  assert "Caf\u00e9" in extract.decode(page.format("").encode("cp1252"), "text/html")  # default
  assert "Caf\u00e9" in extract.decode(page.format("").encode("utf-8"), "text/html; charset=ascii")
  with pytest.raises(extract.CharsetError, match="unknown charset 'x-klingon'"):
    extract.decode(b"<p>x</p>", "text/html; charset=x-klingon")
  with pytest.raises(extract.CharsetError, match="bytes not valid utf-8"):
    extract.decode(b"<p>\xff\xfe\xfa</p>", "text/html; charset=utf-8")


def test_blocklist_domains_block_subdomains_and_globs_match_urls():
  blocklist = urls.parse("# comment\nbad.example  # trailing\n*/ads/*\nHTTP://Exact.org/x*\n")
  assert urls.blocked("https://bad.example/a", blocklist) == "domain"
  assert urls.blocked("http://www.cdn.BAD.example:8080/", blocklist) == "domain"
  assert urls.blocked("https://notbad.example/", blocklist) is None
  assert urls.blocked("https://good.example/ads/1", blocklist) == "url_pattern"
  assert urls.blocked("http://exact.org/xyz", blocklist) == "url_pattern"
  assert urls.blocked("https://good.example/adsense", blocklist) is None


def test_web_archives_curate_into_pages_with_metadata_and_counted_skips(crawl, tmp_path):
  config = config_with(**{"input.on_bad_input": "drop", "quality.min_words": 20,
                          "web.blocklist": str(crawl / "blocklist.txt")})
  stats = local.curate(str(crawl / "*.gz"), str(tmp_path / "out"), config, workers=1, **QUIET)
  assert {rule: d["documents"] for rule, d in stats["dropped"].items()} == {
      "bad_input:charset": 1, "skipped:status": 1, "skipped:content_type": 1,
      "blocked:domain": 1, "blocked:url_pattern": 1}
  records = {r["id"]: r for r in _outputs(tmp_path / "out")}
  # record 1 is warcinfo, then a request before each response: pages are records 3, 5, 7.
  assert sorted(records) == ["crawl.warc.gz:19", "crawl.warc.gz:3", "crawl.warc.gz:5",
                             "crawl.warc.gz:7", "crawl.warc.wet.gz:1"]
  page = records["crawl.warc.gz:5"]
  assert (page["url"], page["date"], page["content_type"]) == (
      "https://www.news.example.com/a/1", "2021-05-02T10:00:00Z", "text/html")
  assert " ".join(_article(1).split("\n\n")[0].split()) in " ".join(page["text"].split())
  assert not [m for m in messy_web.BOILERPLATE_MARKERS if m in page["text"]]
  assert records["crawl.warc.wet.gz:1"]["content_type"] == "text/plain"
  assert list(page) == ["text", "id", "url", "date", "content_type"]
  assert dict(corpora.read_documents(str(tmp_path / "out" / "*.jsonl")))  # text_files reads it
  report = (tmp_path / "out" / "report.md").read_text()
  assert "| skipped:status | 1 |" in report and "status 404" in report


def _one_line_error(excinfo, *parts):
  message = str(excinfo.value)
  assert "\n" not in message and all(p in message for p in parts), message


def test_bad_charset_is_one_line_naming_file_and_record_unless_dropped(crawl, tmp_path):
  with pytest.raises(corpora.CorpusError) as excinfo:
    local.curate(str(crawl / "crawl.warc.gz"), str(tmp_path / "out"), settings.load(), workers=1,
                 **QUIET)
  _one_line_error(excinfo, "crawl.warc.gz: record 17", "unknown charset 'x-no-such-charset'",
                  "on_bad_input=drop")
  assert not os.path.exists(tmp_path / "out")


def test_truncated_archive_keeps_the_records_before_the_cut_or_fails_in_one_line(crawl,
                                                                                 tmp_path):
  data = (crawl / "crawl.warc.gz").read_bytes()
  folder = tmp_path / "in"
  folder.mkdir()
  (folder / "cut.warc.gz").write_bytes(data[:len(data) // 2])
  with pytest.raises(corpora.CorpusError) as excinfo:
    local.curate(str(folder / "*"), str(tmp_path / "a"), settings.load(), workers=1, **QUIET)
  _one_line_error(excinfo, "cut.warc.gz: truncated after record", "on_bad_input=drop")
  assert not os.path.exists(tmp_path / "a")
  stats = local.curate(str(folder / "*"), str(tmp_path / "b"),
                       config_with(**{"input.on_bad_input": "drop", "quality.min_words": 20}),
                       workers=1, **QUIET)
  assert stats["dropped"]["bad_input:truncated"]["documents"] == 1
  assert stats["kept"]["documents"] >= 2  # the pages before the cut
  garbage = b"not a WARC record\r\n" * 3  # after the last record: damaged, not truncated
  (folder / "cut.warc.gz").write_bytes((crawl / "crawl.warc.wet.gz").read_bytes() + garbage)
  with pytest.raises(corpora.CorpusError) as excinfo:
    local.curate(str(folder / "*"), str(tmp_path / "c"), settings.load(), workers=1, **QUIET)
  _one_line_error(excinfo, "cut.warc.gz: damaged after record 1 (ArchiveLoadFailed",
                  "on_bad_input=drop")
  stats = local.curate(str(folder / "*"), str(tmp_path / "d"),
                       config_with(**{"input.on_bad_input": "drop", "quality.min_words": 20}),
                       workers=1, **QUIET)
  assert stats["dropped"]["bad_input:damaged"]["documents"] == 1
  assert stats["kept"]["documents"] == 1


def test_an_extractor_failure_on_one_page_is_counted_or_one_line(crawl, tmp_path, monkeypatch):
  original = extract.EXTRACTORS["resiliparse"]

  def flaky(html):
    if "Story 1" in html:
      raise RuntimeError("parser gave up")
    return original(html)
  monkeypatch.setitem(extract.EXTRACTORS, "resiliparse", flaky)
  config = config_with(**{"quality.min_words": 20})
  glob = str(crawl / "crawl.warc.gz")
  with pytest.raises(corpora.CorpusError) as excinfo:
    local.curate(glob, str(tmp_path / "a"), config, workers=1, **QUIET)
  _one_line_error(excinfo, "record 5", "resiliparse extractor failed (RuntimeError: parser")
  stats = local.curate(glob, str(tmp_path / "b"), config_with(**{
      "quality.min_words": 20, "input.on_bad_input": "drop"}), workers=1, **QUIET)
  # Story 1's page and its copy on the tag page (no block list here); the rest goes on.
  assert stats["dropped"]["bad_input:extraction"]["documents"] == 2
  assert stats["kept"]["documents"] == 3  # stories 0, 2 and the spam (casino: a copy of 0)


def test_pii_placeholders_replace_emails_ips_and_phones_only():
  text = ("Mail jane.doe+news@mail.example.co.uk or call +1 555-123-4567, (020) 7946 0958 or "
          "555.123.4567. Server 192.168.0.17 and 2001:db8:85a3:0:0:8a2e:370:7334, fe80::1. "
          "Python 3.11.2 costs $12.99 since 1999; version 10.0.0.1.2 and 999.1.1.1 are not IPs.")
  scrubbed, counts = pii.scrub(text, ("email", "ip", "phone"))
  assert counts == {"email": 1, "ip": 3, "phone": 3}, scrubbed
  assert "jane" not in scrubbed and "7946" not in scrubbed and "192.168" not in scrubbed
  for kept in ("3.11.2", "$12.99", "1999", "10.0.0.1.2", "999.1.1.1"):
    assert kept in scrubbed
  assert pii.scrub(text, ("email",))[1] == {"email": 1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A classifier of clean prose (positives) against junk pages' text (negatives), saved."""
  rng = random.Random(0)
  prose = list(messy.clean_documents(docstrings=False))
  vocabulary = sorted({w.lower() for t in prose for w in t.split() if w.isalpha()})
  junk = [messy_web.junk_text(kind, rng, vocabulary) for kind in messy_web.JUNK_KINDS
          for _ in range(40)]
  ids = [f"+{i}" for i in range(len(prose))] + [f"-{i}" for i in range(len(junk))]
  held = classifier.heldout_split(ids, 0.3)
  model = classifier.train(prose, junk, heldout=held)
  directory = str(tmp_path_factory.mktemp("classifier") / "model")
  classifier.save(model, directory)
  return model, directory, prose + junk, held


def test_classifier_separates_held_out_prose_from_junk_and_reloads_exactly(trained):
  model, directory, texts, held = trained
  assert model.info["heldout_auc"] >= 0.95, model.info  # measured: 1.0
  assert sorted(os.listdir(directory)) == ["classifier.json", "coef.npy"]  # no pickle
  loaded = classifier.load(directory)
  assert np.array_equal(loaded.scores(texts), model.scores(texts))
  assert loaded.info["heldout_auc"] == model.info["heldout_auc"]
  # The same probabilities as scikit-learn's own predict_proba on the hashed features.
  from sklearn.linear_model import LogisticRegression
  regression = LogisticRegression()
  regression.classes_, regression.coef_ = np.array([0, 1]), model.coef[None]
  regression.intercept_ = np.array([model.intercept])
  x = model.features.vectorizer().transform(texts[:20])
  np.testing.assert_allclose(regression.predict_proba(x)[:, 1], model.scores(texts[:20]),
                             rtol=1e-12)
  labels = np.r_[np.ones(len(texts) - 200), np.zeros(200)]
  assert roc_auc_score(labels[held], loaded.scores([t for t, h in zip(texts, held) if h])) \
      == model.info["heldout_auc"]


def test_classifier_files_that_do_not_fit_are_one_line(trained, tmp_path):
  _, directory, _, _ = trained
  with pytest.raises(classifier.ClassifierError, match="no readable classifier there"):
    classifier.load(str(tmp_path / "missing"))
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "classifier.json").write_text(open(os.path.join(directory, "classifier.json")).read())
  np.save(broken / "coef.npy", np.zeros(2**18))
  with pytest.raises(classifier.ClassifierError, match="does not match classifier.json"):
    classifier.load(str(broken))


def test_pareto_sampling_is_gpt3s_rule_seeded_per_document():
  config = settings.load().classifier
  hashes = [f"{i:032x}" for i in range(4000)]
  for score in (0.2, 0.9):
    kept = np.mean([classifier.keeps(score, h, config) for h in hashes])
    assert abs(kept - (2 - score) ** -config.alpha) < 0.03  # P(Lomax(9) > 1 - score)
  assert [classifier.keeps(0.9, h, config) for h in hashes[:50]] == \
      [classifier.keeps(0.9, h, config) for h in hashes[:50]]
  threshold = config_with(**{"classifier.keep": "threshold", "classifier.threshold": 0.6})
  assert classifier.keeps(0.6, hashes[0], threshold.classifier)
  assert not classifier.keeps(0.59, hashes[0], threshold.classifier)


def test_classifier_stage_reports_its_histogram_and_examples(trained, crawl, tmp_path):
  _, directory, _, _ = trained
  stats = local.curate(str(crawl / "*.gz"), str(tmp_path / "out"), config_with(**{
      "input.on_bad_input": "drop", "quality.min_words": 20, "classifier.model": directory,
      "classifier.keep": "threshold", "classifier.threshold": 0.5, "pii.enabled": True}),
      workers=1, **QUIET)
  histogram = stats["classifier"]
  assert sum(histogram["kept"]) + sum(histogram["dropped"]) == 7  # all that reached it
  assert not any(histogram["dropped"][5:]) and not any(histogram["kept"][:5])
  assert stats["dropped"]["classifier"]["documents"] == sum(histogram["dropped"]) >= 1  # spam
  assert [e["id"] for e in histogram["examples"]["dropped"]] == ["crawl.warc.gz:19"]
  assert histogram["examples"]["kept"] and all(e["score"] >= 0.5
                                               for e in histogram["examples"]["kept"])
  report = (tmp_path / "out" / "report.md").read_text()
  assert "## Quality classifier" in report and "Kept with the lowest scores" in report


def test_config_refuses_unknown_extractor_and_missing_classifier_before_writing(tmp_path):
  # The choices settings checks are the registries' keys.
  assert settings.EXTRACTORS == tuple(extract.EXTRACTORS) and settings.PII_KINDS == tuple(
      pii.PATTERNS)
  with pytest.raises(settings.ConfigError, match="web.extractor='boilerpipe': must be one of"):
    config_with(**{"web.extractor": "boilerpipe"})
  with pytest.raises(settings.ConfigError, match="classifier.keep='top': must be 'pareto' or"):
    config_with(**{"classifier.keep": "top"})
  (tmp_path / "a.txt").write_text("x")
  with pytest.raises(classifier.ClassifierError, match="classifier.model="):
    local.curate(str(tmp_path / "a.txt"), str(tmp_path / "out"),
                 config_with(**{"classifier.model": str(tmp_path / "none")}), **QUIET)
  with pytest.raises(urls.BlocklistError, match="web.blocklist="):
    local.curate(str(tmp_path / "a.txt"), str(tmp_path / "out"),
                 config_with(**{"web.blocklist": str(tmp_path / "none.txt")}), **QUIET)
  assert sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_benchmark_reports_extraction_in_pages_per_second(crawl):
  rows = throughput_lib.measure(str(crawl / "crawl.warc.gz"),
                            config_with(**{"input.on_bad_input": "drop"}), repeats=1)
  extraction = {r["stage"]: r for r in rows}["extract (resiliparse)"]
  assert extraction["pages"] == 6 and extraction["pages_per_s"] > 0  # HTML pages decoded


@pytest.mark.e2e
def test_warc_to_curated_to_token_shards_through_the_scripts(crawl, trained, tmp_path):
  """The crawl example's commands, small: WARC -> curate (classifier, PII) -> prepare_data."""
  _, directory, _, _ = trained

  def run(*args):
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])
  curated = run("experiments.curate", f"--input={crawl}/*.gz", f"--output={tmp_path}/clean",
                "--config.input.on_bad_input=drop", "--config.quality.min_words=20",
                f"--config.web.blocklist={crawl}/blocklist.txt",
                f"--config.classifier.model={directory}", "--config.classifier.alpha=1",
                "--config.pii.enabled=true", "--workers=1")
  assert curated["kept"] >= 1 and curated["dropped"]["skipped:status"] == 1
  prepared = run("experiments.prepare_data", f"--input={tmp_path}/clean",
                 f"--output={tmp_path}/tokens", "--vocab_size=512", "--workers=1")
  manifest = json.load(open(tmp_path / "tokens" / "manifest.json"))
  assert manifest["documents"] == curated["kept"] and manifest["tokens"] > 0, prepared
