"""The one-machine engine: the per-document stages in a process pool over all cores, then the
de-duplication and the output in this process.

Work happens in `OUTPUT.partial/`: each input shard's records are written there atomically
(`records/NNNNN-<fingerprint>.jsonl`), so a rerun after an interruption redoes only the shards
that have no records yet (or whose files or config changed); the finished corpus is assembled
in `OUTPUT.partial/output/` and renamed to OUTPUT in one step, so pretraining never sees half a
corpus.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from typing import Any, Iterator

from jaxlm import files as files_lib
from jaxlm.curate import dedup, inputs, report, settings
from jaxlm.curate.rules import DocumentRules
from jaxlm.errors import UserError


class CurationError(UserError):
  """The output or staging folder cannot be used as asked."""


def check_output(output: str) -> None:
  """Refuses an existing output before any work (a finished corpus is never overwritten)."""
  if os.path.exists(output):
    finished = os.path.exists(os.path.join(output, "manifest.json"))
    raise CurationError(f"--output {output} already exists"
                        f"{' (a finished curation)' if finished else ''}; choose a new folder "
                        f"or delete it.")


# -- Stage 1: per-document stages, one task per input shard ------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(config: settings.CurationConfig) -> None:
  _WORKER["config"] = config
  _WORKER["rules"] = DocumentRules(config)
  _WORKER["signer"] = dedup.Signer(config.dedup) if config.dedup.near else None


def _process_shard(task: tuple[list[inputs.File], str]) -> str:
  """Writes one shard's records (JSON lines) atomically to `path`; returns it."""
  shard, path = task
  lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in inputs.shard_records(
      shard, _WORKER["config"], _WORKER["rules"], _WORKER["signer"])]
  files_lib.write_bytes(path, "".join(lines).encode("utf-8"))
  return path


def _records(path: str) -> Iterator[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    for line in f:
      yield json.loads(line)


# -- Stage 2: de-duplication over the survivors' hashes and signatures -------------------------

def find_duplicates(record_files: list[str], config: settings.CurationConfig
                    ) -> tuple[dict[dedup.DocKey, str], dict[str, dict[str, int]]]:
  """({dropped key: "exact_duplicate" | "near_duplicate"}, cluster size histograms)."""
  exact: dict[str, list[dedup.DocKey]] = {}
  signatures: dict[dedup.DocKey, Any] = {}
  for path in record_files:
    for record in _records(path):
      if record["rule"] is None:
        key = tuple(record["key"])
        exact.setdefault(record["exact"], []).append(key)
        if "sig" in record:
          signatures[key] = dedup.decode_signature(record["sig"])
  drops: dict[dedup.DocKey, str] = {}
  clusters: dict[str, dict[str, int]] = {}
  if config.dedup.exact:
    roots = {key: min(keys) for keys in exact.values() if len(keys) > 1 for key in keys}
    drops.update((key, "exact_duplicate") for key, root in roots.items() if key != root)
    clusters["exact"] = dedup.size_histogram(roots)
  if config.dedup.near:
    roots = dedup.near_duplicates(
        {key: s for key, s in signatures.items() if key not in drops}, config.dedup)
    drops.update((key, "near_duplicate") for key, root in roots.items() if key != root)
    clusters["near"] = dedup.size_histogram(roots)
  return drops, clusters


# -- Stage 3: the output ------------------------------------------------------------------------

def _write_output(record_files: list[str], drops: dict[dedup.DocKey, str],
                  config: settings.CurationConfig, directory: str) -> tuple[report.Stats,
                                                                            list[dict[str, Any]]]:
  """The kept documents into the output shards (in key order: the record files are), and the
  stats of every document's fate. Streamed: only the keys, hashes and signatures of the
  de-duplication (~0.6 KB per document) are ever all in memory."""
  num_shards = config.output.num_shards
  stats = report.Stats()
  names = [report.shard_name(i, num_shards) for i in range(num_shards)]
  handles = [open(os.path.join(directory, name), "wb") for name in names]
  digests = [hashlib.sha256() for _ in names]
  counts = [[0, 0] for _ in names]  # documents, bytes
  try:
    for path in record_files:
      for record in _records(path):
        key = tuple(record["key"])
        if record["rule"] is None and key in drops:
          record["rule"] = drops[key]
        stats.add(record)
        if record["rule"] is None:
          shard = report.shard_of(key, num_shards)
          line = report.shard_line(key, record["text"], record.get("meta"))
          handles[shard].write(line)
          digests[shard].update(line)
          counts[shard][0] += 1
          counts[shard][1] += len(line)
  finally:
    for handle in handles:
      handle.close()
  return stats, [report.shard_entry(name, count, size, digest.hexdigest())
                 for name, (count, size), digest in zip(names, counts, digests)]


def curate(input_glob: str, output: str, config: settings.CurationConfig, workers: int = 0,
           log=print) -> dict[str, Any]:
  """Curates the documents of `input_glob` into `output` (see the module docstring); returns
  the stats. workers: processes for the per-document stages (0: every core)."""
  check_output(output)
  files = inputs.list_files(input_glob)
  inputs.check_resources(config)  # before any work
  staging = output.rstrip("/") + ".partial"
  records_dir = os.path.join(staging, "records")
  try:
    os.makedirs(records_dir, exist_ok=True)
  except OSError as e:
    raise CurationError(f"--output {output}: cannot create {staging} ({e.strerror}); choose a "
                        f"writable folder.") from None
  shards = inputs.plan_shards(files, [os.path.getsize(path) for _, path in files],
                              config.input.shard_mb)
  tasks = [(shard, os.path.join(records_dir, f"{i:05d}-{inputs.shard_fingerprint(shard, config)}"
                                             f".jsonl")) for i, shard in enumerate(shards)]
  pending = [task for task in tasks if not os.path.exists(task[1])]
  log(f"{len(files)} files in {len(shards)} shards; {len(shards) - len(pending)} already done.")
  workers = min(workers or os.cpu_count() or 1, max(1, len(pending)))
  if workers == 1:
    _init_worker(config)
    for task in pending:
      _process_shard(task)
  elif pending:
    # fork: the workers inherit the imported modules (fast). Not from a process running JAX
    # (a notebook, the tests): forking its threads can deadlock, so spawn fresh workers there.
    method = "spawn" if "jax" in sys.modules else "fork"
    with multiprocessing.get_context(method).Pool(workers, _init_worker, (config,)) as pool:
      for done, _ in enumerate(pool.imap_unordered(_process_shard, pending), start=1):
        log(f"shard {done}/{len(pending)} filtered")
  record_files = [path for _, path in tasks]
  drops, clusters = find_duplicates(record_files, config)
  directory = os.path.join(staging, "output")
  shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(directory)
  stats, shard_info = _write_output(record_files, drops, config, directory)
  result = stats.to_json(clusters)
  report.write_metadata(directory, output, result, shard_info, settings.to_dict(config),
                        input_glob)
  os.rename(directory, output)
  shutil.rmtree(staging)
  return result
