"""Default: a small GPT trained on the embedded Python-stdlib corpus in a few minutes on CPU.

4 layers, 4 heads, 256 dims, SentencePiece vocabulary of 4,096, context 256, batch 8:
4.3M parameters, 500 steps, ~1M training tokens. At this budget the run is limited by the number
of optimizer steps more than by tokens: batch 8 for 200 steps reached a lower validation loss
than batch 16 for 100 or 300 steps (measured), so the default takes many small steps.
See README.md for what it reaches on 2 CPU cores.
"""

from jaxlm.config import default_config_dict


def get_config():
  config = default_config_dict()
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.embed_dim = 256
  config.model.mlp_dim = 1024
  config.model.vocab_size = 4096
  config.model.max_seq_len = 256
  config.data.corpus = "pystdlib"
  config.data.seq_len = 256
  config.data.stride = 256
  config.train.num_steps = 500
  config.train.global_batch_size = 8
  config.train.log_every = 10
  config.train.eval_every = 250
  config.train.eval_batches = 8
  config.train.checkpoint_every = 250
  config.train.sample_every = 250
  config.optim.learning_rate = 3e-3
  config.optim.min_learning_rate = 3e-4
  config.optim.warmup_steps = 30
  return config
