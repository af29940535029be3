"""A small LLaMA-style model for CPU ablations against configs/default.py (GPT-2 style).

Same depth and width as the default (4 layers, 256 dims, 4 heads) with the LLaMA recipe: rotary
positions, RMSNorm, SwiGLU MLP, no biases, untied LM head. mlp_dim 688 ~ 8/3 * 256 (rounded to
a multiple of 16), so the three SwiGLU matrices hold about as many weights as GELU's two at 4x.
"""

from jaxlm.config import default_config_dict


def get_config():
  config = default_config_dict()  # the default run's data and training settings
  config.model.update(num_layers=4, num_heads=4, embed_dim=256, mlp_dim=688, positional="rope",
                      norm="rmsnorm", mlp="swiglu", use_bias=False, tie_embeddings=False)
  return config
