"""Helpers shared by test modules (no test module imports another): tiny configs and batches,
pretraining values and their flags, multi-process launches, damaged checkpoints, corpora in every
input format prepare_data reads, and reading prepared shards back as documents."""

from __future__ import annotations

import glob
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import sharding, shards
from jaxlm import steps as steps_lib
from jaxlm.textfiles import unit_hash
from tests.conftest import FAST_COMPILE_XLA_FLAGS, REPO


def stdlib_texts(package: str = "json", limit: int = 0) -> list[str]:
  """Source files of a standard-library package, as text (real, varied documents)."""
  root = os.path.join(sysconfig.get_paths()["stdlib"], package)
  names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
  texts = [open(os.path.join(root, n), encoding="utf-8").read() for n in names]
  return texts[:limit] if limit else texts


def write_corpus(folder) -> dict[str, str]:
  """One corpus in every input kind; returns {identity: text} of its non-blank documents
  (identities as prepare_data names them: an `id` field, else file@offset / file#row / file)."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard

  from jaxlm.curate import report

  folder = str(folder)
  os.makedirs(os.path.join(folder, "raw"), exist_ok=True)
  texts = (stdlib_texts("json") + stdlib_texts("email", 14) + stdlib_texts("http")
           + stdlib_texts("urllib") + stdlib_texts("logging"))
  texts = [t for t in texts if t.strip()]
  assert len(texts) >= 32, len(texts)
  documents: dict[str, str] = {}
  take = iter(texts)

  def jsonl(records) -> tuple[bytes, list[int]]:
    lines = [json.dumps(r).encode() + b"\n" for r in records]
    offsets = list(np.cumsum([0] + [len(line) for line in lines[:-1]]))
    return b"".join(lines), offsets

  # .jsonl: ids on odd records; a blank line and a whitespace-only document are skipped.
  records = [{"text": next(take), **({"id": f"doc-{i}"} if i % 2 else {})} for i in range(8)]
  content, offsets = jsonl(records)
  content += b"\n" + json.dumps({"text": "  \n"}).encode() + b"\n"
  with open(os.path.join(folder, "raw", "a.jsonl"), "wb") as f:
    f.write(content)
  for record, offset in zip(records, offsets):
    documents[record.get("id", f"raw/a.jsonl@{offset}")] = record["text"]
  for name, compress in (("b.jsonl.gz", gzip.compress),
                         ("c.jsonl.zst", zstandard.ZstdCompressor().compress)):
    records = [{"text": next(take)} for _ in range(4)]
    content, offsets = jsonl(records)
    with open(os.path.join(folder, "raw", name), "wb") as f:
      f.write(compress(content))
    for record, offset in zip(records, offsets):
      documents[f"raw/{name}@{offset}"] = record["text"]
  rows = [next(take) for _ in range(6)]
  ids = [f"row-{i}" if i < 3 else None for i in range(6)]
  pq.write_table(pa.table({"text": rows, "id": ids, "n": list(range(6))}),
                 os.path.join(folder, "raw", "d.parquet"), row_group_size=4)
  for i, (text, identity) in enumerate(zip(rows, ids)):
    documents[identity or f"raw/d.parquet#{i}"] = text
  for name in ("e.txt", "f.md"):
    text = next(take)
    with open(os.path.join(folder, "raw", name), "w", encoding="utf-8") as f:
      f.write(text)
    documents[f"raw/{name}"] = text
  with open(os.path.join(folder, "raw", "blank.txt"), "w") as f:
    f.write(" \n\n")
  # A curated corpus (experiments.curate's output layout, written by its own functions).
  curated = os.path.join(folder, "curated")
  os.makedirs(curated, exist_ok=True)
  keys = [(f"crawl/page{i}.txt", 0) for i in range(6)]
  lines = [report.shard_line(key, next(take)) for key in keys]
  name = report.shard_name(0, 1)
  with open(os.path.join(curated, name), "wb") as f:
    f.write(b"".join(lines))
  stats = report.Stats()
  for key, line in zip(keys, lines):
    text = json.loads(line)["text"]
    stats.add({"key": key, "bytes": len(text.encode()), "rule": None, "language": "en",
               "cut": False, "text": text})
  report.write_metadata(curated, curated, stats.to_json({}),
                        [report.content_entry(name, b"".join(lines))], {}, "crawl/*")
  for line in lines:
    record = json.loads(line)
    documents[record["id"]] = record["text"]
  return documents


def shard_documents(directory, split: str) -> list[str]:
  """The split's documents read back from prepared shards: tokens cut at each document start
  (the .docs.npy files), end-of-text dropped, decoded."""
  directory = str(directory)
  manifest = shards.load_manifest(directory)
  tokenizer = shards.load_tokenizer(directory, manifest)
  arrays, starts, at = [], [], 0
  for entry in shards.split_entries(manifest, split):
    tokens = np.load(os.path.join(directory, entry["file"]))
    starts.append(np.load(os.path.join(directory, entry["docs"])).astype(np.int64) + at)
    arrays.append(tokens)
    at += len(tokens)
  if not arrays:
    return []
  tokens, starts = np.concatenate(arrays), np.concatenate(starts)
  out = []
  for begin, end in zip(starts, list(starts[1:]) + [len(tokens)]):
    document = tokens[begin:end]
    assert document[-1] == tokenizer.eos_id and tokenizer.eos_id not in document[:-1]
    out.append(tokenizer.decode(document[:-1]))
  return out


def expected_split(documents: dict[str, str], fraction: float, split: str) -> list[str]:
  held_out = split == "validation"
  return [text for identity, text in documents.items()
          if (unit_hash(identity) < fraction) == held_out]


# -- Tiny configs, batches and steps --------------------------------------------------------

TINY = {"model": {"num_layers": 2, "num_heads": 2, "embed_dim": 32, "mlp_dim": 64,
                  "vocab_size": 97, "max_seq_len": 16},
        "data": {"seq_len": 16, "stride": 16},
        "train": {"global_batch_size": 8, "num_steps": 10},
        "optim": {"warmup_steps": 2, "learning_rate": 1e-2}}


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  shape = (config.train.global_batch_size, config.data.seq_len)
  tokens = rng.integers(0, config.model.vocab_size, size=(shape[0], shape[1] + 1))
  return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
          "weights": np.ones(shape, np.float32),
          "segment_ids": np.ones(shape, np.int32),
          "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()}


def packed_batch(config, seed=0, cut=9):
  """Random tokens in two packed documents per row, the second from position `cut`: segment ids
  and positions restart there."""
  rng = np.random.default_rng(seed)
  shape = (config.train.global_batch_size, config.data.seq_len)
  tokens = rng.integers(0, config.model.vocab_size, size=(shape[0], shape[1] + 1))
  segments = np.where(np.arange(shape[1]) < cut, 1, 2).astype(np.int32)
  positions = np.where(segments == 1, np.arange(shape[1]), np.arange(shape[1]) - cut)
  return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
          "weights": np.ones(shape, np.float32),
          "segment_ids": np.broadcast_to(segments, shape).copy(),
          "positions": np.broadcast_to(positions.astype(np.int32), shape).copy()}


def run_steps(config, num_steps, devices=None, batch=random_batch):
  """(final state, train losses) of `num_steps` steps on batch(config, step) from the seed's
  init."""
  mesh = sharding.make_mesh(config.mesh, devices or jax.devices()[:1])
  steps = steps_lib.make_steps(config, mesh)
  state = steps.init(jax.random.PRNGKey(config.seed))
  losses = []
  for i in range(num_steps):
    state, metrics = steps.train(state, sharding.global_batch(batch(config, i), mesh))
    losses.append(float(metrics["train_loss"]))
  return state, losses


def tiny_values(data_dir, **sections):
  values = {
      "model": {"num_layers": 2, "num_heads": 2, "embed_dim": 64, "mlp_dim": 128,
                "vocab_size": 512, "max_seq_len": 64},
      "data": {"seq_len": 64, "stride": 64, "data_dir": str(data_dir),
               "tokenizer_max_sentences": 20000},
      "train": {"num_steps": 12, "global_batch_size": 8, "log_every": 1, "eval_every": 6,
                "eval_batches": 2, "checkpoint_every": 6, "sample_every": 0,
                # (no text samples: decoding's compile is ~2.5 s of each run; the run-directory
                # test asks for them)
                "sample_max_new_tokens": 0},
      # The schema's AdamW (what in-process runs get), also for the scripts, whose default
      # config file (configs/default.py) trains with Muon.
      "optim": {"name": "adamw", "learning_rate": 3e-3, "min_learning_rate": 3e-4,
                "warmup_steps": 2},
  }
  for name, updates in sections.items():
    values.setdefault(name, {}).update(updates)
  return values


def overrides(values):
  """--config.a.b=v flags for a nested dict."""
  flags = []
  for section, fields in values.items():
    for key, value in fields.items():
      flags.append(f"--config.{section}.{key}={value}")
  return flags


def losses(workdir, key="train_loss"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def step_config(action: str, **train):
  return config_lib.validate({
      "model": {"num_layers": 1, "num_heads": 2, "embed_dim": 32, "mlp_dim": 64,
                "vocab_size": 64, "max_seq_len": 16},
      "data": {"seq_len": 16, "stride": 16},
      "train": {"global_batch_size": 4, "spike_action": action, "spike_window": 4,
                "spike_loss_ratio": 1.5, **train},
      "optim": {"learning_rate": 1e-2, "warmup_steps": 0, "schedule": "constant"}})


def pattern_batch(target: int) -> dict[str, np.ndarray]:
  inputs = np.tile(np.arange(16, dtype=np.int32) % 8 + 4, (4, 1))
  return {"inputs": inputs, "targets": np.where(target < 0, (inputs + 1) % 64, target)
          .astype(np.int32), "weights": np.ones((4, 16), np.float32),
          "segment_ids": np.ones((4, 16), np.int32),
          "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1))}


def damage(step_dir, how: str) -> None:
  """Damages a checkpoint step directory as a crash or a bad disk would."""
  if how == "no_meta":
    shutil.rmtree(os.path.join(step_dir, "meta"))
    return
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f) and os.path.getsize(f) > 4096]
  target = max(files, key=os.path.getsize)
  if how == "truncated":
    os.truncate(target, os.path.getsize(target) // 3)
    return
  with open(target, "r+b") as f:  # flipped: one byte in the middle of the largest array file
    f.seek(os.path.getsize(target) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x55]))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, values, num_processes, devices_per_process):
  """Starts the pretrain script as `num_processes` processes; returns the Popen objects."""
  return launch_script("experiments.pretrain", [f"--workdir={workdir}", "--progress=false",
                                                *overrides(values)],
                       num_processes, devices_per_process)


def launch_script(module, script_args, num_processes, devices_per_process):
  """Starts `python -m module` as `num_processes` processes of one job on 127.0.0.1 (compiling
  at -O0: the jobs run a few steps)."""
  port = free_port()
  processes = []
  for index in range(num_processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process} "
                         f"{FAST_COMPILE_XLA_FLAGS}")
    args = [sys.executable, "-m", module, *script_args]
    if num_processes > 1:
      args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
               f"--process_id={index}"]
    processes.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
  return processes


def wait(processes, timeout=600):
  results = [p.communicate(timeout=timeout) for p in processes]
  for p, (_, err) in zip(processes, results):
    assert p.returncode == 0, err[-3000:]
  return [err for _, err in results]


# Llama 3's chat template, shortened (its structure: the headers and the end of turn).
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")


def llama2_style_tokenizer_json(path) -> None:
  """A tokenizer.json laid out as transformers converts Llama 2's / Mistral's tokenizer.model:
  BPE with byte fallback (<0x00>..<0xFF> in the vocabulary), a normalizer that prepends "▁" and
  turns spaces into "▁", <unk> <s> </s>; trained on stdlib text."""
  from tokenizers import Tokenizer, decoders, models, normalizers, trainers
  folder = os.path.join(sysconfig.get_paths()["stdlib"], "json")
  texts = [open(os.path.join(folder, n), encoding="utf-8").read()
           for n in sorted(os.listdir(folder)) if n.endswith(".py")]
  byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
  tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
  tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                               normalizers.Replace(" ", "\u2581")])
  tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces], show_progress=False))
  spec = json.loads(tokenizer.to_str())
  spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_pieces]
  with open(path, "w", encoding="utf-8") as f:
    json.dump(spec, f)
