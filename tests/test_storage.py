"""Cloud storage: prepare_data's input and output, data.tokens and --workdir on gs://, against a
local GCS emulator (tests/gcs_emulator.py, started here on 127.0.0.1); the storage layer and the
run mirror on fsspec's in-memory filesystem."""

import json
import os
import socket
import subprocess
import sys
import time

import fsspec
import numpy as np
import pytest

from jaxlm import remote, shards, storage
from tests.conftest import REPO
from tests.helpers import stdlib_texts


def test_local_writes_are_atomic_and_urls_go_through_fsspec(tmp_path):
  target = tmp_path / "a" / "file.bin"
  with pytest.raises(RuntimeError):
    with storage.open_write(str(target)) as f:
      f.write(b"half")
      raise RuntimeError("killed")
  assert not target.exists() and os.listdir(tmp_path / "a") == []
  storage.write_bytes(str(target), b"whole")
  assert target.read_bytes() == b"whole"
  url = "memory://bucket/dir/x.bin"
  storage.write_bytes(url, b"0123456789")
  assert storage.exists(url) and storage.getsize(url) == 10 and storage.isfile(url)
  assert storage.read_ranges(url, [2, 5], [4, 8]) == [b"23", b"567"]
  assert storage.glob("memory://bucket/dir/*.bin") == [url]
  assert storage.listdir("memory://bucket/dir") == ["x.bin"]
  storage.move("memory://bucket/dir", "memory://bucket/moved")
  assert storage.read_bytes("memory://bucket/moved/x.bin") == b"0123456789"
  with pytest.raises(storage.StorageError, match="unknown storage scheme|install"):
    storage.exists("nosuchscheme://bucket/x")


def test_remote_shards_are_read_by_ranges():
  tokens = np.arange(1000, dtype=np.uint16)
  header = shards.npy_header(tokens.dtype, len(tokens))
  storage.write_bytes("memory://bucket/s/train-00000.npy", header + tokens.tobytes())
  remote_tokens = shards.RemoteTokens("memory://bucket/s/train-00000.npy", tokens.dtype, 1000)
  np.testing.assert_array_equal(remote_tokens.windows(np.array([3, 500]), 4),
                                [[3, 4, 5, 6], [500, 501, 502, 503]])


def test_a_run_directory_url_is_mirrored_and_its_logs_uploaded(tmp_path):
  fs = fsspec.filesystem("memory")
  fs.pipe("/bucket/run/config.json", b"{}")
  fs.pipe("/bucket/run/checkpoints/4/big", b"x" * 100)  # (never downloaded)
  local = remote.local_workdir("memory://bucket/run", mirrors=str(tmp_path))
  assert remote.url_of(local) == "memory://bucket/run"
  assert sorted(os.listdir(local)) == [remote.MARKER, "config.json"]
  assert remote.checkpoints_dir(local) == "memory://bucket/run/checkpoints"
  assert remote.local_workdir(local) == local  # (a mirror is not mirrored again)
  with open(os.path.join(local, "metrics.jsonl"), "w") as f:
    f.write('{"step": 1}\n')
  remote.upload(local)
  assert fs.cat("/bucket/run/metrics.jsonl") == b'{"step": 1}\n'
  assert not fs.exists(f"/bucket/run/{remote.MARKER}")
  assert remote.local_workdir(str(tmp_path / "plain")) == str(tmp_path / "plain")


# -- Against a GCS emulator ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gcs():
  """The environment that points gcsfs (fsspec) and TensorStore (Orbax) at the emulator."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "gcs_emulator.py"),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while time.time() < deadline:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      time.sleep(0.2)
  url = f"http://127.0.0.1:{port}"
  yield dict(os.environ, JAX_PLATFORMS="cpu", STORAGE_EMULATOR_HOST=url, FSSPEC_GS_TOKEN="anon",
             GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", TENSORSTORE_GCS_HTTP_URL=url,
             GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator")
  server.terminate()
  server.wait()


def run(env, module, *args):
  result = subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def train_flags(tokens, workdir, steps):
  return [f"--workdir={workdir}", "--progress=false", "--config.data.corpus=tokens",
          f"--config.data.tokens={tokens}", "--config.model.num_layers=2",
          "--config.model.num_heads=2", "--config.model.embed_dim=32", "--config.model.mlp_dim=64",
          "--config.model.vocab_size=512", "--config.model.max_seq_len=64",
          "--config.data.seq_len=64", f"--config.train.num_steps={steps}",
          "--config.train.global_batch_size=8", "--config.train.log_every=1",
          "--config.train.eval_every=2", "--config.train.eval_batches=2",
          "--config.train.checkpoint_every=2", "--config.train.sample_every=0",
          "--config.train.sample_max_new_tokens=8", "--config.optim.warmup_steps=2",
          "--config.optim.schedule=constant"]  # (a learning rate independent of num_steps)


def gs_losses(env, url):
  code = (f"import fsspec, json; print(json.dumps([json.loads(l) for l in fsspec.open("
          f"'{url}/metrics.jsonl', 'rt').open()]))")
  records = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                      text=True, check=True).stdout)
  return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def test_a_move_on_gcs_is_seen_by_every_filesystem_instance(gcs, monkeypatch):
  """Orbax reaches gs:// through its own gcsfs instance: a step moved aside by
  `--restore_step` must not stay in that instance's cached listing (the resumed run then failed
  to save the step again: "FileNotFoundError: gs://.../checkpoints/6")."""
  import gcsfs
  gcsfs.GCSFileSystem.clear_instance_cache()
  for key in ("STORAGE_EMULATOR_HOST", "FSSPEC_GS_TOKEN", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
    monkeypatch.setenv(key, gcs[key])
  orbax_view = fsspec.filesystem("gs", finalize_on_close=True)  # as etils.epath opens gs://
  storage.write_bytes("gs://bucket/moves/step/a.bin", b"1")
  assert orbax_view.exists("bucket/moves/step") and orbax_view.ls("bucket/moves")
  storage.move("gs://bucket/moves/step", "gs://bucket/moves/discarded")
  assert not orbax_view.exists("bucket/moves/step")
  assert orbax_view.cat("bucket/moves/discarded/a.bin") == b"1"
  gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.mark.e2e
def test_prepare_train_resume_and_generate_on_gcs(gcs, tmp_path):
  """prepare_data reads and writes gs://; a run reads its shards from gs://, checkpoints to
  gs://bucket/run, resumes from an earlier checkpoint there (--restore_step) and logs what it
  logged uninterrupted; generation reads the run from gs://."""
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "code.jsonl").write_text("".join(
      json.dumps({"text": t}) + "\n" for t in stdlib_texts("json") + stdlib_texts("email", 12)))
  upload = (f"import fsspec; fsspec.filesystem('gs').put_file('{tmp_path}/in/code.jsonl', "
            f"'bucket/raw/code.jsonl')")
  subprocess.run([sys.executable, "-c", upload], env=gcs, check=True)
  result = run(gcs, "prepare_data", "--input=gs://bucket/raw/*.jsonl",
               "--output=gs://bucket/tokens", "--vocab_size=512", "--validation_fraction=0.25",
               "--shard_tokens=8000", "--workers=2")
  assert json.loads(result.stdout)["splits"]["train"]["shards"] > 2

  run(gcs, "pretrain", *train_flags("gs://bucket/tokens", "gs://bucket/run", 6))
  want = gs_losses(gcs, "gs://bucket/run")
  assert sorted(want) == list(range(1, 7))
  # Back to the checkpoint at step 4 (read from the bucket; step 6 is moved aside), steps 5
  # and 6 again: the same losses as the first time, and step 6 saved again.
  resumed = run(gcs, "pretrain", *train_flags("gs://bucket/tokens", "gs://bucket/run", 6),
                "--restore_step=4")
  assert "resumed from gs://bucket/run/checkpoints/4" in resumed.stderr
  assert gs_losses(gcs, "gs://bucket/run") == want

  generated = run(gcs, "generate", "--workdir=gs://bucket/run", "--prompt=import ",
                  "--max_new_tokens=8", "--seed=0")
  assert generated.stdout.startswith("import ")
