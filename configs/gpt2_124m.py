"""GPT-2 small: 124,439,808 parameters, the shape of OpenAI's checkpoint. Learned positions,
LayerNorm with biases, GELU MLP (4x), tied embeddings, context 1024, a vocabulary of 50,257."""

from jaxlm.config import gpt2_config_dict


def get_config():
  return gpt2_config_dict("124m")
