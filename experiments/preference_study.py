r"""Measures preference tuning on a property the base model lacks (docs/finetuning.md).

  python -m experiments.preference_study --cache_dir=/tmp/pref --seeds=1,2,3
  python -m experiments.preference_study --cache_dir=/tmp/pref \
      --overrides=model.prefix_length=16,optim.learning_rate=1e-2   # prefix tuning

A 2-layer, 128-dim model is pretrained (300 steps, its own process) on generated sentences
("the old cat sees the red door."); its greedy continuation of "the old cat sees the" is one
adjective, and its log-probabilities rank the adjectives about evenly. Preference pairs then
prefer the continuation with `--liked` (" bright door.") to the same with another adjective
(" big door."), `liked` being an adjective the base model's greedy answers never say (a
property it lacks); each data seed's 600 pairs are split 420/60/120 and tuned with each
`--losses` (experiments.finetune_preference). The table: held-out (test split) preference
accuracy of the base model's own log-probabilities and of the tuned rewards, and the share of
greedy answers to the test prompts that say `--liked`, before and after.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CACHE_DIR = flags.DEFINE_string("cache_dir", "~/.cache/jaxlm/preference_study",
                                 "the base run, the data and the tuned runs.")
_SEEDS = flags.DEFINE_list("seeds", ["1", "2", "3"], "data seeds (one set of pairs each).")
_LOSSES = flags.DEFINE_list("losses", ["dpo", "simpo"], "finetune.preference_loss values.")
_OVERRIDES = flags.DEFINE_list(
    "overrides", [], "config overrides K=V for every tuned run, e.g. prefix tuning: "
    "model.prefix_length=16,optim.learning_rate=1e-2 (the runs' folders get a _tuned suffix).")
_LIKED = flags.DEFINE_string("liked", "auto", "the adjective the pairs prefer; auto: the first "
                             "of PREFERRED_ORDER the base model's greedy answers never say.")

ADJECTIVES = ["red", "big", "small", "green", "old", "new", "quiet", "bright", "dark", "happy"]
NOUNS = ["cat", "dog", "bird", "fish", "tree", "house", "river", "road", "car", "book", "lamp",
         "chair", "garden", "window", "door", "city"]
VERBS = ["sees", "likes", "finds", "takes", "moves", "paints", "opens", "follows", "watches"]
PREFERRED_ORDER = ["bright", "dark", "quiet", "happy", "green", "small", "big", "new", "old",
                   "red"]
# Per loss: the settings measured (2 epochs; DPO's beta 0.1 at 1e-4, SimPO's beta 2 and margin
# 0.5 as its paper's at 1e-4).
SETTINGS = {"dpo": {"optim.learning_rate": 1e-4},
            "simpo": {"finetune.preference_loss": "simpo", "finetune.beta": 2.0,
                      "optim.learning_rate": 1e-4}}


def write_pairs(path: str, count: int, seed: int, liked: str = "bright") -> None:
  """JSONL pairs {"prompt": "the old cat sees the", "chosen": " bright door.", "rejected":
  " big door."}: the same noun, `liked` against another adjective."""
  rng = random.Random(seed)
  with open(path, "w") as f:
    for _ in range(count):
      noun = rng.choice(NOUNS)
      other = rng.choice([a for a in ADJECTIVES if a != liked])
      f.write(json.dumps({
          "prompt": f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the",
          "chosen": f" {liked} {noun}.", "rejected": f" {other} {noun}."}) + "\n")


def run(args: list[str], log_path: str) -> str:
  """`python -m experiments.X args`; returns its stdout's last line (stderr to log_path)."""
  with open(log_path, "w") as log:
    result = subprocess.run([sys.executable, "-m", *args, "--noprogress"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=log, text=True)
  if result.returncode != 0:
    raise RuntimeError(f"failed ({result.returncode}): {' '.join(args)}; see {log_path}")
  return result.stdout.strip().splitlines()[-1]


def pretrain_base(cache: str) -> str:
  """The base run (built once): 300 steps on 3,600 generated sentences."""
  workdir = os.path.join(cache, "base")
  if os.path.exists(os.path.join(workdir, "summary.json")):
    return workdir
  rng = random.Random(0)
  corpus = os.path.join(cache, "corpus")
  os.makedirs(corpus, exist_ok=True)
  for i in range(60):
    lines = []
    for _ in range(60):
      words = ["the", rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS), "the",
               rng.choice(ADJECTIVES), rng.choice(NOUNS)]
      lines.append(" ".join(words) + ".")
    with open(os.path.join(corpus, f"{i}.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
  values = {"model.num_layers": 2, "model.num_heads": 4, "model.embed_dim": 128,
            "model.mlp_dim": 256, "model.vocab_size": 320, "model.max_seq_len": 64,
            "data.corpus": "text_files", "data.files": f"{corpus}/*.txt", "data.seq_len": 32,
            "data.stride": 32, "data.data_dir": os.path.join(cache, "data"),
            "train.num_steps": 300, "train.global_batch_size": 16, "train.eval_every": 300,
            "train.checkpoint_every": 300, "train.sample_every": 0,
            "train.sample_max_new_tokens": 0, "optim.name": "adamw",
            "optim.learning_rate": 3e-3, "optim.min_learning_rate": 3e-4,
            "optim.warmup_steps": 20}
  run(["experiments.pretrain", f"--workdir={workdir}",
       *[f"--config.{k}={v}" for k, v in values.items()]], workdir + ".log")
  return workdir


def liked_share(answers: list[dict], liked: str) -> float:
  return sum(a["response"].strip().startswith(liked) for a in answers) / len(answers)


def untuned_answers(base: str, prompts: list[str]) -> list[dict]:
  """The base model's greedy answers (6 tokens) to `prompts`."""
  from jaxlm import finetune
  from jaxlm import run as run_lib
  config, params, tokenizer = run_lib.load_run(base)
  encoded = finetune.encode_instructions(
      [finetune.Example("", prompt, response="") for prompt in prompts], tokenizer, 64)
  return finetune.respond(config, params, tokenizer, encoded, max_new_tokens=6)


def pick_liked(base: str, cache: str) -> str:
  """The first adjective of PREFERRED_ORDER that none of the base model's greedy answers to
  120 prompts says."""
  path = os.path.join(cache, "probe.jsonl")
  write_pairs(path, 120, seed=0)
  with open(path) as f:
    answers = untuned_answers(base, [json.loads(line)["prompt"] for line in f])
  said = {a["response"].split()[0] for a in answers if a["response"].split()}
  return next(a for a in PREFERRED_ORDER if a not in said)


def main(argv: list[str]) -> None:
  del argv
  cache = os.path.expanduser(_CACHE_DIR.value)
  os.makedirs(cache, exist_ok=True)
  base = pretrain_base(cache)
  liked = pick_liked(base, cache) if _LIKED.value == "auto" else _LIKED.value
  print("| loss | data seed | base log-prob accuracy | tuned accuracy | reward margin | "
        f"answers saying '{liked}', base | tuned |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for seed in map(int, _SEEDS.value):
    data = os.path.join(cache, f"pairs_{liked}_{seed}.jsonl")
    write_pairs(data, 600, seed, liked)
    for loss in _LOSSES.value:
      overrides = dict(item.split("=", 1) for item in _OVERRIDES.value)
      suffix = "_" + "_".join(f"{k.split('.')[-1]}{v}" for k, v in overrides.items())
      workdir = os.path.join(cache, f"{loss}_{liked}_{seed}{suffix if overrides else ''}")
      settings = {"finetune.template": "plain", "finetune.epochs": 2,
                  "finetune.max_new_tokens": 6, "seed": seed, **SETTINGS[loss], **overrides}
      summary = json.loads(run(["experiments.finetune_preference", f"--init={base}",
                                f"--data={data}", f"--workdir={workdir}",
                                *[f"--config.{k}={v}" for k, v in settings.items()]],
                               workdir + ".log"))
      with open(os.path.join(workdir, "test_responses.json")) as f:
        report = json.load(f)
      reference = summary.get("test_reference_preference_accuracy")
      print(f"| {loss} | {seed} | {'-' if reference is None else f'{reference:.3f}'} | "
            f"{summary['test_preference_accuracy']:.3f} | {summary['test_reward_margin']:.2f} | "
            f"{liked_share(untuned_answers(base, [r['prompt'] for r in report]), liked):.2f} | "
            f"{liked_share(report, liked):.2f} |",
            flush=True)


if __name__ == "__main__":
  app.run(main)
