r"""Preference-tune a run (DPO, or the reference-free SimPO) on chosen/rejected response pairs.

  python -m experiments.finetune_preference --init=runs/assistant --data=pairs.jsonl \
      --workdir=runs/preferred                    # DPO, beta 0.1, the init run as reference
  python -m experiments.finetune_preference --init=runs/assistant --data=hh.jsonl \
      --workdir=runs/simpo --config.finetune.preference_loss=simpo --config.finetune.beta=2.0

--data is JSONL (or a JSON list) of {prompt, chosen, rejected} records (the prompt formatted by
finetune.template, as finetune_instruct formats instructions), or of Anthropic HH-RLHF's
{chosen, rejected} whole conversations. Without --validation_data/--test_data it is split
0.7 / 0.1 / rest test. The reference model's log-probabilities (the init run's, or
finetune.reference's) are computed once before training. Every epoch logs each split's
preference accuracy, reward margin, rewards and log-probabilities (the validation split's
accuracy also as eval_preference_accuracy, which picks the kept checkpoint); at the end the
test prompts are answered greedily (test_responses.json). jaxlm/finetune/preference.py has
the losses; docs/finetuning.md the measurements.
"""

from __future__ import annotations

from absl import app

from experiments import common

common.define_finetune_flags(
    init="run directory to start from (an instruction-tuned run, pretrained or imported).",
    data="JSON/JSONL preference records (split unless --validation_data and --test_data are "
         "given).",
    validation_data="validation JSON/JSONL.", test_data="test JSON/JSONL.")


@common.exit_on_user_error
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.quiet_logs()
  common.run_finetune("preference")


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
