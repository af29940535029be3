"""Tests for jaxlm.corpora: the three corpora, deterministic splits, preparation safety, errors."""

import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import tensorflow_datasets as tfds

from jaxlm import corpora
from jaxlm.config import DataConfig
from tests.conftest import REPO


def _unit(identity: str) -> float:
  """The documented split hash, recomputed independently."""
  return int.from_bytes(hashlib.sha256(identity.encode()).digest()[:8], "big") / 2.0**64


def _digests(texts):
  return sorted(hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest() for t in texts)


def _paths(documents):
  """Identities stored beside the text (read through the underlying TFDS source)."""
  return [example["path"].decode() for example in documents._source]


def _variant_dirs(root):
  """Dataset variant folders that TFDS would treat as complete."""
  return [d for d, _, files in os.walk(root) if "dataset_info.json" in files]


# ----------------------------------------------------------------------------------------------
# pystdlib

@pytest.fixture(scope="session")
def stdlib(tmp_path_factory):
  data = DataConfig(data_dir=str(tmp_path_factory.mktemp("corpora_data")))
  return data, corpora.load_split(data, "train"), corpora.load_split(data, "validation")


def _expected_stdlib_texts():
  """Non-blank *.py files of the stdlib, outside site-packages and test folders."""
  root = sysconfig.get_paths()["stdlib"]
  texts = {}
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in {
        "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "testing"}]
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
          text = f.read().decode("utf-8", "replace")
        if text.strip():
          texts[os.path.relpath(path, root)] = text
  return texts


def test_pystdlib_holds_every_stdlib_file_once_and_exactly(stdlib):
  _, train, validation = stdlib
  expected = _expected_stdlib_texts()
  assert len(expected) > 500
  assert _digests(list(train) + list(validation)) == _digests(expected.values())
  assert not any("site-packages" in p or "/test/" in f"/{p}" for p in _paths(train))
  assert all(isinstance(t, str) for t in validation)


def test_pystdlib_validation_is_the_sha256_share_of_whole_files(stdlib):
  _, train, validation = stdlib
  val_paths, train_paths = _paths(validation), _paths(train)
  assert not set(val_paths) & set(train_paths)
  assert all(_unit(p) < 0.05 for p in val_paths)
  assert all(_unit(p) >= 0.05 for p in train_paths)
  assert 0.02 < len(validation) / (len(train) + len(validation)) < 0.10


def test_documents_is_a_random_access_sequence(stdlib):
  _, _, validation = stdlib
  n = len(validation)
  assert validation[-1] == validation[n - 1]
  assert validation[1:3] == [validation[1], validation[2]]
  assert list(validation)[:2] == validation[:2]
  with pytest.raises(IndexError):
    validation[n]  # pylint: disable=pointless-statement


def test_load_split_is_idempotent_and_does_not_prepare_again(stdlib, monkeypatch):
  data, train, _ = stdlib
  info = _variant_dirs(os.path.join(data.data_dir, "tfds", "pystdlib"))
  assert len(info) == 1
  mtime = os.path.getmtime(os.path.join(info[0], "dataset_info.json"))

  def fail(*args, **kwargs):
    raise AssertionError("prepared twice")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
  again = corpora.load_split(data, "train")
  assert len(again) == len(train) and again[0] == train[0] and again[-1] == train[-1]
  assert os.path.getmtime(os.path.join(info[0], "dataset_info.json")) == mtime


def test_pystdlib_corpus_id_is_stable(stdlib):
  data, _, _ = stdlib
  cid = corpora.corpus_id(data)
  assert cid == corpora.corpus_id(data)
  assert cid.startswith(f"pystdlib-{platform.python_version()}-") and cid.endswith("-val0.05")
  assert corpora.corpus_id(dataclasses.replace(data, validation_fraction=0.1)) != cid


def test_unknown_split_name():
  with pytest.raises(corpora.CorpusError, match="split='test'"):
    corpora.load_split(DataConfig(), "test")


# ----------------------------------------------------------------------------------------------
# text_files

def _write(path, content):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(content if isinstance(content, bytes) else content.encode())
  return str(path)


def _text_files_data(tmp_path, files, **kwargs):
  kwargs.setdefault("validation_fraction", 0.5)
  return DataConfig(corpus="text_files", files=files, data_dir=str(tmp_path / "data"), **kwargs)


def test_text_files_reads_text_markdown_and_jsonl(tmp_path):
  src = tmp_path / "src"
  _write(src / "a.txt", "first\r\nwindows line\r\n")
  _write(src / "b.md", "# Title\n\n\tindented  text  \n")
  _write(src / "deep" / "c.txt", b"latin-1 \xe9 byte\n")
  _write(src / "empty.txt", "  \n")
  _write(src / "d.jsonl", "\n".join([json.dumps({"text": "json one", "id": 1}), "",
                                     json.dumps({"text": "json two\nwith newline"}),
                                     json.dumps({"text": "   "})]) + "\n")
  data = _text_files_data(tmp_path, f"{src}/*.txt, {src}/**/*.md,{src}/deep/*.txt,{src}/*.jsonl")
  train = corpora.load_split(data, "train")
  validation = corpora.load_split(data, "validation")
  expected = ["first\r\nwindows line\r\n", "# Title\n\n\tindented  text  \n",
              "latin-1 \ufffd byte\n", "json one", "json two\nwith newline"]
  assert _digests(list(train) + list(validation)) == _digests(expected)
  assert len(train) and len(validation)
  for path in _paths(validation):
    assert _unit(path) < 0.5 or len(validation) == 1
  assert "d.jsonl:3" in _paths(train) + _paths(validation)  # relative to the files' folder
  # The same files in another folder split the same way (a copied corpus, a fresh temp dir).
  moved = tmp_path / "elsewhere" / "corpus"
  shutil.copytree(src, moved)
  data = _text_files_data(tmp_path / "elsewhere", ",".join(
      p.replace(str(src), str(moved)) for p in data.files.split(",")))
  assert _digests(corpora.load_split(data, "validation")) == _digests(validation)


def test_text_files_changed_file_is_prepared_again(tmp_path):
  src = tmp_path / "src"
  _write(src / "a.txt", "alpha\n")
  _write(src / "b.txt", "beta\n")
  data = _text_files_data(tmp_path, f"{src}/*.txt")
  before = corpora.corpus_id(data)
  assert before.startswith("text_files-")
  assert sorted(corpora.load_split(data, "train")[:] + corpora.load_split(data, "validation")[:]) \
      == ["alpha\n", "beta\n"]
  _write(src / "b.txt", "beta, longer now\n")
  assert corpora.corpus_id(data) != before
  texts = corpora.load_split(data, "train")[:] + corpora.load_split(data, "validation")[:]
  assert sorted(texts) == ["alpha\n", "beta, longer now\n"]


def test_two_documents_always_give_two_nonempty_splits(tmp_path):
  src = tmp_path / "src"
  _write(src / "a.txt", "alpha\n")
  _write(src / "b.txt", "beta\n")
  for fraction in (0.01, 0.99):
    data = _text_files_data(tmp_path, f"{src}/*.txt", validation_fraction=fraction)
    assert len(corpora.load_split(data, "train")) == 1
    assert len(corpora.load_split(data, "validation")) == 1


@pytest.mark.parametrize("files, content, match", [
    ("nothing/*.txt", None, r"glob '.*nothing/\*\.txt' matched no files.*quote"),
    ("*.jsonl", b'{"text": "ok"}\n{not json\n', r"bad\.jsonl:2: not valid JSON"),
    ("*.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r"bad\.jsonl:2: no field 'text'.*text_key"),
    ("*.jsonl", b'{"text": 3}\n', r"bad\.jsonl:1: field 'text' is a int"),
    ("*.jsonl", b'\n{"text": " "}\n', r"no non-empty documents"),
    ("*.jsonl", b'{"text": "only one"}\n', r"only 1 non-empty document .*add at least one"),
])
def test_text_files_errors_name_the_problem(tmp_path, files, content, match):
  if content is not None:
    _write(tmp_path / "bad.jsonl", content)
  data = _text_files_data(tmp_path, str(tmp_path / files))
  with pytest.raises(corpora.CorpusError, match=match):
    corpora.load_split(data, "train")
  assert not _variant_dirs(data.data_dir)  # nothing that looks prepared was left behind


def test_files_read_directly_name_the_flags_of_their_script(tmp_path):
  """evaluate --text_files has --text_key, not --config.data.text_key."""
  _write(tmp_path / "bad.jsonl", b'{"body": "x"}\n')
  with pytest.raises(corpora.CorpusError, match=r"bad\.jsonl:1: no field 'text' .*set --text_key"):
    corpora.read_documents(str(tmp_path / "*.jsonl"))
  with pytest.raises(corpora.CorpusError, match=r"--text_files glob .* matched no files"):
    corpora.read_documents(str(tmp_path / "*.txt"))
  with pytest.raises(corpora.CorpusError, match=r"--text_files='.*' is a directory; name its "
                                                r"files with a glob, e.g. --text_files="
                                                r"'.*\*\*/\*\.txt'"):
    corpora.read_documents(str(tmp_path))
  _write(tmp_path / "latin1.txt", "café au lait\n".encode("latin-1"))
  with pytest.raises(corpora.CorpusError, match=r"latin1\.txt is not UTF-8 text \(invalid "
                                                r"continuation byte at byte 3\)"):
    corpora.read_documents(str(tmp_path / "*.txt"))


def test_text_files_over_the_in_memory_limit_needs_tensorflow(tmp_path, monkeypatch):
  from tensorflow_datasets.core import shuffle  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 10)
  _write(tmp_path / "src" / "a.txt", "more than ten bytes of text\n")
  data = _text_files_data(tmp_path, str(tmp_path / "src" / "*.txt"))
  with pytest.raises(corpora.CorpusError, match="tensorflow"):
    corpora.load_split(data, "train")


# ----------------------------------------------------------------------------------------------
# Preparation safety: crashes and concurrent preparers.

_PREPARE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from jaxlm import corpora
    from jaxlm.config import DataConfig
    mode = sys.argv[1]
    original = corpora._iter_documents
    def patched(files, text_key):
      for number, document in enumerate(original(files, text_key)):
        if mode == "crash" and number == 3:
          os._exit(17)  # like a kill: no cleanup runs
        time.sleep(0.05)  # slow enough that two preparers overlap
        yield document
    corpora._iter_documents = patched
    data = DataConfig(corpus="text_files", files={files!r}, data_dir={data_dir!r},
                      validation_fraction=0.5)
    docs = list(corpora.load_split(data, "train")) + list(corpora.load_split(data, "validation"))
    print(len(docs))
""")


def _prepare_script(tmp_path):
  src = tmp_path / "src"
  for i in range(8):
    _write(src / f"{i}.txt", f"document {i}\n")
  script = tmp_path / "prepare.py"
  script.write_text(_PREPARE_SCRIPT.format(repo=REPO, files=f"{src}/*.txt",
                                           data_dir=str(tmp_path / "data")))
  return str(script), _text_files_data(tmp_path, f"{src}/*.txt")


@pytest.mark.e2e
def test_killed_prepare_does_not_look_complete(tmp_path):
  script, data = _prepare_script(tmp_path)
  crashed = subprocess.run([sys.executable, script, "crash"], capture_output=True, timeout=120)
  assert crashed.returncode == 17
  assert not _variant_dirs(data.data_dir)
  assert any("incomplete" in d for d, _, _ in os.walk(data.data_dir))  # the abandoned attempt
  docs = list(corpora.load_split(data, "train")) + list(corpora.load_split(data, "validation"))
  assert sorted(docs) == [f"document {i}\n" for i in range(8)]
  assert not any("incomplete" in d for d, _, _ in os.walk(data.data_dir))  # cleaned up


@pytest.mark.e2e
def test_concurrent_preparers_do_not_corrupt(tmp_path):
  script, data = _prepare_script(tmp_path)
  runs = [subprocess.Popen([sys.executable, script, "slow"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE) for _ in range(2)]
  outputs = [run.communicate(timeout=120) for run in runs]
  assert [run.returncode for run in runs] == [0, 0], outputs[0][1][-2000:]
  assert [out.split()[-1] for out, _ in outputs] == [b"8", b"8"]
  # The lock made the second process wait and reuse the first one's dataset.
  assert sum(b"Downloading and preparing" in err for _, err in outputs) == 1  # progress: stderr
  assert len(_variant_dirs(data.data_dir)) == 1


# ----------------------------------------------------------------------------------------------
# TFDS by name

class JaxlmTestPoems(tfds.core.GeneratorBasedBuilder):
  """A registered TFDS dataset that needs no download: prepared for real, through our path."""
  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # see corpora._FilesBuilder

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"poem": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(10), "test": self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"poem": f"poem {i} — ünïcode\n", "label": i % 2}


def _tfds_data(tmp_path, name, **kwargs):
  return DataConfig(corpus="tfds", tfds_name=name, data_dir=str(tmp_path / "data"), **kwargs)


def test_tfds_dataset_is_prepared_as_array_record_and_decoded_to_str(tmp_path):
  data = _tfds_data(tmp_path, "jaxlm_test_poems", text_key="poem",
                    train_split="train[:50%]", validation_split="test")
  train = corpora.load_split(data, "train")
  validation = corpora.load_split(data, "validation")
  poems = [f"poem {i} — ünïcode\n" for i in range(10)]
  assert len(train) == 5 and len(set(train[:])) == 5 and set(train[:]) <= set(poems)
  assert sorted(validation[:]) == poems[:4]
  files = [f for _, _, fs in os.walk(data.data_dir) for f in fs]
  assert any(".array_record-" in f for f in files)
  cid = corpora.corpus_id(data)
  assert re.fullmatch(r"tfds-jaxlm_test_poems-1\.0\.0-poem-splits[0-9a-f]{8}", cid), cid
  other = dataclasses.replace(data, train_split="train[50%:]")
  assert corpora.corpus_id(other) != cid


def test_tfds_unknown_split_names_the_available_ones(tmp_path):
  data = _tfds_data(tmp_path, "jaxlm_test_poems", text_key="poem")
  with pytest.raises(corpora.CorpusError, match=r"validation_split='validation'.*train, test"):
    corpora.load_split(data, "validation")


def test_tfds_mock_data_documents_are_str(tmp_path):
  data = _tfds_data(tmp_path, "tiny_shakespeare")
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    train = corpora.load_split(data, "train")
    assert len(train) == 3
    assert all(isinstance(t, str) and t for t in train)
  assert corpora.corpus_id(data) == "tfds-tiny_shakespeare-1.0.0"


def test_tfds_bytes_values_are_decoded():
  documents = corpora.Documents([{"text": "é\n".encode()}, {"text": "plain"}], "text", "fake")
  assert list(documents) == ["é\n", "plain"]


def test_tfds_unknown_name_fails_fast_without_writing(tmp_path):
  data = _tfds_data(tmp_path, "tiny_shakespear")
  with pytest.raises(corpora.CorpusError, match=r"unknown TFDS dataset 'tiny_shakespear'.*"
                                                r"did you mean tiny_shakespeare"):
    corpora.load_split(data, "train")
  with pytest.raises(corpora.CorpusError, match="unknown TFDS dataset"):
    corpora.corpus_id(data)
  assert not os.path.exists(data.data_dir)


def test_tfds_missing_text_key(tmp_path):
  data = _tfds_data(tmp_path, "tiny_shakespeare", text_key="content")
  with pytest.raises(corpora.CorpusError, match="no feature 'content'.*features are: text"):
    corpora.load_split(data, "train")


def test_tfds_not_prepared_and_not_downloadable(tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise ConnectionError("no network")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
  data = _tfds_data(tmp_path, "tiny_shakespeare")
  with pytest.raises(corpora.CorpusError, match=r"not prepared .*tfds build tiny_shakespeare "
                                                r"--data_dir=.*--file_format=array_record"):
    corpora.load_split(data, "train")
