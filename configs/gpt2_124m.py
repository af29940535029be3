"""GPT-2 small: 124,439,808 parameters, the shape of OpenAI's checkpoint (importable with
experiments/import_gpt2). Learned positions, LayerNorm with biases, GELU MLP (4x), tied
embeddings, context 1024, the GPT-2 BPE vocabulary (50257 ids)."""

from jaxlm.config import default_config_dict


def get_config():
  config = default_config_dict()
  model = config.model
  model.num_layers = 12
  model.num_heads = 12
  model.embed_dim = 768
  model.mlp_dim = 3072
  model.vocab_size = 50257
  model.max_seq_len = 1024
  model.positional = "learned"
  model.norm = "layernorm"
  model.mlp = "gelu"
  model.use_bias = True
  model.tie_embeddings = True
  return config
