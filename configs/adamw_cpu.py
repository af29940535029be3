"""The AdamW baseline: the default model trained the 2019 way (the default run until 2026-12-07).

4 layers, 4 heads, 256 dims, rotary positions (RoPE), LayerNorm, GELU MLP, tied embeddings,
SentencePiece vocabulary of 4,096, context 256; AdamW at 3e-3 (cosine to 3e-4), batch 8, 500
steps: 4.2M parameters, ~1M training tokens: the schema's defaults (jaxlm/config.py). The
default run (configs/default.py) trains the same model with Muon; docs/training.md has the two
side by side. The loader, task and fine-tuning measurements in docs/ that name this file were
taken with it.
  python -m experiments.pretrain --config=configs/adamw_cpu.py --workdir=runs/adamw
"""

from jaxlm.config import default_config_dict


def get_config():
  return default_config_dict()
