r"""Which fine-tuning defaults learn a keyword classification task on every kind of model?

  python -m experiments.finetune_study                       # 4 models x 3 settings x 2 seeds
  python -m experiments.finetune_study --models=tiny,small --settings=book,all_lr1e-3 --seeds=1
  python -m experiments.finetune_study --report_only         # the table from finished runs

Everything runs through the command-line scripts, each in its own process (pretrain,
export_gpt2, import_gpt2, finetune_classifier), so the study does not depend on jaxlm's
internals. Under --cache_dir it keeps:

  base/MODEL          the models fine-tuned from (pretrained briefly here; reused when present)
  data/seed_S.csv     the task: sentences of common English/Python-ish words, label `number`
                      iff one number word (one..ten) is in them (half are), else `none`
  ft/MODEL/SETTING/seed_S   one fine-tuning run per (model, setting, data seed); a finished
                      run (summary.json) is not run again; its wall time in study.json

and prints one table: test accuracy (at the epoch of best validation accuracy) per seed, the
median over seeds, and the median wall time of a run.

Models (the issue's: "a small model pretrained briefly", the project's configs, GPT-2's shape):
  tiny      configs/small.py with 64 dims (2 layers, MLP 256; 362K params), 300 steps
  small     configs/small.py (2 layers, 128 dims), 300 steps
  default   configs/adamw_cpu.py (4 layers, 256 dims; AdamW) shortened to --default_steps steps
  gpt2_random  GPT-2's architecture at 6 layers x 192 dims (6 heads, context 256) with a
            byte-level BPE vocabulary of 4,096 trained on the stdlib's top-level modules, built
            by `transformers` (its own random init, saved as safetensors) and imported with
            import_gpt2: the import path of a downloaded GPT-2, but no pretraining at all (an
            imported run cannot be pretrained further here), so a lower bound
  gpt2      GPT-2's architecture (learned positions, LayerNorm, GELU, biases, tied embeddings,
            a byte-level BPE vocabulary of 4,096 trained on the stdlib) at 6 layers x 192 dims,
            pretrained here for --default_steps steps, exported with export_gpt2 and imported
            back with import_gpt2 (tested to import; not in the default list: its 200 steps
            ran at ~9 s/step on 2 heavily shared CPU cores, so it was not measured)

Data seeds: each seed is its own generated data set (split 70/10/20 by the scripts with
`seed` 0, so the head's initialisation is the same for every data seed).
"""

from __future__ import annotations

import csv
import json
import os
import random
import statistics
import subprocess
import sys
import sysconfig
import time

from absl import app, flags

from experiments import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CACHE_DIR = flags.DEFINE_string("cache_dir", "~/.cache/jaxlm/finetune_study",
                                 "base models, data and fine-tuning runs.")
_MODELS = flags.DEFINE_list("models", ["tiny", "small", "default", "gpt2_random"],
                            "models to fine-tune (tiny, small, default, gpt2, gpt2_random).")
_SETTINGS = flags.DEFINE_list("settings", ["defaults", "book", "rule_last1"],
                              "fine-tuning settings (see SETTINGS).")
_SEEDS = flags.DEFINE_list("seeds", ["1", "2"], "data seeds (one generated data set each).")
_ROWS = flags.DEFINE_integer("rows", 1000, "sentences per data set.")
_DEFAULT_STEPS = flags.DEFINE_integer("default_steps", 200, "pretraining steps of `default` "
                                      "and `gpt2` (configs/adamw_cpu.py trains 500).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "only print the table of finished runs.")

PYTHON = sys.executable

# --- the task -----------------------------------------------------------------------------

WORDS = ["the", "a", "file", "list", "value", "return", "data", "name", "class", "object",
         "string", "read", "write", "open", "print", "error", "default", "path", "key", "new",
         "old", "line", "call", "function", "module", "test", "type", "self", "item", "result",
         "set", "get", "and", "of", "to", "in", "with", "for", "from", "is", "not", "if", "this",
         "that", "we", "it", "can", "should", "will", "use", "make", "first", "last", "small"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def make_dataset(path: str, seed: int, rows: int) -> None:
  """`rows` sentences of 6-14 random WORDS; half get one number word at a random position."""
  rng = random.Random(seed)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["text", "label"])
    for _ in range(rows):
      words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
      has_number = rng.random() < 0.5
      if has_number:
        words[rng.randrange(len(words))] = rng.choice(NUMBERS)
      writer.writerow([" ".join(words), "number" if has_number else "none"])


# --- the models ---------------------------------------------------------------------------

def run(args: list[str], log_path: str) -> float:
  """Runs `python -m experiments.X args` (output to log_path); returns its wall seconds."""
  start = time.perf_counter()
  with open(log_path, "w") as log:
    result = subprocess.run([PYTHON, "-m", *args], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
  seconds = time.perf_counter() - start
  if result.returncode != 0:
    raise RuntimeError(f"failed ({result.returncode}): {' '.join(args)}; see {log_path}")
  return seconds


def overrides(values: dict) -> list[str]:
  return [f"--config.{key}={value}" for key, value in values.items()]


GPT2_SHAPE = {"model.num_layers": 6, "model.num_heads": 6, "model.embed_dim": 192,
              "model.mlp_dim": 768, "model.max_seq_len": 256}


def train_bpe(directory: str, vocab_size: int = 4096) -> None:
  """A byte-level BPE (GPT-2's vocab.json + merges.txt layout) trained on stdlib sources."""
  from tokenizers import ByteLevelBPETokenizer
  stdlib = sysconfig.get_paths()["stdlib"]
  texts = []
  for name in sorted(os.listdir(stdlib)):
    if name.endswith(".py"):
      with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
        texts.append(f.read())
  trainer = ByteLevelBPETokenizer()
  trainer.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                              show_progress=False)
  os.makedirs(directory, exist_ok=True)
  trainer.save_model(directory)


def build_model(name: str, cache: str) -> str:
  """The base run directory of model `name`, built (pretrained / imported) if missing."""
  base = os.path.join(cache, "base")
  workdir = os.path.join(base, name)
  if os.path.isdir(os.path.join(workdir, "checkpoints")) and (
      os.path.isfile(os.path.join(workdir, "summary.json")) or name.startswith("gpt2")):
    return workdir
  os.makedirs(base, exist_ok=True)
  log = lambda step: os.path.join(base, f"{name}.{step}.log")
  common = ["--progress=false", f"--workdir={workdir}"]
  if name == "tiny":
    seconds = run(["experiments.pretrain", "--config=configs/small.py", *common,
                   *overrides({"model.embed_dim": 64, "model.mlp_dim": 256})], log("pretrain"))
  elif name == "small":
    seconds = run(["experiments.pretrain", "--config=configs/small.py", *common],
                  log("pretrain"))
  elif name == "default":
    seconds = run(["experiments.pretrain", "--config=configs/adamw_cpu.py", *common,
                   f"--config.train.num_steps={_DEFAULT_STEPS.value}"], log("pretrain"))
  elif name in ("gpt2", "gpt2_random"):
    bpe = os.path.join(base, "bpe")
    if not os.path.isfile(os.path.join(bpe, "merges.txt")):
      train_bpe(bpe)
    with open(os.path.join(bpe, "vocab.json")) as f:
      vocab = len(json.load(f))
    hf_dir = os.path.join(base, f"{name}_hf")
    if name == "gpt2":
      pre = os.path.join(base, "gpt2_pretrain")
      seconds = run(["experiments.pretrain", "--config=configs/adamw_cpu.py", "--progress=false",
                     f"--workdir={pre}", *overrides({
                         **GPT2_SHAPE, "model.positional": "learned",
                         "model.vocab_size": vocab, "data.tokenizer": bpe,
                         "train.num_steps": _DEFAULT_STEPS.value})], log("pretrain"))
      seconds += run(["experiments.export_gpt2", f"--workdir={pre}", f"--hf_dir={hf_dir}"],
                     log("export"))
    else:
      start = time.perf_counter()
      write_random_gpt2(hf_dir, bpe, vocab)
      seconds = time.perf_counter() - start
    seconds += run(["experiments.import_gpt2", f"--hf_dir={hf_dir}", f"--workdir={workdir}"],
                   log("import"))
  else:
    raise app.UsageError(f"unknown model '{name}'")
  print(f"built {name} in {seconds:.0f}s: {workdir}", flush=True)
  return workdir


def write_random_gpt2(hf_dir: str, bpe: str, vocab: int) -> None:
  """GPT-2 of GPT2_SHAPE with `transformers`' own random init, saved as safetensors."""
  import shutil

  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.GPT2Config(
      vocab_size=vocab, n_positions=GPT2_SHAPE["model.max_seq_len"],
      n_embd=GPT2_SHAPE["model.embed_dim"], n_layer=GPT2_SHAPE["model.num_layers"],
      n_head=GPT2_SHAPE["model.num_heads"], bos_token_id=0, eos_token_id=0)
  transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir, safe_serialization=True)
  for name in ("vocab.json", "merges.txt"):
    shutil.copy(os.path.join(bpe, name), hf_dir)


def model_shape(workdir: str) -> dict:
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)["model"]


# --- the settings -------------------------------------------------------------------------

def rule_lr(model: dict) -> float:
  """Candidate rule: AdamW learning rate 0.064 / embed_dim (1e-3 at 64 dims, 2.5e-4 at 256,
  8.3e-5 at GPT-2 124M's 768, 4e-5 at 1558M's 1600)."""
  return 0.064 / model["embed_dim"]


def setting_overrides(setting: str, model: dict, steps_per_epoch: int) -> dict:
  """--config overrides of a setting (the scripts' defaults apply to the rest)."""
  all_ = {"finetune.trainable": "all"}
  fixed = {
      "defaults": {},  # the scripts' defaults (chosen by this study: all weights, 0.064/embed)
      "book": {"finetune.trainable": "last_n_blocks",  # the book's: last block + final norm +
               "optim.learning_rate": 5e-5},           # head, AdamW 5e-5 (the old defaults)
      "all_lr5e-5": {**all_, "optim.learning_rate": 5e-5},
      "all_lr1e-4": {**all_, "optim.learning_rate": 1e-4},
      "all_lr3e-4": {**all_, "optim.learning_rate": 3e-4},
      "all_lr1e-3": {**all_, "optim.learning_rate": 1e-3},
      "last1_lr1e-3": {"finetune.trainable": "last_n_blocks", "optim.learning_rate": 1e-3},
      "last1_lr3e-4": {"finetune.trainable": "last_n_blocks", "optim.learning_rate": 3e-4},
  }
  if setting in fixed:
    return fixed[setting]
  lr = rule_lr(model)
  cosine = {"optim.schedule": "cosine", "optim.warmup_steps": steps_per_epoch // 2,
            "optim.min_learning_rate": lr / 10}
  rules = {
      "rule_all": {**all_, "optim.learning_rate": lr},
      "rule_all_cosine": {**all_, "optim.learning_rate": lr, **cosine},
      "rule_last1": {"finetune.trainable": "last_n_blocks", "optim.learning_rate": lr},
      "rule_all_3ep": {**all_, "optim.learning_rate": lr, "finetune.epochs": 3},
  }
  if setting not in rules:
    raise app.UsageError(f"unknown setting '{setting}'")
  return rules[setting]


# --- the study ----------------------------------------------------------------------------

def finetune(cache: str, model: str, setting: str, seed: int, base: str | None) -> dict | None:
  """One fine-tuning run's summary (plus `wall_seconds`); runs it unless finished (or
  base is None, then None)."""
  workdir = os.path.join(cache, "ft", model, setting, f"seed_{seed}")
  done = os.path.join(workdir, "study.json")
  if os.path.isfile(done):
    with open(done) as f:
      return json.load(f)
  if base is None:
    return None
  data = os.path.join(cache, "data", f"seed_{seed}.csv")
  if not os.path.isfile(data):
    os.makedirs(os.path.dirname(data), exist_ok=True)
    make_dataset(data, seed, _ROWS.value)
  steps_per_epoch = -(-int(_ROWS.value * 0.7) // 8)
  values = setting_overrides(setting, model_shape(base), steps_per_epoch)
  if os.path.isdir(workdir):  # an interrupted run: start it again
    import shutil
    shutil.rmtree(workdir)
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  seconds = run(["experiments.finetune_classifier", "--progress=false", f"--init={base}",
                 f"--data={data}", f"--workdir={workdir}", *overrides(values)],
                workdir + ".log")
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(workdir, "config.json")) as f:
    learning_rate = json.load(f)["optim"]["learning_rate"]  # (the resolved one)
  summary.update(wall_seconds=round(seconds, 1), overrides=values, learning_rate=learning_rate)
  with open(done, "w") as f:
    json.dump(summary, f)
  print(f"{model:12s} {setting:16s} seed {seed}: test accuracy "
        f"{summary['test_accuracy']:.3f} ({seconds:.0f}s) {values}", flush=True)
  return summary


def table(cache: str, models: list[str], settings: list[str], seeds: list[int]) -> str:
  lines = ["| model | setting | lr | " + " | ".join(f"seed {s}" for s in seeds)
           + " | median | min | s/run |", "|---" * (len(seeds) + 6) + "|"]
  for model in models:
    for setting in settings:
      results = [finetune(cache, model, setting, seed, None) for seed in seeds]
      found = [r for r in results if r]
      if not found:
        continue
      accs = [r["test_accuracy"] for r in found]
      lr = found[0].get("learning_rate", found[0]["overrides"].get("optim.learning_rate", 5e-5))
      cells = [f"{r['test_accuracy']:.3f}" if r else "-" for r in results]
      lines.append(f"| {model} | {setting} | {lr:.2g} | " + " | ".join(cells)
                   + f" | {statistics.median(accs):.3f} | {min(accs):.3f} | "
                   f"{statistics.median(r['wall_seconds'] for r in found):.0f} |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cache = os.path.expanduser(_CACHE_DIR.value)
  seeds = [int(s) for s in _SEEDS.value]
  if not _REPORT_ONLY.value:
    for model in _MODELS.value:
      base = build_model(model, cache)
      for setting in _SETTINGS.value:
        for seed in seeds:
          finetune(cache, model, setting, seed, base)
  print(table(cache, _MODELS.value, _SETTINGS.value, seeds))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
