"""Mistral 7B v0.1 (mistralai/Mistral-7B-v0.1): 32 layers, 4096 wide, 32 query and 8
key/value heads, SwiGLU 14336, a 4,096-token sliding window, vocabulary 32,000, untied.
The shape of the published checkpoint (parameter count equal to transformers' for its
config.json), windows of 2,048 tokens; for planning (python -m experiments.plan), for
pretraining from scratch, or as a reference for what experiments.import_hf builds."""

from jaxlm.config import open_model_config_dict


def get_config():
  return open_model_config_dict("mistral_7b")
