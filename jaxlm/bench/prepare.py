r"""Token-preparation benchmark: prepare_data's tokens/s per core against the raw encode speed of
the same tokenizer on the same text, and its peak memory at corpus sizes 10x apart.

  python -m experiments.benchmark prepare                                 # 300 and 3000 MB
  python -m experiments.benchmark prepare --prepare_mb=100,1000 --prepare_workers=2 \
      --prepare_tokenizer=runs/x/tokenizer.model

Input: JSON lines generated from the standard library's source (each document one .py file
under a header line that makes it distinct), written once per size under --prepare_dir. The
tokenizer: --prepare_tokenizer, or the default run's SentencePiece (trained on first use).
  raw          `tokenizer.encode_batch(texts, num_threads=1)` on the first 64 MB of the input
               (one thread; `tokenizers` with TOKENIZERS_PARALLELISM=false), CPU time
  prepare      `experiments.prepare_data` in a fresh process on the whole input: tokens over
               the CPU time of it and its workers (reading, JSON, splitting, encoding, shards);
               peak RSS of the main process (VmHWM) and of the largest worker (ru_maxrss of
               the children: they start from the small main process)
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from jaxlm import config as config_lib
from jaxlm import corpora
from jaxlm import tokenizer as tokenizer_lib

_MB = 2**20


def generate_jsonl(folder: str, megabytes: int) -> str:
  """`megabytes` of .jsonl documents in files of at most 256 MB under `folder` (reused when
  already there); returns the glob."""
  os.makedirs(folder, exist_ok=True)
  done = os.path.join(folder, "done.json")
  pattern = os.path.join(folder, "*.jsonl")
  if os.path.exists(done):
    return pattern
  root, names = corpora.stdlib_files()
  texts = [open(os.path.join(root, n), encoding="utf-8", errors="replace").read() for n in names]
  written, copy, index, handle = 0, 0, 0, None
  while written < megabytes * _MB:
    if handle is None or handle.tell() >= 256 * _MB:
      if handle:
        handle.close()
      handle = open(os.path.join(folder, f"part-{index:04d}.jsonl"), "wb")
      index += 1
    for name, text in zip(names, texts):
      line = json.dumps({"text": f"# copy {copy} of {name}\n{text}"}).encode() + b"\n"
      handle.write(line)
      written += len(line)
      if written >= megabytes * _MB:
        break
    copy += 1
  handle.close()
  with open(done, "w") as f:
    json.dump({"megabytes": megabytes}, f)
  return pattern


def raw_encode(tokenizer_path: str, pattern: str, sample_mb: int = 64) -> dict[str, float]:
  """Tokens per CPU second of the tokenizer alone, one thread, on the first `sample_mb` of the
  input's texts (already in memory)."""
  os.environ["TOKENIZERS_PARALLELISM"] = "false"

  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
  texts, size = [], 0
  for path in sorted(glob.glob(pattern)):
    with open(path, "rb") as f:
      for line in f:
        texts.append(json.loads(line)["text"])
        size += len(line)
        if size >= sample_mb * _MB:
          break
    if size >= sample_mb * _MB:
      break
  started = time.process_time()
  tokens = 0
  for start in range(0, len(texts), 256):  # (batches as prepare's workers encode)
    tokens += sum(map(len, tokenizer.encode_batch(texts[start:start + 256], num_threads=1)))
  seconds = time.process_time() - started
  return {"tokens": tokens, "cpu_seconds": seconds, "tokens_per_cpu_second": tokens / seconds}


_CHILD = """
import json, resource, sys, time
from jaxlm import prepare
started = time.perf_counter()
manifest = prepare.prepare(sys.argv[1], sys.argv[2], sys.argv[3], workers=int(sys.argv[4]),
                           log=lambda _: None)
wall = time.perf_counter() - started
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
# VmHWM, not ru_maxrss: Linux keeps a process's ru_maxrss across exec, so it would include the
# benchmark's own memory at the fork that started this process.
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({"tokens": manifest["tokens"], "bytes": manifest["bytes"], "wall_seconds": wall,
                  "cpu_seconds": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
                  "main_peak_rss_mb": hwm / 1024, "worker_peak_rss_mb": kids.ru_maxrss / 1024}))
"""


def run_prepare(pattern: str, output: str, tokenizer_path: str, workers: int) -> dict[str, Any]:
  """prepare_data in a fresh process (its RSS is its own); its tokens, times and peaks."""
  shutil.rmtree(output, ignore_errors=True)
  result = subprocess.run([sys.executable, "-c", _CHILD, pattern, output, tokenizer_path,
                           str(workers)], capture_output=True, text=True, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if result.returncode:
    raise RuntimeError(result.stderr[-2000:])
  measured = json.loads(result.stdout.strip().splitlines()[-1])
  shutil.rmtree(output, ignore_errors=True)
  return measured


def run_prepare_benchmark(sizes_mb: list[int], folder: str, tokenizer_path: str = "",
                          workers: int = 1) -> dict[str, Any]:
  if not tokenizer_path:  # the default run's tokenizer (trained on first use)
    config = config_lib.validate(config_lib.default_config_dict())
    _, tokenizer_path = tokenizer_lib.get_tokenizer(config.data, config.model.vocab_size)
  rows = []
  raw = None
  for megabytes in sizes_mb:
    pattern = generate_jsonl(os.path.join(folder, f"input-{megabytes}mb"), megabytes)
    if raw is None:
      raw = raw_encode(tokenizer_path, pattern)
    measured = run_prepare(pattern, os.path.join(folder, "output"), tokenizer_path, workers)
    per_core = measured["tokens"] / measured["cpu_seconds"]
    rows.append({"megabytes": megabytes, **measured, "tokens_per_cpu_second": per_core,
                 "over_raw": per_core / raw["tokens_per_cpu_second"]})
  return {"tokenizer": tokenizer_path, "workers": workers, "raw": raw, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
  raw = result["raw"]
  lines = [f"tokenizer {result['tokenizer']}; raw encode (1 thread): "
           f"{raw['tokens_per_cpu_second']:,.0f} tokens per CPU second; prepare_data with "
           f"--workers={result['workers']}",
           "| input | tokens | wall | tokens per CPU second | vs raw encode | main peak RSS | "
           "largest worker peak RSS |", "|---:|---:|---:|---:|---:|---:|---:|"]
  for r in result["rows"]:
    lines.append(f"| {r['megabytes']:,} MB | {r['tokens']:,} | {r['wall_seconds']:.0f} s | "
                 f"{r['tokens_per_cpu_second']:,.0f} | {r['over_raw']:.2f}x | "
                 f"{r['main_peak_rss_mb']:,.0f} MB | {r['worker_peak_rss_mb']:,.0f} MB |")
  return "\n".join(lines)
