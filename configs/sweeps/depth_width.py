"""Deep and narrow or shallow and wide, at about equal non-embedding parameters.

Each block holds ~12 d^2 weights (attention 4 d^2, MLP 8 d^2), so L x d^2 is kept near
2 x 128^2 (configs/small.py): 8 x 64, 4 x 96, 2 x 128, 1 x 192 give 0.40M, 0.45M, 0.40M,
0.45M non-embedding parameters. Heads are 32 wide throughout; embeddings (4096 x d, tied) grow
with width and are not counted above. 2 seeds.
  python -m experiments.sweep --sweep=configs/sweeps/depth_width.py --workdir=runs/depth_width
"""


def _shape(layers: int, width: int) -> dict:
  return {"name": f"L{layers}-d{width}", "model.num_layers": layers, "model.embed_dim": width,
          "model.num_heads": width // 32, "model.mlp_dim": 4 * width}


def get_sweep():
  return {
      "base": "../small.py",
      "points": [_shape(8, 64), _shape(4, 96), _shape(2, 128), _shape(1, 192)],
      "seeds": [0, 1],
  }
