"""GPT-2 124M on 10B tokens of FineWeb: the field's canonical run (nanoGPT, llm.c, nanochat,
modded-nanogpt), with the published nanoGPT/llm.c hyperparameters.

Targets from llm.c's reproduction (not measured here): FineWeb validation loss ~3.28 and
HellaSwag ~29.9% (OpenAI's GPT-2 124M: 29.4%) after 10B tokens. The whole path, from downloaded
parquet files to a trained model on a GPU node or a TPU slice, with the planner's tables for
v5e-8 and v5p-32: docs/data.md ("GPT-2 124M on FineWeb").

  python -m experiments.prepare_data --input='/data/fineweb/sample/10BT/*.parquet' \
      --output=/data/fineweb10B --tokenizer=/models/gpt2 --shard_tokens=100000000
  python -m experiments.pretrain --config=configs/gpt2_124m_fineweb.py \
      --config.data.tokens=/data/fineweb10B --workdir=gs://bucket/gpt2_124m_fineweb
"""

from jaxlm.config import gpt2_config_dict


def get_config():
  config = gpt2_config_dict("124m")
  # GPT-2's 50,257 ids padded to a multiple of 128 (nanoGPT: 50,304; the padding is never
  # sampled), GPT-2's shape otherwise: learned positions, LayerNorm with biases, GELU, tied.
  config.model.update(vocab_size=50304, dtype="bfloat16", remat_policy="none")
  # Shards of GPT-2-tokenized FineWeb from prepare_data; their tokenizer is the run's.
  config.data.update(corpus="tokens", tokens="~/data/fineweb10B", seq_len=1024, stride=0)
  config.train.update(
      # 512 x 1024 = 524,288 tokens per step (llm.c's 2**19), 19,073 steps = 10B tokens.
      # The planner says how many microbatches a mesh needs (docs/data.md): 1 on 8 H100s.
      global_batch_size=512, microbatches=1, num_steps=19073,
      # As nanoGPT and llm.c train: attention across document boundaries (EOS separates them).
      document_mask=False,
      # Validation on 20 x 512 windows (10M tokens, as llm.c's val_max_steps=20), samples and a
      # checkpoint every 1,000 steps.
      eval_every=250, eval_batches=20, log_every=10, checkpoint_every=1000, keep_checkpoints=3,
      sample_every=1000, sample_prompts=("Hello, I'm a language model,", "The capital of"),
      sample_max_new_tokens=64,
  )
  # AdamW (0.9, 0.95), peak 6e-4 after 700 warmup steps, cosine to 6e-5 (nanoGPT's floor),
  # weight decay 0.1, gradients clipped at 1.0.
  config.optim.update(schedule="cosine", learning_rate=6e-4, min_learning_rate=6e-5,
                      warmup_steps=700, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0)
  return config
