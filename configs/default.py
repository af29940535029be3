"""Default: a small GPT trained on the embedded Python-stdlib corpus in ~7 minutes on 2 CPU cores.

4 layers, 4 heads, 256 dims, rotary positions (RoPE), LayerNorm, GELU MLP, tied embeddings,
SentencePiece vocabulary of 4,096, context 256 (the schema's model, see jaxlm/config.py), plus
modded-nanogpt's two skips: a value-embedding table mixed into every layer's attention values
and the embeddings mixed into every block's input (model.value_embed, model.x0_skip): 5.3M
parameters, 1.05M of them the value table. Trained with the CPU speedrun's recipe, the best
found for this model, corpus and budget: Muon (jaxlm/optimizers/muon.py) on the layers'
matrices at 0.02 decaying to 0.002, AdamW at 0.15 x that (3e-3) on embeddings, norms, biases and
the skips' weights, 300 steps of 16 x 256 tokens (~1.2M tokens). It reaches 1.53 bits per byte
of held-out text where the AdamW baseline (configs/adamw_cpu.py: 500 steps of 8, the default
until 2026-12-07) reaches 2.04; README.md and docs/training.md have the measurements.
"""

from jaxlm.config import default_config_dict


def get_config():
  config = default_config_dict()  # the model, data and evaluation of the schema's defaults
  config.optim.update(name="muon", learning_rate=0.02, min_learning_rate=0.002,
                      muon_adam_lr_scale=0.15)
  config.model.update(value_embed=True, x0_skip=True)
  config.train.update(global_batch_size=16, num_steps=300)
  return config
