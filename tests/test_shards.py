"""Training on prepared shards (data.corpus=tokens): one folder or a mixture, exact resume, and
every way the shards can be wrong refused in one line before the run directory is touched."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import prepare, pretrain, shards
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.errors import UserError
from tests.helpers import losses, stdlib_texts

SETTINGS = prepare.PrepareSettings(validation_fraction=0.25, shard_tokens=6_000, unit_mb=0.05,
                                   vocab_size=512, tokenizer_max_sentences=3000)


def write_jsonl(path, texts):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """Two prepared folders sharing one tokenizer (code and prose-like text), and one with
  another tokenizer."""
  root = tmp_path_factory.mktemp("shards")
  write_jsonl(root / "in" / "code.jsonl", stdlib_texts("json") + stdlib_texts("email", 12))
  write_jsonl(root / "in" / "more.jsonl", stdlib_texts("http") + stdlib_texts("urllib"))
  quiet = lambda _: None
  prepare.prepare(str(root / "in" / "code.jsonl"), str(root / "code"), settings=SETTINGS,
                  workers=1, log=quiet)
  prepare.prepare(str(root / "in" / "more.jsonl"), str(root / "more"),
                  str(root / "code" / "tokenizer.model"), SETTINGS, workers=1, log=quiet)
  prepare.prepare(str(root / "in" / "more.jsonl"), str(root / "other"),
                  settings=dataclasses.replace(SETTINGS, vocab_size=400), workers=1, log=quiet)
  return root


def values(**data):
  return {"model": {"num_layers": 2, "num_heads": 2, "embed_dim": 32, "mlp_dim": 64,
                    "vocab_size": 512, "max_seq_len": 64},
          "data": {"corpus": "tokens", "seq_len": 64, **data},
          "train": {"num_steps": 8, "global_batch_size": 8, "log_every": 2, "eval_every": 4,
                    "eval_batches": 2, "checkpoint_every": 4, "sample_every": 0,
                    "sample_max_new_tokens": 8},
          "optim": {"warmup_steps": 2}}


@pytest.mark.e2e
def test_a_mixture_trains_by_weight_and_resumes_exactly(folders, tmp_path):
  mixture = f"{folders / 'code'}:0.75,{folders / 'more'}:0.25"
  config = config_lib.validate(values(mixture=mixture))
  straight = tmp_path / "straight"
  summary = pretrain.train(config, str(straight), show_progress=False)
  assert summary["finished"] and np.isfinite(summary["eval_loss"])
  records = [json.loads(line) for line in open(straight / "metrics.jsonl")]
  last = [r for r in records if "tokens_seen/code" in r][-1]
  assert last["step"] == 8
  assert (last["tokens_seen/code"], last["tokens_seen/more"]) == (48 * 64, 16 * 64)
  assert last["tokens_seen/code"] + last["tokens_seen/more"] == last["tokens_seen"]
  assert last["data_bytes_read"] == 8 * 8 * 65 * 2  # 8 batches of 8 windows of 65 uint16
  resumed = tmp_path / "resumed"
  pretrain.train(config, str(resumed), stop_at_step=3, show_progress=False)
  pretrain.train(config, str(resumed), show_progress=False)
  assert losses(resumed) == losses(straight)
  assert losses(resumed, "eval_loss") == losses(straight, "eval_loss")


def refused(config_values, workdir, match):
  with pytest.raises(UserError) as error:
    pretrain.train(config_lib.validate(config_values), str(workdir), show_progress=False)
  assert match in str(error.value) and "\n" not in str(error.value), str(error.value)
  assert not os.path.exists(workdir)


def test_broken_shard_folders_are_refused_before_the_run_starts(folders, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(folders / "code", broken)
  manifest = json.loads((broken / "manifest.json").read_text())
  first = manifest["shards"][0]["file"]
  run = tmp_path / "run"
  data = (broken / first).read_bytes()
  (broken / first).write_bytes(data[:-2] + bytes([data[-2] ^ 1]) + data[-1:])  # a flipped bit
  refused(values(tokens=str(broken)), run, f"shard {broken / first} is corrupted")
  (broken / first).write_bytes(data)
  docs = broken / manifest["shards"][0]["docs"]
  docs_data = docs.read_bytes()
  docs.write_bytes(docs_data[:-4] + b"\x7f\x7f\x7f\x7f")
  refused(values(tokens=str(broken)), run, f"{docs} is corrupted")
  docs.unlink()
  refused(values(tokens=str(broken)), run, f"{docs} (where the shard's documents start) is "
                                           f"missing")
  docs.write_bytes(docs_data)
  (broken / first).write_bytes(data[:-10])
  refused(values(tokens=str(broken)), run, f"shard {broken / first} has {len(data) - 10} bytes")
  (broken / first).unlink()
  refused(values(tokens=str(broken)), run, f"shard {broken / first} is missing")
  (broken / "tokenizer.model").write_bytes((folders / "other" / "tokenizer.model").read_bytes())
  refused(values(tokens=str(broken)), run, "is not the tokenizer the shards were encoded with")
  (broken / "manifest.json").unlink()
  refused(values(tokens=str(broken)), run, f"data.tokens={broken} has no manifest.json: not a "
                                           f"folder of token shards")
  (broken / ".work").mkdir()
  refused(values(tokens=str(broken)), run, "its preparation did not finish; rerun the same "
                                           "prepare_data command")
  refused(values(tokens=str(tmp_path / "nowhere")), run, "does not exist; prepare shards there")


def test_shards_that_do_not_fit_the_run_are_refused(folders, tmp_path):
  run = tmp_path / "run"
  code, other = folders / "code", folders / "other"
  refused(values(mixture=f"{code}:1,{other}:1"), run, "was encoded with another tokenizer than")
  refused(values(tokens=str(code), tokenizer=str(other / "tokenizer.model")), run,
          "was encoded with another tokenizer than data.tokenizer=")
  small = values(tokens=str(code))
  small["model"]["vocab_size"] = 256
  refused(small, run, "has vocabulary 512 but model.vocab_size=256; set "
                      "--config.model.vocab_size to at least 512")
  # A run resumes on shards that moved (here: another copy, written with a trailing slash), but
  # not on its folder prepared again with another tokenizer.
  folder = tmp_path / "data"
  shutil.copytree(code, folder)
  config = config_lib.validate(dict(values(tokens=str(folder)), train=dict(
      values()["train"], num_steps=2, eval_every=0, checkpoint_every=0)))
  pretrain.train(config, str(run), show_progress=False)
  longer = config_lib.replace(config, train={"num_steps": 3})
  moved = pretrain.train(config_lib.replace(longer, data={"tokens": f"{code}/"}), str(run),
                        show_progress=False)
  assert moved["step"] == 3
  shutil.rmtree(folder)
  shutil.copytree(other, folder)
  with pytest.raises(UserError, match="shards of data.tokens / data.mixture were encoded with "
                                      "another one"):
    pretrain.train(config_lib.replace(longer, train={"num_steps": 4}), str(run),
                  show_progress=False)


@pytest.mark.parametrize("mixture, match", [
    ("/a:0.7,/b:0", "the weight must be a positive number"),
    ("/a:0.7,/b:-1", "the weight must be a positive number"),
    ("/a:0.7,/b", "is not FOLDER:WEIGHT"),
    ("/a:1,/a:2", "names a folder twice"),
    ("gs://bucket/a:1,/b:nan", "the weight must be a positive number"),
    ("/data/a:1, /data/a/ :1", "names a folder twice"),
    ("/a:0.7;/b:0.3", "separate the sources with commas"),
    ("/a:1,/b:1e-300", "under a millionth of the largest"),
])
def test_malformed_mixtures_are_config_errors(mixture, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(values(mixture=mixture))
  assert config_lib.mixture_sources("gs://bucket/a:0.5,/data/b:1.5") == [("gs://bucket/a", 0.5),
                                                                         ("/data/b", 1.5)]


def test_token_keys_go_with_corpus_tokens():
  with pytest.raises(config_lib.ConfigError, match="needs one of data.tokens"):
    config_lib.validate(values())
  with pytest.raises(config_lib.ConfigError, match="not both"):
    config_lib.validate(values(tokens="/a", mixture="/a:1"))
  plain = config_lib.validate({"data": {"tokens": "/data/x"}})
  with pytest.raises(config_lib.ConfigError, match="add --config.data.corpus=tokens"):
    config_lib.check_training_data(plain.data)


def test_the_shards_tokenizer_is_the_runs(folders):
  config = config_lib.validate(values(tokens=str(folders / "code")))
  tokenizer, path = tokenizer_lib.get_tokenizer(config.data, 512)
  assert path == str(folders / "code" / "tokenizer.model")
  manifest = shards.load_manifest(str(folders / "code"))
  assert shards.fingerprint(tokenizer) == manifest["tokenizer"]


def test_evaluate_scores_the_validation_documents_of_the_shards(folders):
  """`experiments.evaluate --split=validation` on a run trained on shards: its documents are
  decoded from them, exactly the texts prepare_data held out."""
  from jaxlm import corpora
  from tests.helpers import shard_documents
  config = config_lib.validate(values(tokens=str(folders / "code")))
  documents = corpora.load_split(config.data, "validation")
  assert list(documents) == shard_documents(folders / "code", "validation")
  assert len(documents) >= 2 and documents[-1] == list(documents)[-1]
