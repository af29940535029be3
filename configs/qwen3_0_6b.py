"""Qwen3 0.6B (Qwen/Qwen3-0.6B): 28 layers, 1024 wide, 16 query and 8 key/value heads of
128 channels, qk-norm, SwiGLU 3072, vocabulary 151,936, tied embeddings.
The shape of the published checkpoint (parameter count equal to transformers' for its
config.json), windows of 2,048 tokens; for planning (python -m experiments.plan), for
pretraining from scratch, or as a reference for what experiments.import_hf builds."""

from jaxlm.config import open_model_config_dict


def get_config():
  return open_model_config_dict("qwen3_0_6b")
