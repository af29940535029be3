"""Llama 3.2 1B (meta-llama/Llama-3.2-1B): 16 layers, 2048 wide, 32 query and 8 key/value
heads, SwiGLU 8192, vocabulary 128,256, tied embeddings.
The shape of the published checkpoint (parameter count equal to transformers' for its
config.json), windows of 2,048 tokens; for planning (python -m experiments.plan), for
pretraining from scratch, or as a reference for what experiments.import_hf builds."""

from jaxlm.config import open_model_config_dict


def get_config():
  return open_model_config_dict("llama3_2_1b")
