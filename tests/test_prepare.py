"""prepare_data: every input kind to shards and back, determinism across workers, units and
engines, resume, the manifest, and bad input refused in one line before anything is written."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxlm import prepare, shards, sources
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.textfiles import CorpusError
from tests.conftest import REPO
from tests.helpers import expected_split, shard_documents, stdlib_texts, write_corpus

SETTINGS = prepare.PrepareSettings(validation_fraction=0.2, shard_tokens=20_000, unit_mb=0.05,
                                   vocab_size=400, tokenizer_max_sentences=3000)


def inputs(folder) -> str:
  return f"{folder}/raw/*,{folder}/curated"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  folder = tmp_path_factory.mktemp("corpus")
  return folder, write_corpus(folder)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
  """The corpus prepared on 2 workers, a SentencePiece tokenizer trained on a sample."""
  folder, _ = corpus
  output = tmp_path_factory.mktemp("prepared") / "shards"
  logs = []
  manifest = prepare.prepare(inputs(folder), str(output), settings=SETTINGS, workers=2,
                             log=logs.append)
  return output, manifest, logs


def test_every_input_kind_round_trips_through_the_shards(corpus, prepared):
  """.jsonl (ids where given, else file@offset), .jsonl.gz, .jsonl.zst, parquet (ids where
  given, else file#row), .txt, .md and a curated folder: each document lands whole in the split
  its identity hashes to, and decodes back to its exact text."""
  _, documents = corpus
  output, manifest, _ = prepared
  for split in shards.SPLITS:
    got = shard_documents(output, split)
    assert sorted(got) == sorted(expected_split(documents, SETTINGS.validation_fraction, split))
  assert manifest["documents"] == len(documents) == 30
  assert 0 < manifest["splits"]["validation"]["documents"] < manifest["documents"] / 2


def test_the_manifest_describes_the_files(prepared):
  output, manifest, _ = prepared
  tokenizer = shards.load_tokenizer(str(output), manifest)
  assert manifest["tokenizer"] == shards.fingerprint(tokenizer) and manifest["tokenizer_trained"]
  assert (manifest["vocab_size"], manifest["dtype"]) == (400, "uint16")
  entries = manifest["shards"]
  assert sum(e["tokens"] for e in entries) == manifest["tokens"]
  assert [e["file"] for e in entries if e["split"] == "train"][:2] == ["train-00000.npy",
                                                                      "train-00001.npy"]
  byte_lengths = tokenizer.byte_lengths()
  for entry in entries:
    tokens = np.load(output / entry["file"])
    assert len(tokens) == entry["tokens"] and tokens.dtype == np.uint16
    assert entry["tokens"] == SETTINGS.shard_tokens or entry == [
        e for e in entries if e["split"] == entry["split"]][-1]  # (only a split's last is short)
    assert shards.file_sha256(str(output / entry["file"])) == entry["sha256"]
    assert entry["bytes"] == int(byte_lengths[tokens].sum())
    starts = np.load(output / entry["docs"])
    assert len(starts) == entry["documents"]
  total_bytes = sum(len(t.encode()) for split in shards.SPLITS
                    for t in shard_documents(output, split))
  assert manifest["bytes"] == total_bytes
  assert sorted(os.listdir(output))[-3:] == ["validation-00000.npy", "validation-00001.docs.npy",
                                             "validation-00001.npy"] or ".work" not in os.listdir(
                                                 output)
  assert ".work" not in os.listdir(output)


def test_shards_are_identical_whatever_the_workers_units_and_engine(corpus, prepared,
                                                                    tmp_path):
  """The same input and tokenizer -> byte-identical shards: 1 worker instead of 2, units 20x
  larger, and Beam's DirectRunner; a given tokenizer file instead of a trained one."""
  folder, _ = corpus
  output, manifest, _ = prepared
  given = str(output / "tokenizer.model")
  runs = {
      "one worker": dict(workers=1),
      "large units": dict(workers=2, settings=dataclass_replace(SETTINGS, unit_mb=1.0)),
  }
  for name, kwargs in runs.items():
    other = tmp_path / name.replace(" ", "_")
    prepare.prepare(inputs(folder), str(other), given, **{"settings": SETTINGS, **kwargs},
                    log=lambda _: None)
    for entry in manifest["shards"]:
      for key in ("file", "docs"):
        assert (other / entry[key]).read_bytes() == (output / entry[key]).read_bytes(), name
  beam = pytest.importorskip("jaxlm.prepare_beam")
  pytest.importorskip("apache_beam")
  other = tmp_path / "beam"
  beam.prepare_on_beam(inputs(folder), str(other), given, SETTINGS,
                       ["--runner=DirectRunner"], log=lambda _: None)
  single = tmp_path / "one_worker"
  assert sorted(os.listdir(other)) == sorted(os.listdir(single))
  for name in os.listdir(single):
    assert (other / name).read_bytes() == (single / name).read_bytes(), name


def dataclass_replace(settings, **changes):
  import dataclasses
  return dataclasses.replace(settings, **changes)


def test_an_interrupted_preparation_resumes_without_redoing_finished_work(corpus, prepared,
                                                                          tmp_path):
  """Half the units tokenized (their markers written) and one shard written before the
  'interruption': the rerun redoes neither, and ends with the same shards as one clean run."""
  folder, _ = corpus
  output, manifest, _ = prepared
  given = str(output / "tokenizer.model")
  target = tmp_path / "resumed"
  plan = prepare.make_plan(inputs(folder), str(target), given, SETTINGS)
  tasks = prepare.plan_units(plan)
  tokenizer = tokenizer_lib.load_tokenizer(given)
  for task in tasks[:len(tasks) // 2]:
    prepare.tokenize_unit(task, SETTINGS, tokenizer, plan.work)
  logs = []
  prepare.prepare(inputs(folder), str(target), given, SETTINGS, workers=2, log=logs.append)
  assert f"{len(tasks) // 2} of {len(tasks)} units already tokenized" in logs
  assert sum("tokenized (" in line for line in logs) == len(tasks) - len(tasks) // 2
  for entry in manifest["shards"]:
    assert (target / entry["file"]).read_bytes() == (output / entry["file"]).read_bytes()
  again = []
  prepare.prepare(inputs(folder), str(target), given, SETTINGS, workers=2, log=again.append)
  assert again == [f"{target} already holds these shards ({manifest['tokens']:,} tokens); "
                   f"nothing to do."]
  with pytest.raises(prepare.PrepareError, match=r"other settings: --validation_fraction=0\.3 "
                                                 r"\(it used 0\.2\); choose a new folder"):
    prepare.prepare(inputs(folder), str(target), given,
                    dataclass_replace(SETTINGS, validation_fraction=0.3), log=lambda _: None)


def test_a_tiny_corpus_still_gets_both_splits(tmp_path):
  """Two documents that both hash to train: the one nearest the line moves to validation (as
  the text_files corpus does); one document is refused."""
  texts = stdlib_texts("json", 2)
  (tmp_path / "in").mkdir()
  for i, text in enumerate(texts):
    (tmp_path / "in" / f"{i}.txt").write_text(text)
  settings = dataclass_replace(SETTINGS, validation_fraction=1e-9, vocab_size=512)
  manifest = prepare.prepare(f"{tmp_path}/in/*.txt", str(tmp_path / "out"), settings=settings,
                             workers=1, log=lambda _: None)
  assert manifest["splits"]["validation"]["documents"] == 1
  assert manifest["splits"]["train"]["documents"] == 1
  with pytest.raises(prepare.PrepareError, match="1 non-empty document"):
    prepare.prepare(f"{tmp_path}/in/0.txt", str(tmp_path / "one"), settings=settings,
                    workers=1, log=lambda _: None)


def test_a_large_text_file_is_read_in_pieces_and_stays_one_document(tmp_path):
  text = "\n".join(stdlib_texts("json"))
  (tmp_path / "big.txt").write_text(text)
  (tmp_path / "small.txt").write_text(stdlib_texts("http", 1)[0])
  settings = dataclass_replace(SETTINGS, unit_mb=0.01)  # ~10 KB pieces
  files = sources.list_inputs(f"{tmp_path}/*.txt")
  units = sources.plan_units(files, settings.unit_bytes, "text")
  assert len(units) > 5
  pieces = [d for u in units for d in sources.documents(u, "text", "id")]
  assert "".join(d.text for d in pieces if d.identity == "big.txt") == text
  assert sum(d.starts for d in pieces) == sum(d.ends for d in pieces) == 2
  manifest = prepare.prepare(f"{tmp_path}/*.txt", str(tmp_path / "out"), settings=settings,
                             workers=1, log=lambda _: None)
  assert manifest["documents"] == 2


# -- Bad input: one line naming the file or option and the fix, nothing written ------------------

def refused(tmp_path, pattern, match, tokenizer="", settings=SETTINGS):
  output = tmp_path / "out"
  with pytest.raises((CorpusError, prepare.PrepareError)) as error:
    prepare.prepare(pattern, str(output), tokenizer, settings, workers=1, log=lambda _: None)
  message = str(error.value)
  assert "\n" not in message
  assert any(m in message for m in match) if isinstance(match, tuple) else match in message, \
      message
  assert not output.exists()
  return message


def test_truncated_and_damaged_inputs_are_refused_before_anything_is_written(tmp_path):
  records = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in stdlib_texts("json"))
  import zstandard
  for name, content in (("cut.jsonl.gz", gzip.compress(records)[:-40]),
                        ("cut.jsonl.zst", zstandard.ZstdCompressor().compress(records)[:-40]),
                        ("cut.jsonl", records[:-40]),
                        ("cut.parquet", b"PAR1 not really"),
                        ("garbage.jsonl.gz", b"\x1f\x8b\x08\x00 this is not gzip")):
    folder = tmp_path / name.replace(".", "_")
    folder.mkdir()
    (folder / name).write_bytes(content)
    (folder / "fine.jsonl").write_bytes(records)
    message = refused(folder, f"{folder}/*", str(folder / name))
    assert "cannot be read" in message or "not a readable parquet" in message or "not JSON" \
        in message, message


def test_wrong_fields_columns_options_and_folders_are_refused(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  (tmp_path / "p").mkdir()
  pq.write_table(pa.table({"content": ["a b c"] * 3}), tmp_path / "p" / "x.parquet")
  refused(tmp_path, f"{tmp_path}/p/*.parquet", "has no column 'text' (columns: content); set "
                                              "--text_key")
  pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "p" / "x.parquet")
  refused(tmp_path, f"{tmp_path}/p/*.parquet", "column 'text' holds int64, not text")
  (tmp_path / "j").mkdir()
  (tmp_path / "j" / "x.jsonl").write_text('{"body": "hello"}\n')
  refused(tmp_path, f"{tmp_path}/j/*.jsonl", "no field 'text' (found: body); set --text_key")
  refused(tmp_path, f"{tmp_path}/nothing/*.jsonl", "matched no files")
  refused(tmp_path, f"{tmp_path}/j", "not a curated corpus")
  (tmp_path / "z").mkdir()
  (tmp_path / "z" / "x.tar.gz").write_bytes(b"\x1f\x8b")
  refused(tmp_path, f"{tmp_path}/z/*", "compressed files are read as .jsonl.gz or .jsonl.zst")
  (tmp_path / "t").mkdir()
  (tmp_path / "t" / "x.txt").write_text("text")
  refused(tmp_path, f"{tmp_path}/t/*", "--tokenizer: tokenizer file", tokenizer="/no/such.model")
  refused(tmp_path, f"{tmp_path}/t/*", "--validation_fraction=1.5",
          settings=dataclass_replace(SETTINGS, validation_fraction=1.5))
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "notes.txt").write_text("mine")
  with pytest.raises(prepare.PrepareError, match="already holds other files"):
    prepare.prepare(f"{tmp_path}/t/*", str(tmp_path / "out"), settings=SETTINGS, workers=1,
                    log=lambda _: None)
  assert os.listdir(tmp_path / "out") == ["notes.txt"]


@pytest.mark.e2e
def test_the_script_prepares_and_reports_errors_in_one_line(corpus, tmp_path):
  folder, documents = corpus
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *args: subprocess.run([sys.executable, "-m", "experiments.prepare_data", *args],
                                     cwd=REPO, env=env, capture_output=True, text=True,
                                     timeout=300)
  result = run(f"--input={folder}/raw/*.jsonl*", f"--output={tmp_path}/out", "--vocab_size=512",
               "--validation_fraction=0.3", "--workers=2")
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(result.stdout)
  assert summary["documents"] == 16 and summary["tokens"] > 10_000
  assert summary["pretrain_with"] == (f"--config.data.corpus=tokens "
                                      f"--config.data.tokens={tmp_path}/out")
  result = run(f"--input={folder}/raw/*.parquet", f"--output={tmp_path}/bad", "--text_key=body")
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.startswith("error: --input file ") and result.stderr.count("\n") == 1
  assert "has no column 'body'" in result.stderr


def test_identities_that_cannot_split_are_refused_and_leave_nothing(tmp_path):
  """Every record with the same id: one identity, nothing to split by (refused, nothing left
  behind); empty ids are no identity: documents are named by their place instead."""
  texts = stdlib_texts("json")
  (tmp_path / "same.jsonl").write_text("".join(json.dumps({"text": t, "id": 1}) + "\n"
                                               for t in texts))
  message = refused(tmp_path, str(tmp_path / "same.jsonl"), "--id_key='id' field holds the "
                                                             "same value in every record")
  assert "--id_key=''" in message
  (tmp_path / "empty.jsonl").write_text("".join(json.dumps({"text": t, "id": ""}) + "\n"
                                                for t in texts))
  manifest = prepare.prepare(str(tmp_path / "empty.jsonl"), str(tmp_path / "ok"),
                             settings=SETTINGS, workers=1, log=lambda _: None)
  assert manifest["splits"]["validation"]["documents"] >= 1
  assert manifest["splits"]["train"]["documents"] >= 1


def test_what_each_kind_of_file_is_read_as(tmp_path):
  """.json is JSON lines (Hugging Face's layout); a byte-order mark is not text; tables, binary
  and non-UTF-8 files are refused by name; the output folder inside the input glob is not read;
  a dictionary-encoded parquet column is text, an all-null one is refused."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  texts = stdlib_texts("json", 3)
  raw = tmp_path / "raw"
  raw.mkdir()
  (raw / "hf.json").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:2]))
  (raw / "bom.txt").write_bytes(b"\xef\xbb\xbf" + texts[2].encode())
  table = pa.table({"text": pa.array(texts[:2]).dictionary_encode()})
  pq.write_table(table, raw / "dict.parquet")
  settings = dataclass_replace(SETTINGS, validation_fraction=0.3, vocab_size=512)
  output = raw / "out"
  manifest = prepare.prepare(f"{raw}/**/*", str(output), settings=settings, workers=1,
                             log=lambda _: None)
  assert manifest["documents"] == 5
  got = shard_documents(output, "train") + shard_documents(output, "validation")
  assert sorted(got) == sorted(texts[:2] * 2 + texts[2:3])  # (the BOM dropped)
  again = []
  prepare.prepare(f"{raw}/**/*", str(output), settings=settings, workers=1, log=again.append)
  assert again[-1].endswith("nothing to do.")  # (its own shards are not inputs)
  for name, content, match in (
      ("table.csv", b"text,label\na,b\n", "a table; prepare_data reads JSON lines, parquet"),
      ("blob.bin", b"\x00\x01\x02 binary", "is binary (it holds NUL bytes)"),
      ("latin.txt", "Café naïve".encode("latin-1"), "is not UTF-8 text"),
      ("array.json", b'[{"text": "a"},\n {"text": "b"}]\n', "a JSON array: write one record")):
    folder = tmp_path / name.replace(".", "_")
    folder.mkdir()
    (folder / name).write_bytes(content)
    refused(folder, str(folder / name), match)
  nulls = tmp_path / "nulls"
  nulls.mkdir()
  pq.write_table(pa.table({"text": pa.array([None, None], pa.string())}), nulls / "n.parquet")
  refused(nulls, str(nulls / "n.parquet"), "holds no text (every value is null)")
  refused(tmp_path, str(raw / "hf.json"), "--unit_mb=0.001 must be at least 0.01",
          settings=dataclass_replace(SETTINGS, unit_mb=0.001))


@pytest.mark.e2e
def test_a_worker_that_dies_stops_the_preparation_in_one_line_and_the_rerun_finishes(tmp_path):
  """kill -9 of a worker (the out-of-memory killer's way): one line, exit 2, no hang; the rerun
  keeps the finished units and ends with the shards of an uninterrupted run."""
  texts = stdlib_texts("json") + stdlib_texts("email") + stdlib_texts("http")
  lines = "".join(json.dumps({"text": t + f"\n# copy {i}"}) + "\n"
                  for i in range(6) for t in texts)
  (tmp_path / "in.jsonl").write_text(lines)
  tokenizer = tmp_path / "tok"
  prepare.prepare(str(tmp_path / "in.jsonl"), str(tokenizer), settings=dataclass_replace(
      SETTINGS, vocab_size=512), workers=1, log=lambda _: None)
  args = [sys.executable, "-m", "experiments.prepare_data", f"--input={tmp_path}/in.jsonl",
          f"--tokenizer={tokenizer}/tokenizer.model", "--unit_mb=0.05", "--workers=2"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  process = subprocess.Popen(args + [f"--output={tmp_path}/out"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  import time

  import psutil
  deadline = time.time() + 120
  while time.time() < deadline and not (tmp_path / "out" / ".work" / "units").is_dir():
    time.sleep(0.05)
  while time.time() < deadline and len(os.listdir(tmp_path / "out" / ".work" / "units")) < 3:
    time.sleep(0.05)
  workers = [c for c in psutil.Process(process.pid).children() if "spawn" in " ".join(c.cmdline())]
  assert workers, "no worker process found"
  workers[0].kill()
  _, err = process.communicate(timeout=120)
  assert process.returncode == 2, err[-2000:]
  assert err.strip().splitlines()[-1].startswith("error: a worker process of prepare_data died")
  rerun = subprocess.run(args + [f"--output={tmp_path}/out"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert "units already tokenized" in rerun.stderr
  straight = subprocess.run(args + [f"--output={tmp_path}/straight"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
  assert straight.returncode == 0
  for name in sorted(os.listdir(tmp_path / "straight")):
    assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
