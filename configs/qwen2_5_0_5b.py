"""Qwen2.5 0.5B (Qwen/Qwen2.5-0.5B): 24 layers, 896 wide, 14 query and 2 key/value heads,
q/k/v biases, SwiGLU 4864, vocabulary 151,936, tied embeddings.
The shape of the published checkpoint (parameter count equal to transformers' for its
config.json), windows of 2,048 tokens; for planning (python -m experiments.plan), for
pretraining from scratch, or as a reference for what experiments.import_hf builds."""

from jaxlm.config import open_model_config_dict


def get_config():
  return open_model_config_dict("qwen2_5_0_5b")
