"""Tied input/output embeddings (GPT-2) against a separate LM head (LLaMA).

Untying adds vocab_size x embed_dim = 4096 x 128 = 0.52M parameters to configs/small.py's 0.92M.
2 seeds.
  python -m experiments.sweep --sweep=configs/sweeps/tying.py --workdir=runs/tying
"""


def get_sweep():
  return {
      "base": "../small.py",
      "grid": {"model.tie_embeddings": [True, False]},
      "seeds": [0, 1],
  }
