r"""Fine-tune a run into a text classifier (the book's chapter 6), or label texts with one.

  python -m experiments.finetune_classifier --init=runs/gpt2 --data=sms_spam.tsv \
      --workdir=runs/spam                      # defaults: all weights, AdamW 0.064/embed_dim
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
texts (one per line of a .txt, or the text field of CSV/TSV/JSON/JSONL records: the run's
finetune.text_column) and prints one JSON object per text.
"""

from __future__ import annotations

import json

from absl import app, flags

from experiments import common

common.define_finetune_flags(
    data="CSV/TSV/JSON/JSONL of text,label records (split unless --validation_data and "
         "--test_data are given).",
    validation_data="validation records (formats as --data).",
    test_data="test records (formats as --data).",
    workdir="new run directory (or, with --predict, the fine-tuned classifier).")
_PREDICT = flags.DEFINE_string("predict", None, "label the texts of this file with --workdir's "
                               "classifier instead of training.")


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_logs()
  if _PREDICT.value:
    from jaxlm import finetune
    workdir = flags.FLAGS.workdir
    if not workdir:
      raise finetune.FinetuneError("--predict needs --workdir=RUN, a fine-tuned classifier.")
    from jaxlm import run as run_lib
    saved = (run_lib.saved_config(workdir) or {}).get("finetune", {})
    texts = finetune.read_texts(_PREDICT.value, common.config_overrides().get(
        "finetune.text_column", saved.get("text_column", "text")))  # default: as trained
    for result in finetune.predict(workdir, texts):
      print(json.dumps(result, ensure_ascii=False))
    return
  common.run_finetune("classifier")


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
