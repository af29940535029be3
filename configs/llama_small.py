"""A small LLaMA-style model for CPU ablations against configs/default.py (GPT-2 style).

Same depth and width as the default (4 layers, 256 dims, 4 heads) with the LLaMA recipe: rotary
positions, RMSNorm, SwiGLU MLP, no biases, untied LM head. mlp_dim 688 ~ 8/3 * 256 (rounded to
a multiple of 16), so the three SwiGLU matrices hold about as many weights as GELU's two at 4x.
"""

from jaxlm.config import default_config_dict


def get_config():
  config = default_config_dict()
  model = config.model
  model.num_layers = 4
  model.num_heads = 4
  model.embed_dim = 256
  model.mlp_dim = 688
  model.positional = "rope"
  model.norm = "rmsnorm"
  model.mlp = "swiglu"
  model.use_bias = False
  model.tie_embeddings = False
  return config
