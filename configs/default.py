"""Default: a small GPT trained on the embedded Python-stdlib corpus in a few minutes on CPU.

4 layers, 4 heads, 256 dims, rotary positions (RoPE), LayerNorm, GELU MLP, tied embeddings,
SentencePiece vocabulary of 4,096, context 256, batch 8, 500 steps: 4.2M parameters, ~1M
training tokens (the schema's defaults, see jaxlm/config.py). README.md
shows what it reaches on 2 CPU cores.
"""

from jaxlm.config import default_config_dict


def get_config():
  return default_config_dict()
