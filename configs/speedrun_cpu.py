"""The CPU speedrun: the best recipe found for the default run's model, corpus and budget.

The default run's model (4 layers x 256, rotary positions, 4,096-token vocabulary) on the
embedded corpus, trained with Muon instead of AdamW, in 300 steps of 16 x 256 tokens instead of
500 of 8 x 256, within the default run's 10 minutes on 2 CPU cores, cold cache included.
Muon (jaxlm/optimizers/muon.py) orthogonalizes the momentum of the layers' matrices, at a
learning rate of 0.02 decaying to 0.002; the embeddings, norms and biases keep AdamW at
0.15 x that (3e-3, the default's rate). docs/training.md has the measurements side by side with
the default and the ablations behind each choice.

  python -m experiments.pretrain --config=configs/speedrun_cpu.py --workdir=runs/speedrun
  python -m experiments.evaluate --workdir=runs/speedrun --split=validation
"""

from jaxlm.config import default_config_dict


def get_config():
  config = default_config_dict()  # the default run's model, data and evaluation
  config.optim.update(name="muon", learning_rate=0.02, min_learning_rate=0.002,
                      muon_adam_lr_scale=0.15)
  config.train.update(global_batch_size=16, num_steps=300)
  return config
