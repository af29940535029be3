"""GPT-2's LayerNorm + GELU MLP against LLaMA's RMSNorm + SwiGLU MLP.

SwiGLU's mlp_dim is 2/3 of GELU's 4x (344 ~ 8/3 * 128, a multiple of 8), so both MLPs hold about
the same number of weights. configs/small.py, 2 seeds.
  python -m experiments.sweep --sweep=configs/sweeps/norm_mlp.py --workdir=runs/norm_mlp
"""


def get_sweep():
  return {
      "base": "../small.py",
      "points": [
          {"name": "layernorm_gelu", "model.norm": "layernorm", "model.mlp": "gelu",
           "model.mlp_dim": 512},
          {"name": "rmsnorm_swiglu", "model.norm": "rmsnorm", "model.mlp": "swiglu",
           "model.mlp_dim": 344},
      ],
      "seeds": [0, 1],
  }
