"""Width transfer: the best learning rate at widths 64-512, standard parametrization vs muP.

configs/small.py (2 layers, 4 heads, context 128) at embed_dim 64, 128, 256, 512 (mlp 4x),
AdamW at 7 learning rates a factor 2 apart (5e-4 .. 3.2e-2), each for 200 steps of 8 x 128
tokens (cosine to 0 after 20 warmup steps), under the standard parametrization and under muP
with its base at 128 (the two coincide there). Under the standard parametrization the best
learning rate falls as the model widens; under muP it should stay put (model.parametrization in
docs/training.md). The report's "Best optim.learning_rate per model.embed_dim" table and
optimum.png show it. 56 runs, ~40 min on 2 CPU cores.
  python -m experiments.sweep --sweep=configs/sweeps/mup_width.py --workdir=runs/mup_width
"""

WIDTHS = (64, 128, 256, 512)
RATES = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)


def get_sweep():
  points = [{"name": f"{p}-d{w}-lr{lr:g}", "model.parametrization": p, "model.embed_dim": w,
             "model.mlp_dim": 4 * w, "optim.learning_rate": lr}
            for p in ("standard", "mup") for w in WIDTHS for lr in RATES]
  return {
      "base": "../small.py",
      "overrides": {"model.mup_base_width": 128,
                    "train.num_steps": 200, "train.global_batch_size": 8,
                    "train.eval_every": 200, "train.checkpoint_every": 200,
                    "optim.warmup_steps": 20, "optim.min_learning_rate": 0.0},
      "points": points,
      "optimum": {"of": "optim.learning_rate", "per": "model.embed_dim",
                  "panels": "model.parametrization"},
  }
