"""Does RoPE beat learned positions at this scale? learned / sinusoidal / rope / none.

configs/small.py (2 layers x 128 dims, context 128, 300 steps) on the embedded corpus, 2 seeds.
  python -m experiments.sweep --sweep=configs/sweeps/positional.py --workdir=runs/positional
"""


def get_sweep():
  return {
      "base": "../small.py",
      "grid": {"model.positional": ["learned", "sinusoidal", "rope", "none"]},
      "seeds": [0, 1],
  }
