r"""Fine-tune a run into a text classifier (the book's chapter 6), or label texts with one.

  python -m experiments.finetune_classifier --init=runs/gpt2 --data=sms_spam.tsv \
      --workdir=runs/spam                                  # book defaults: last block + head
  python -m experiments.finetune_classifier --init=runs/default --data=train.csv \
      --validation_data=val.csv --test_data=test.csv --workdir=runs/cls \
      --config.finetune.trainable=all --config.optim.learning_rate=3e-4 --config.finetune.epochs=3
  python -m experiments.finetune_classifier --init=runs/gpt2 --data=sms_spam.tsv \
      --workdir=runs/spam_lora --config.model.lora_rank=8 --config.optim.learning_rate=1e-3
  python -m experiments.finetune_classifier --workdir=runs/spam --predict=new_texts.txt

--data is a CSV (or TSV: .tsv/.txt, quotes are text) file with a header naming the `text` and
`label` columns, or JSON/JSONL records with those fields (--config.finetune.text_column /
label_column); labels are strings or integers, their order is
saved in labels.json. Without --validation_data/--test_data it is split by
finetune.train_fraction / validation_fraction (0.7 / 0.1 / rest test, seeded by `seed`);
--config.finetune.balance=true undersamples to the smallest class. The class logits are read
at each text's last token. Loss and accuracy of every split are logged per epoch
(metrics.jsonl: train_accuracy, validation_accuracy, test_accuracy, ...), and the checkpoint of
the best validation accuracy (ties: lowest validation loss) is kept. --predict labels a file's
texts (one per line, or a CSV/TSV with a text column) and prints one JSON object per text.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments import common

_INIT = flags.DEFINE_string("init", None, "run directory to start from (pretrained or imported).")
_DATA = flags.DEFINE_string("data", None, "CSV/TSV/JSON/JSONL of text,label records (split unless "
                            "--validation_data and --test_data are given).")
_VALIDATION_DATA = flags.DEFINE_string("validation_data", None, "validation CSV/TSV.")
_TEST_DATA = flags.DEFINE_string("test_data", None, "test CSV/TSV.")
_WORKDIR = flags.DEFINE_string("workdir", None, "new run directory (or, with --predict, the "
                               "fine-tuned classifier).")
_PREDICT = flags.DEFINE_string("predict", None, "label the texts of this file with --workdir's "
                               "classifier instead of training.")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar on stderr.")
_RESTORE_STEP = common.define_restore_step_flag()
_CONFIG = common.define_config_overrides_flag()
common.define_distributed_flags()


def read_texts(path: str, text_column: str) -> list[str]:
  """The texts to label: a .csv/.tsv file's `text_column`, or one text per line."""
  from jaxlm import files, finetune
  if path.endswith((".csv", ".tsv")):
    records = files.read_records(path, finetune.FinetuneError, "--predict")
    if records and text_column not in records[0][1]:
      raise finetune.FinetuneError(f"{path} has no column '{text_column}'.")
    return [row[text_column] for _, row in records]
  if not os.path.isfile(path):
    raise finetune.FinetuneError(f"--predict={path} does not exist.")
  with open(path, encoding="utf-8") as f:
    return [line for line in f.read().splitlines() if line.strip()]


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_logs()
  if _PREDICT.value:
    from jaxlm import finetune
    if not _WORKDIR.value:
      raise finetune.FinetuneError("--predict needs --workdir=RUN, a fine-tuned classifier.")
    texts = read_texts(_PREDICT.value, common.config_overrides().get("finetune.text_column",
                                                                     "text"))
    for result in finetune.predict(_WORKDIR.value, texts):
      print(json.dumps(result, ensure_ascii=False))
    return
  common.run_finetune("classifier", _INIT.value, _DATA.value, _WORKDIR.value,
                      _VALIDATION_DATA.value, _TEST_DATA.value, _PROGRESS.value,
                      _RESTORE_STEP.value)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
