"""The CPU speedrun: the best recipe found for the default run's model, corpus and budget
(<= 10 minutes on 2 CPU cores, cold cache included), scored on the whole held-out split.

It won against the AdamW baseline (configs/adamw_cpu.py) and so became the default run: this
file is configs/default.py, kept under the name the record log (docs/training.md, "The CPU
speedrun") cites. A new record is a new recipe here first, measured side by side with the
default, then made the default.
  python -m experiments.pretrain --config=configs/speedrun_cpu.py --workdir=runs/speedrun
  python -m experiments.evaluate --workdir=runs/speedrun --split=validation
"""

import os

from jaxlm.config import import_python_file


def get_config():
  default = import_python_file(os.path.join(os.path.dirname(__file__), "default.py"))
  return default.get_config()
