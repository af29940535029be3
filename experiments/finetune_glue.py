r"""Fine-tune a run on a GLUE or SuperGLUE task, read from the benchmark's published files.

  python -m experiments.finetune_glue --init=runs/gpt2 --task=mrpc \
      --data=glue_data/MRPC/train.tsv --validation_data=glue_data/MRPC/dev.tsv --workdir=runs/mrpc
  python -m experiments.finetune_glue --init=runs/gpt2 --task=stsb \
      --data=glue_data/STS-B/train.tsv --validation_data=glue_data/STS-B/dev.tsv \
      --workdir=runs/stsb                       # a one-output head, mean squared error
  python -m experiments.finetune_glue --init=runs/gpt2 --task=mnli \
      --data=glue_data/MNLI/train.tsv --validation_data=glue_data/MNLI/dev_matched.tsv \
      --test_data=glue_data/MNLI/dev_mismatched.tsv --workdir=runs/mnli
  python -m experiments.finetune_glue --init=runs/gpt2 --task=copa \
      --data=superglue/COPA/train.jsonl --validation_data=superglue/COPA/val.jsonl \
      --workdir=runs/copa --config.finetune.epochs=10

--task is one of cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli (GLUE's TSVs) and boolq,
cb, copa, multirc, record, rte, wic, wsc (SuperGLUE's JSONL); a TFDS dataset is
tfds:glue/mrpc:train@DATA_DIR/tfds. The texts of an example are joined by the delimiter "$"
(GPT-1's), the head reads the last token; every epoch logs each split's loss and the task's
metrics (validation_acc, validation_f1, validation_mcc, validation_pearson, ...) and
validation_score, the benchmark's score of the task, which picks the kept checkpoint.
jaxlm/finetune/glue.py describes each kind of task; --config.K=V as finetune_classifier.
"""

from __future__ import annotations

from absl import app, flags

from experiments import common

_TASK = flags.DEFINE_string("task", None, "the GLUE or SuperGLUE task, e.g. mrpc, stsb, copa "
                            "(finetune.glue_task).")
common.define_finetune_flags(
    data="the task's training file (GLUE TSV, SuperGLUE JSONL) or TFDS dataset.",
    validation_data="the task's dev/validation file (required).",
    test_data="another labelled file scored as the test split (optional; e.g. MNLI's "
              "dev_mismatched.tsv).")


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_logs()
  common.run_finetune("glue", {"finetune.glue_task": _TASK.value} if _TASK.value else {})


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
