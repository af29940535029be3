"""Default: a small GPT trained on the embedded Python-stdlib corpus in a few minutes on CPU."""

from jaxlm.config import default_config_dict


def get_config():
  config = default_config_dict()
  return config
