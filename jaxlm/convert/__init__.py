"""Hugging Face checkpoints <-> jaxlm runs, one module per model family behind one interface
(`core.Family`, registered by model_type in `core.FAMILIES`): GPT-2 (`gpt2.py`) and the Llama
family, Mistral, Qwen2 and Qwen3 (`llama.py`). `import_hf` / `export_hf` read and write any of
them; `import_gpt2` / `export_gpt2` are the GPT-2-only entry points of earlier versions."""

from __future__ import annotations

from typing import Any

from jaxlm.config import ModelConfig
from jaxlm.convert import gpt2, llama  # noqa: F401  (each registers its families)
from jaxlm.convert.core import (  # noqa: F401
  FAMILIES,
  ConvertError,
  Family,
  check_new_directory,
  export_hf,
  family_for,
  family_of,
  hf_tensors,
  import_hf,
  load_hf_tokenizer,
  read_hf_config,
  safetensors_files,
  staged,
  supported,
)
from jaxlm.convert.gpt2 import check_exportable  # noqa: F401


def import_gpt2(hf_dir: str, workdir: str, mesh=None) -> dict[str, Any]:
  """`import_hf` of a GPT-2 directory (any other architecture is refused)."""
  return import_hf(hf_dir, workdir, mesh, expect="gpt2")


def export_gpt2(model: ModelConfig, params: dict[str, Any], tokenizer, hf_dir: str) -> list[str]:
  """`export_hf` as GPT-2 (ConvertError naming what GPT-2 cannot express)."""
  check_exportable(model)
  return export_hf(model, params, tokenizer, hf_dir, "gpt2")


def gpt2_tensors(model: ModelConfig, params: dict[str, Any]):
  """{GPT-2 tensor name: float32 array} of jaxlm params."""
  return hf_tensors(gpt2.FAMILY, model, params)
