r"""Instruction-tune a run (the book's chapter 7): loss on the responses only.

  python -m experiments.finetune_instruct --init=runs/gpt2_355m --data=instruction-data.json \
      --workdir=runs/assistant                             # Alpaca template, all weights train
  python -m experiments.finetune_instruct --init=runs/gpt2 --data=data.jsonl --workdir=runs/chat \
      --config.finetune.template=chat --config.model.lora_rank=16 --config.optim.learning_rate=5e-4

--data is a JSON list (or JSONL, one per line) of records with `instruction`, optional `input`
and `output`. Without --validation_data/--test_data it is split 0.7 / 0.1 / rest test (see
finetune.train_fraction / validation_fraction). Batches are padded to their own longest example
(up to finetune.max_length); prompt and padding tokens are masked out of the loss. Every epoch
logs each split's response loss and perplexity; the checkpoint with the best validation loss is
kept, and its greedy responses to the test prompts go to test_responses.json (each record with
`response` and `exact_match`).
"""

from __future__ import annotations

from absl import app

from experiments import common

common.define_finetune_flags(
    data="JSON/JSONL instruction records (split unless --validation_data and --test_data are "
         "given).",
    validation_data="validation JSON/JSONL.", test_data="test JSON/JSONL.")


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_logs()
  common.run_finetune("instruct")


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
