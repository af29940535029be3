"""A one-minute CPU model for ablations (configs/sweeps/*.py start from it).

2 layers, 4 heads, 128 dims, context 128, batch 16 for 300 steps (~0.6M tokens) on the embedded
corpus with the default run's 4,096-token vocabulary (so its tokenizer cache is shared).
Validation (16 batches, 32k tokens) every 50 steps gives each run a curve; no text samples, to
keep runs short.
"""

from jaxlm.config import default_config_dict


def get_config():
  config = default_config_dict()
  config.model.update(num_layers=2, num_heads=4, embed_dim=128, mlp_dim=512, max_seq_len=128)
  config.data.update(seq_len=128)
  config.train.update(num_steps=300, global_batch_size=16, eval_every=50, eval_batches=16,
                      checkpoint_every=100, sample_every=0, sample_max_new_tokens=0)
  return config
