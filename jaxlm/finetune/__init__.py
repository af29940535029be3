"""Fine-tuning a run: text classification, instruction following and preference tuning, fully,
partly or with LoRA.

  core.py        what every objective shares: config, trainable weights, initial params,
                 epochs of batches, the loop's job (evaluation, best checkpoint), preflight
  objective.py   the interface an objective implements (read, encode, batch rows, loss,
                 metrics, rank, checks, finish), shared records, the registry
  classifier.py  classification (the book's chapter 6): a class head on the last token
  instruct.py    instruction following (chapter 7): prompt templates, loss on the response
  preference.py  preference tuning (DPO, SimPO) on chosen/rejected pairs
  glue.py        GLUE and SuperGLUE from their published files: pair inputs, a regression head
                 (STS-B), candidates (COPA, ReCoRD), the benchmarks' metrics

A new objective is one module registering an `Objective` and one import line below.
"""

from jaxlm.finetune import classifier, glue, instruct, preference  # noqa: F401  (register them)
from jaxlm.finetune.classifier import (
                                       balance,
                                       class_names,
                                       encode_classifier,
                                       label_ids,
                                       predict,
                                       read_labeled,
                                       read_texts,
)
from jaxlm.finetune.core import (
                                       FINETUNE_DEFAULTS,
                                       LEARNING_RATE_TIMES_WIDTH,
                                       MODEL_KEYS_FINETUNING_MAY_SET,
                                       EpochBatches,
                                       FinetuneInputs,
                                       base_params,
                                       evaluate_splits,
                                       finetune,
                                       finetune_config,
                                       initial_params,
                                       load_splits,
                                       make_job,
                                       prepare,
                                       resolved_trainable,
                                       trainable_filter,
)
from jaxlm.finetune.instruct import (
                                       ALPACA_HEADER,
                                       encode_instructions,
                                       format_prompt,
                                       read_instructions,
                                       respond,
)
from jaxlm.finetune.objective import (
                                       LENGTH_BUCKET,
                                       OBJECTIVES,
                                       Encoded,
                                       Example,
                                       FinetuneError,
                                       Objective,
                                       batches,
                                       make_batch,
                                       register,
                                       split_examples,
)

__all__ = [
    "ALPACA_HEADER", "Encoded", "EpochBatches", "Example", "FINETUNE_DEFAULTS", "FinetuneError",
    "FinetuneInputs", "LEARNING_RATE_TIMES_WIDTH", "LENGTH_BUCKET",
    "MODEL_KEYS_FINETUNING_MAY_SET", "OBJECTIVES", "Objective", "balance", "base_params",
    "batches", "class_names", "encode_classifier", "encode_instructions", "evaluate_splits",
    "finetune", "finetune_config", "format_prompt", "initial_params", "label_ids", "load_splits",
    "make_batch", "make_job", "predict", "prepare", "read_instructions", "read_labeled",
    "read_texts", "register", "resolved_trainable", "respond", "split_examples",
    "trainable_filter",
]
