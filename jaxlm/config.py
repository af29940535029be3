"""Config schema, defaults and validation.

Experiment scripts build an `ml_collections.ConfigDict` (from `configs/*.py` plus CLI overrides);
the library validates it once, here, into frozen dataclasses. Frozen dataclasses are hashable, so
Flax modules can hold them as attributes and `jax.jit` can take them as static arguments.

Every problem raises `ConfigError` with the field, the value and the fix, before anything is
compiled or written.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import types
from typing import Any, Mapping

import ml_collections

from jaxlm.errors import UserError


class ConfigError(UserError):
  """A config value is invalid; the message names the field, the value and the fix."""


POSITIONALS = ("learned", "sinusoidal", "rope", "none")
# Dense layers LoRA can adapt: attention q/k/v/output, and the MLP (gelu: fc/proj, swiglu:
# gate/up/down).
LORA_TARGETS = ("query", "key", "value", "out", "fc", "proj", "gate", "up", "down")
NORMS = ("layernorm", "rmsnorm")
ROPE_SCALINGS = ("", "llama3")
MLPS = ("gelu", "relu2", "swiglu")
PARAMETRIZATIONS = ("standard", "mup")
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "splash", "triton")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "save_attention_out", "minimal")
DTYPES = ("float32", "bfloat16", "float16")
LOSS_SCALINGS = ("auto", "dynamic", "none")
CORPORA = ("pystdlib", "text_files", "tfds", "tokens")
SCHEDULES = ("cosine", "constant", "wsd")  # = jaxlm/optim.py SCHEDULES (a test checks)
OPTIMIZERS = ("adamw", "muon", "adafactor", "lion")  # = jaxlm/optimizers OPTIMIZERS
# Parameter groups (jaxlm/optim.py group_of): learning-rate multipliers and weight decay per group.
PARAM_GROUPS = ("embed", "head", "matrices", "vectors")
SPIKE_ACTIONS = ("none", "log", "skip", "halt", "rollback")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder shape and numerics. `mlp_dim` is the hidden width of the MLP."""
  num_layers: int = 4  # Transformer blocks
  num_heads: int = 4  # attention (query) heads per block
  # Key/value heads, each shared by num_heads / num_kv_heads query heads (grouped-query
  # attention; 1: multi-query); the KV cache holds only these. 0: num_heads (multi-head).
  num_kv_heads: int = 0
  head_size: int = 0  # channels per head (Hugging Face's head_dim); 0: embed_dim / num_heads
  embed_dim: int = 256  # width of the residual stream
  mlp_dim: int = 1024  # hidden width of the MLP
  vocab_size: int = 4096  # embedding rows: the tokenizer's vocabulary, or more (padding)
  max_seq_len: int = 256  # the context the model is built for (positions, caches)
  positional: str = "rope"  # how positions enter: learned/sinusoidal tables, rotary, none
  norm: str = "layernorm"  # the blocks' normalization
  mlp: str = "gelu"  # the MLP: GELU, ReLU squared (relu2), or SwiGLU (gated)
  use_bias: bool = True  # biases in the Dense layers and norms
  qkv_bias: bool = False  # biases on the query/key/value projections even without use_bias
  qk_norm: bool = False  # RMSNorm of queries and keys per head before RoPE (Qwen3, OLMo 2)
  # Each token attends to the last sliding_window positions only, itself included (Mistral;
  # 0: the whole context).
  sliding_window: int = 0
  # With sliding_window: the layers that use it, as indices and ranges ("0,2,4-7"; empty: every
  # layer); the others attend to the whole context (models that alternate local and global
  # layers: Qwen2's max_window_layers, layer_types). Scanned (scan_layers), each layer takes
  # its flag as a scan input, and a decoding cache spans max_len in every layer (one shape).
  window_layers: str = ""
  tie_embeddings: bool = True  # the LM head reuses the token embedding
  dropout: float = 0.0  # on attention probabilities and residual branches (training only)
  # auto: cuDNN flash attention on NVIDIA GPUs (bf16/fp16), the splash Pallas kernel on TPU,
  # the written-out reference on CPU (see jaxlm.model.resolve_attention_impl). 'splash' (TPU)
  # and 'triton' (GPU) are Pallas kernels with segment ids (interpreted on CPU; jaxlm.kernels).
  attention_impl: str = "auto"
  scan_layers: bool = False  # one compiled block run by jax.lax.scan (fast compiles)
  # Layers per iteration of the scanned loop (scan_layers=true): 1 keeps one compiled layer,
  # num_layers unrolls it fully; in between trades compile time for speed.
  scan_unroll: int = 1
  remat_policy: str = "none"  # what the backward pass recomputes instead of storing
  dtype: str = "float32"  # compute dtype (parameters stay float32)
  norm_eps: float = 1e-5  # epsilon of LayerNorm / RMSNorm
  rope_theta: float = 10000.0  # rotary base frequency (positional=rope)
  # RoPE scaling for long contexts: '' (none) or 'llama3' (Llama 3.1+: frequencies with
  # wavelengths beyond rope_original_max_len / rope_low_freq_factor divided by
  # rope_scaling_factor, those under rope_original_max_len / rope_high_freq_factor kept,
  # interpolated between).
  rope_scaling: str = ""
  rope_scaling_factor: float = 8.0  # rope_scaling: how much longer the context becomes
  rope_low_freq_factor: float = 1.0  # rope_scaling=llama3: see above
  rope_high_freq_factor: float = 4.0  # rope_scaling=llama3: see above
  rope_original_max_len: int = 8192  # rope_scaling: the context the model was pretrained with
  init_std: float = 0.02  # standard deviation of the normal initializers
  # The projections into the residual stream (attention out, MLP proj/down) start at zero, so
  # each block starts as the identity (modded-nanogpt); else init_std / sqrt(2 x num_layers).
  zero_init_residual: bool = False
  # > 0: the LM logits are soft-capped, logit_softcap * tanh(logits / logit_softcap) (Gemma 2,
  # modded-nanogpt: 30 and 15); 0: none.
  logit_softcap: float = 0.0
  # modded-nanogpt's skips (docs/training.md measures both on the default run): x0_skip feeds
  # each block a.x + b.x0, x0 the residual stream's start (the embeddings), a and b learned per
  # layer from 1 and 0; value_embed adds a second token table [vocab, kv_heads, head_dim] whose
  # rows are mixed into every layer's attention values, v = a.v + b.table[token], a and b
  # learned per layer from 0.5 and 0.5.
  x0_skip: bool = False
  value_embed: bool = False
  # Width transfer: 'mup' (maximal update parametrization, Tensor Programs V) makes the best
  # learning rate found at width mup_base_width hold at other widths. With the width multiplier
  # m = embed_dim / mup_base_width: the layers' matrices start at init_std / sqrt(m) and train at
  # learning_rate / m (element-wise optimizers: AdamW, Adafactor, Lion; Muon's updates already
  # carry the width factor), the logits are multiplied by 1 / m, attention scores use 1/head_dim
  # (x sqrt of the base model's head_dim) instead of 1/sqrt(head_dim); embeddings, norms and
  # biases stay as they are. At embed_dim = mup_base_width it is the standard parametrization.
  parametrization: str = "standard"
  mup_base_width: int = 0  # mup: the embed_dim the learning rate (and init_std) were tuned at
  # Fine-tuning (jaxlm/finetune/, jaxlm/lora.py): a classification head of num_classes
  # outputs replaces the LM head when > 0 (1: a single output, the regression head of STS-B
  # in experiments.finetune_glue); LoRA adapters of rank lora_rank on the Dense layers named in
  # lora_targets when > 0.
  num_classes: int = 0
  lora_rank: int = 0  # adapters' rank (0: no LoRA)
  lora_alpha: float = 16.0  # LoRA scale: alpha / rank
  lora_dropout: float = 0.0  # dropout on the adapters' input
  lora_targets: tuple[str, ...] = LORA_TARGETS  # Dense layers that get adapters
  # Prefix tuning (Li & Liang 2021) when > 0: every layer gets this many learned key/value
  # slots that every query attends to (the only weights that train, with a classification head;
  # attention then runs XLA's kernel with an explicit mask, not the flash kernels).
  prefix_length: int = 0

  @property
  def head_dim(self) -> int:
    return self.head_size or self.embed_dim // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  def windowed_layers(self) -> frozenset[int]:
    """The layers that use sliding_window (every layer if window_layers is empty; none
    without a window). ValueError for a malformed window_layers."""
    if not self.sliding_window:
      return frozenset()
    if not self.window_layers.strip():
      return frozenset(range(self.num_layers))
    layers: set[int] = set()
    for part in self.window_layers.split(","):
      first, _, last = part.strip().partition("-")
      if not first.isdigit() or (last and not last.isdigit()):
        raise ValueError(part)
      layers.update(range(int(first), int(last or first) + 1))
    return frozenset(layers)

  def layer_window(self, layer: int) -> int:
    """The sliding window of block `layer` (0: the whole context)."""
    return self.sliding_window if layer in self.windowed_layers() else 0

  @property
  def window_pattern(self) -> bool:
    """Whether the layers differ in window (some use sliding_window, some the whole context)."""
    return bool(self.sliding_window and self.window_layers.strip()
                and len(self.windowed_layers()) < self.num_layers)

  @property
  def width_multiplier(self) -> float:
    """muP's m = embed_dim / mup_base_width (1 under the standard parametrization)."""
    if self.parametrization != "mup":
      return 1.0
    return self.embed_dim / self.mup_base_width

  @property
  def attention_multiplier(self) -> float:
    """What multiplies the queries on top of the kernels' 1/sqrt(head_dim): under muP
    sqrt(base head_dim / head_dim), making the scores q.k x sqrt(base head_dim) / head_dim; 1
    under the standard parametrization or a fixed head_size (the head width does not grow)."""
    if self.parametrization != "mup" or self.head_size:
      return 1.0
    return math.sqrt((self.mup_base_width / self.num_heads) / self.head_dim)

  def for_layer(self, layer: int) -> "ModelConfig":
    """This config as block `layer` sees it: its own window, no pattern."""
    if not self.window_layers:
      return self
    return dataclasses.replace(self, sliding_window=self.layer_window(layer), window_layers="")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where documents come from and how they become windows of tokens.

  `data_dir` holds prepared TFDS datasets, trained tokenizers and token caches; `tokenizer` may
  name an existing SentencePiece `.model` to use instead of training one. corpus='tokens'
  trains on shards `experiments.prepare_data` wrote: one folder (`tokens`) or a weighted
  mixture of folders (`mixture`, 'DIR_A:0.7,DIR_B:0.3'); local paths or gs:// URLs.
  """
  corpus: str = "pystdlib"  # where documents come from (docs/data.md)
  files: str = ""  # text_files: comma-separated globs (.txt/.md a document each, .jsonl)
  tfds_name: str = ""  # tfds: the dataset, e.g. tiny_shakespeare or name/config:1.0.0
  tokens: str = ""  # tokens: a prepare_data folder (local or gs://)
  mixture: str = ""  # tokens: weighted folders, 'DIR_A:0.7,DIR_B:0.3' (one tokenizer)
  text_key: str = "text"  # the text field of .jsonl records / TFDS features
  train_split: str = "train"  # tfds: the split (expression) trained on
  validation_split: str = "validation"  # tfds: the held-out split (expression)
  validation_fraction: float = 0.05  # pystdlib/text_files: documents held out (by hash)
  seq_len: int = 256  # tokens per training window (at most model.max_seq_len)
  stride: int = 0  # tokens between window starts (0: seq_len, windows follow each other)
  data_dir: str = "~/.cache/jaxlm"  # prepared corpora, tokenizers, token caches, compile cache
  tokenizer: str = ""  # a tokenizer file or GPT-2 folder to use; "": train SentencePiece
  tokenizer_max_sentences: int = 300_000  # line chunks the trained tokenizer samples

  @property
  def window_stride(self) -> int:
    """Tokens between the starts of consecutive training windows (`stride`, 0: `seq_len`)."""
    return self.stride or self.seq_len


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  num_steps: int = 500  # optimizer steps of the run
  global_batch_size: int = 8  # rows per step, over all devices and processes
  microbatches: int = 1  # gradient accumulation: the batch in this many sequential parts
  # GPT-3's batch-size warmup (jaxlm/batch_warmup.py): the batch grows from batch_warmup_start
  # rows to global_batch_size, doubling, along a linear ramp over the first batch_warmup_tokens
  # training tokens (0: off). Same data order; num_steps counts the smaller steps too.
  batch_warmup_tokens: int = 0
  batch_warmup_start: int = 0  # the first steps' rows: global_batch_size / a power of two
  z_loss: float = 0.0  # weight of PaLM's log(Z)^2 auxiliary loss (0: off)
  # Positions per chunk of the LM-head loss (jaxlm/loss.py): [batch, chunk, vocab] logits exist
  # at a time instead of [batch, length, vocab]; 0 = the whole sequence at once.
  loss_chunk_size: int = 256
  # Attention stays inside each document packed into a window (segment ids). False: plain
  # causal attention across document boundaries, as GPT-2 and nanoGPT train; on a GPU cuDNN's
  # flash kernel then needs no mask tensor (+7% tokens/s for GPT-2 124M on an H200).
  document_mask: bool = True
  log_every: int = 10  # steps between log lines (loss, learning rate, tokens/s, MFU)
  eval_every: int = 250  # steps between evaluations on the held-out split (and at the end)
  eval_batches: int = 8  # batches of global_batch_size held-out windows per evaluation
  # Zero-shot tasks scored at every evaluation, "NAME:PATH,..." as experiments.evaluate's
  # --tasks (jaxlm/tasks.py); the first eval_tasks_limit examples of each (0: all).
  eval_tasks: str = ""
  eval_tasks_limit: int = 0  # eval_tasks: the first N examples of each (0: all)
  checkpoint_every: int = 250  # steps between checkpoints (and at the end)
  keep_checkpoints: int = 2  # newest periodic checkpoints kept
  sample_every: int = 250  # steps between samples in samples.jsonl (and at the end)
  sample_prompts: tuple[str, ...] = ("def ", "import ", "class ")  # what samples continue
  sample_max_new_tokens: int = 64  # tokens per sample (0: no samples)
  sample_temperature: float = 0.8  # sampling temperature of the samples (0: greedy)
  sample_top_k: int = 40  # top-k of the samples (0: all)
  max_nonfinite_steps: int = 3  # non-finite steps (skipped) in a row before the run stops
  # ZeRO over mesh.data, where parameters stay replicated: 1 splits the optimizer state over
  # the data-parallel devices too, 2 also reduces each gradient straight into those shards
  # (reduce-scatter). 0: off. (mesh.fsdp splits parameters as well: ZeRO-3.)
  zero_stage: int = 0
  # Dynamic loss scaling (float16 compute has too little range for small gradients): the
  # objective is multiplied by the scale, the gradients divided; a step whose gradients
  # overflow is skipped and halves the scale (not counted as non-finite), loss_scale_period
  # finite steps in a row double it. auto: on with model.dtype=float16; dynamic; none.
  loss_scaling: str = "auto"
  loss_scale_init: float = 32768.0  # the first scale (2^15)
  loss_scale_period: int = 1000
  # Loss spikes on finite steps (docs/reliability.md): a step whose loss exceeds
  # spike_loss_ratio x, or whose gradient norm exceeds spike_grad_ratio x, their running means
  # (exponential, span spike_window accepted steps; armed after spike_window steps) is a spike.
  # spike_action: none (no detection) | log | skip (update not applied, data moves on) | halt
  # (update not applied, the run stops with an error) | rollback (jaxlm/loop.py: back to the
  # newest checkpoint before the spike, the data moved past the spike's batch and
  # rollback_skip_batches more, the learning rate x rollback_lr_factor for rollback_lr_steps
  # steps; more than max_rollbacks rollbacks stop the run). More than max_spike_steps skips in
  # a row stop the run: the loss has moved for good, which is not a spike. Off by default: near
  # zero loss (late fine-tuning) a ratio fires on noise; opt in where losses are O(1).
  spike_action: str = "none"
  spike_window: int = 100  # accepted steps the running means span
  spike_loss_ratio: float = 2.0  # loss / its running mean that counts as a spike
  spike_grad_ratio: float = 10.0  # gradient norm / its running mean that counts as one
  max_spike_steps: int = 10  # skipped spikes in a row before the run stops
  rollback_skip_batches: int = 0  # batches skipped past the spike's on a rollback
  rollback_lr_factor: float = 1.0  # learning-rate multiplier after a rollback
  rollback_lr_steps: int = 0  # steps the lowered learning rate lasts
  max_rollbacks: int = 3  # rollbacks before the run stops
  # Per-layer statistics (jaxlm/diagnostics.py: RMS of params, gradients and updates per layer,
  # attention-logit maxima, the largest logit) every layer_stats_every steps and at every spike;
  # 0: off (the step then computes none of them).
  layer_stats_every: int = 0
  # Weights & Biases project the metrics also go to ('': none). Needs `pip install wandb`; its own
  # settings apply (WANDB_MODE=offline logs into the run's wandb/ folder). A resumed run continues
  # its W&B run (the id is kept in the run directory's wandb_id).
  wandb_project: str = ""
  # Steps traced with jax.profiler into the run's profile/ folder (TensorBoard's profile plugin,
  # Perfetto): 'START:END' traces steps START .. END-1 as the log numbers them (from 1; the
  # first steps include warm-up); a bare count 'N' means '3:3+N'; '': no trace.
  profile_steps: str = ""
  # JAX's persistent compilation cache in data.data_dir/jax_cache: a rerun with the same shapes
  # loads the compiled step instead of compiling it again.
  compilation_cache: bool = True
  # Pipeline parallelism (mesh.stage > 1, jaxlm/pipeline.py): each step's batch (per gradient
  # accumulation microbatch) flows through the stages in this many microbatches. The GPipe
  # bubble is (stage - 1) / (pipeline_microbatches + stage - 1) of the step.
  pipeline_microbatches: int = 4


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  name: str = "adamw"  # the optimizer (jaxlm/optim.py OPTIMIZERS)
  schedule: str = "cosine"  # after warmup: cosine, constant, or wsd (stable, then decay)
  learning_rate: float = 3e-3  # peak learning rate
  min_learning_rate: float = 3e-4  # where cosine and wsd decay to
  warmup_steps: int = 30  # linear warmup from 0
  decay_fraction: float = 0.2  # wsd: share of num_steps spent decaying at the end
  weight_decay: float = 0.1  # AdamW's decoupled decay, on matrices (not biases, norm scales)
  b1: float = 0.9  # AdamW's first-moment decay
  b2: float = 0.95  # AdamW's second-moment decay
  eps: float = 1e-8  # AdamW's epsilon
  grad_clip: float = 1.0  # global gradient-norm clip (0: none)
  # Parameter groups: embed (token/position tables), head (LM head, classifier), matrices (the
  # layers' kernels), vectors (norm scales, biases). Learning-rate multipliers per group
  # ("embed=0.5,head=2"; unnamed groups: 1) and the groups weight decay applies to.
  lr_multipliers: str = ""
  weight_decay_groups: str = "embed,head,matrices"
  # muon: Muon on the layers' matrices at learning_rate, AdamW (b1, b2, eps) on the rest at
  # muon_adam_lr_scale x learning_rate (jaxlm/optimizers/muon.py).
  muon_beta: float = 0.95  # momentum
  muon_nesterov: bool = True
  muon_ns_steps: int = 5  # Newton-Schulz iterations
  muon_adam_lr_scale: float = 1.0
  # The parameter groups Muon trains (the rest: AdamW). Matrices always; embed (the token table
  # as a [vocab, embed] map) and head (LM head, classifier) may join, as in Moonlight; vectors
  # (norm scales, biases) cannot: they are not matrices.
  muon_groups: str = "matrices"
  # adafactor: factored second moments (jaxlm/optimizers/adafactor.py).
  adafactor_decay_rate: float = 0.8  # second-moment decay exponent (step^-decay_rate)
  adafactor_momentum: float = 0.0  # first-moment decay (0: none, Adafactor's memory saving)
  adafactor_clip_threshold: float = 1.0  # update clipping by RMS (0: none)
  # lion: sign of interpolated momentum (jaxlm/optimizers/lion.py); use a smaller learning_rate.
  lion_b1: float = 0.9
  lion_b2: float = 0.99


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axis sizes; one of them may be -1 ("all remaining devices")."""
  data: int = -1  # data-parallel ways
  fsdp: int = 1  # fully sharded data-parallel ways (params, gradients, optimizer state)
  tensor: int = 1  # tensor-parallel ways (heads, MLP, vocabulary)
  stage: int = 1  # pipeline stages: consecutive layer groups on their own devices


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Fine-tuning (experiments/finetune_classifier.py, finetune_instruct.py,
  finetune_preference.py, finetune_glue.py; jaxlm/finetune/).

  trainable: '' (the default: all weights, 'lora' when model.lora_rank > 0, 'prefix' when
  model.prefix_length > 0; all weights measured to learn where the book's last block + head did
  not, see jaxlm/finetune/), 'head' (the output layer), 'last_n_blocks' (+ the final norm and
  the head: the book's choice, lighter on optimizer memory), 'all', 'lora' (adapters, plus a
  classification head) or 'prefix' (the layers' key/value prefixes, plus a classification head).
  Data given as one file is split train/validation/test by the fractions (seeded by `seed`).
  """
  # what is learned (jaxlm/finetune/), set by the scripts: classifier, instruct, preference,
  # glue
  objective: str = ""
  # glue (experiments.finetune_glue --task): the GLUE or SuperGLUE task whose published files
  # are read, e.g. mrpc, stsb, copa (jaxlm/finetune/glue.py lists them)
  glue_task: str = ""
  trainable: str = ""  # which weights train (see above)
  last_n_blocks: int = 1  # trainable=last_n_blocks: how many
  epochs: int = 5  # passes over the training split
  # Each evaluation scores the train split's first this many examples (a fixed sample, as
  # nanoGPT's estimate_loss and the book's few batches do: scoring all of MNLI's or ReCoRD's
  # training set every epoch would cost more than the epoch); 0: the whole split. Validation
  # and test are always whole.
  train_eval_examples: int = 512
  max_length: int = 0  # tokens per example (0: model.max_seq_len)
  train_fraction: float = 0.7  # of one data file: the training split
  validation_fraction: float = 0.1  # of one data file: the validation split (the rest: test)
  balance: bool = False  # classifier: undersample to equal classes, as the book does
  text_column: str = "text"  # classifier: the text field or column
  label_column: str = "label"  # classifier: the label field or column
  # classifier: the columns of a table without a header row, in order ("label,text" reads the
  # SMS Spam Collection's raw SMSSpamCollection file); "": the table's first row names them
  table_columns: str = ""
  # instruct, preference: the prompt format (model: the init run's chat template; plain: the
  # prompt as written, an input on the next line)
  template: str = "alpaca"
  max_new_tokens: int = 128  # instruct, preference: tokens generated per test answer
  # preference (jaxlm/finetune/preference.py): dpo (Rafailov et al.: against a reference
  # model's log-probabilities) or simpo (Meng et al.: reference-free, length-normalised, with a
  # target margin simpo_gamma).
  preference_loss: str = "dpo"
  beta: float = 0.1  # preference: the reward scale (DPO ~0.1; SimPO's paper uses 2-2.5)
  label_smoothing: float = 0.0  # preference: the share of pairs assumed mislabeled (cDPO)
  simpo_gamma: float = 0.5  # preference_loss=simpo: the target reward margin
  # preference_loss=dpo: a run directory whose model gives the reference log-probabilities
  # (the same tokenizer; e.g. the SFT run when --init is another); "": the --init run's.
  # Either way they are computed once before training: no second model in the train step.
  reference: str = ""


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int = 0  # parameters, data order, dropout and samples derive from it
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  optim: OptimConfig = OptimConfig()
  mesh: MeshConfig = MeshConfig()
  finetune: FinetuneConfig = FinetuneConfig()


_SECTIONS = {f.name: type(f.default) for f in dataclasses.fields(Config) if f.name != "seed"}
TRAINABLE = ("", "head", "last_n_blocks", "all", "lora", "prefix")
TEMPLATES = ("alpaca", "chat", "model", "plain")
PREFERENCE_LOSSES = ("dpo", "simpo")


def default_config_dict() -> ml_collections.ConfigDict:
  """The schema's defaults as a ConfigDict; `configs/*.py` start from it and override.

  The defaults are the CPU default run (configs/default.py): 4 layers x 256 dims with rotary
  positions on the embedded corpus, batch 8 for 500 steps. At that budget the run is limited by
  the number of optimizer steps more than by tokens: batch 8 for 200 steps reached a lower
  validation loss than batch 16 for 100 or 300 steps (measured), so it takes many small steps.
  RoPE instead of learned positions took the same run from 2.214 to 2.133 validation bits per
  byte (measured), at about the same speed.
  """
  # asdict keeps tuples (to_dict makes JSON lists): ml_collections overrides tuples, not lists.
  return ml_collections.ConfigDict(dataclasses.asdict(Config()))


# OpenAI GPT-2 shapes: (num_layers, num_heads, embed_dim).
GPT2_SHAPES = {"124m": (12, 12, 768), "355m": (24, 16, 1024), "774m": (36, 20, 1280),
               "1558m": (48, 25, 1600)}


def gpt2_config_dict(size: str) -> ml_collections.ConfigDict:
  """A GPT-2 shape (learned positions, LayerNorm with biases, GELU MLP 4x, tied embeddings,
  context 1024, vocabulary 50257) on the default data and training settings."""
  num_layers, num_heads, embed_dim = GPT2_SHAPES[size]
  config = default_config_dict()
  config.model.update(num_layers=num_layers, num_heads=num_heads, embed_dim=embed_dim,
                      mlp_dim=4 * embed_dim, vocab_size=50257, max_seq_len=1024,
                      positional="learned", norm="layernorm", mlp="gelu", use_bias=True,
                      tie_embeddings=True)
  config.data.update(seq_len=1024)
  return config


# Published shapes of open checkpoints (their config.json): model.* keys.
OPEN_SHAPES = {
    "llama3_2_1b": dict(num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048,
                        mlp_dim=8192, vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5,
                        rope_scaling="llama3", rope_scaling_factor=32.0,
                        tie_embeddings=True),
    "mistral_7b": dict(num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096,
                       mlp_dim=14336, vocab_size=32000, rope_theta=10000.0, norm_eps=1e-5,
                       sliding_window=4096, tie_embeddings=False),
    "qwen2_5_0_5b": dict(num_layers=24, num_heads=14, num_kv_heads=2, embed_dim=896,
                         mlp_dim=4864, vocab_size=151936, rope_theta=1000000.0, norm_eps=1e-6,
                         qkv_bias=True, tie_embeddings=True),
    "qwen3_0_6b": dict(num_layers=28, num_heads=16, num_kv_heads=8, head_size=128,
                       embed_dim=1024, mlp_dim=3072, vocab_size=151936, rope_theta=1000000.0,
                       norm_eps=1e-6, qk_norm=True, tie_embeddings=True),
}


def open_model_config_dict(name: str, seq_len: int = 2048) -> ml_collections.ConfigDict:
  """An open checkpoint's shape (OPEN_SHAPES: Llama-style blocks, no biases but Qwen2's q/k/v)
  with windows of `seq_len` tokens on the default data and training settings: what
  import_hf builds for that checkpoint, for planning or pretraining from scratch."""
  config = default_config_dict()
  config.model.update(positional="rope", norm="rmsnorm", mlp="swiglu", use_bias=False,
                      max_seq_len=seq_len, **OPEN_SHAPES[name])
  config.data.update(seq_len=seq_len)
  return config


def to_dict(config: Config) -> dict[str, Any]:
  """Plain JSON-able dict (tuples become lists)."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


def plain(value: Any) -> Any:
  """ConfigDicts, dataclass configs and tuples as JSON-able dicts and lists."""
  if isinstance(value, Config):
    return to_dict(value)
  if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
    value = value.to_dict()
  return json.loads(json.dumps(value, default=_json_value))


def _json_value(value: Any) -> Any:
  """A numpy value in a config (e.g. a sweep grid of np.arange) as Python numbers."""
  if hasattr(value, "tolist"):
    return value.tolist()
  raise ConfigError(f"config value {value!r} ({type(value).__name__}) is not a number, string, "
                    f"list or dict.")


def import_python_file(path: str, what: str = "config file") -> types.ModuleType:
  """The module of a Python file given by path (config files, sweep files); ConfigError naming
  `what` and the path when it is missing or fails to load."""
  if not os.path.isfile(path):
    raise ConfigError(f"{what} {path} does not exist; pass an existing .py file.")
  name = "_jaxlm_file_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # the user's file: report where, not a traceback
    raise ConfigError(f"{what} {path} cannot be loaded: {type(e).__name__}: {e}") from None
  return module


def load_file(path: str) -> dict[str, Any]:
  """The plain values of `get_config()` in a config file (before validation)."""
  module = import_python_file(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} defines no get_config(); see configs/default.py.")
  return plain(module.get_config())


def apply_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any],
                    where: str = "") -> dict[str, Any]:
  """A copy of the nested `values` with every {"section.key": value} of `overrides` set.

  The one implementation of --config.K=V for every script, sweep and notebook. A key the
  values do not have is a ConfigError (prefixed by `where`); the values are checked later by
  `validate`.
  """
  out = plain(values)
  prefix = f"{where}: " if where else ""
  for key, value in _dotted(plain(overrides)).items():
    *sections, leaf = key.split(".")
    holder = out
    for section in sections:
      if not isinstance(holder.get(section), dict):
        raise ConfigError(f"{prefix}unknown config key '{key}' (no section '{section}').")
      holder = holder[section]
    if leaf not in holder:
      close = difflib.get_close_matches(leaf, [k for k in holder if isinstance(k, str)], n=1)
      raise ConfigError(f"{prefix}unknown config key '{key}'" + (
          f"; did you mean {'.'.join([*sections, close[0]])}?" if close and sections
          else "." if sections else f"; top-level keys are: {', '.join(sorted(holder))} (a key "
          f"in a section is written section.key, e.g. train.num_steps)."))
    holder[leaf] = plain(value)
  return out


def _dotted(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"train": {"num_steps": 7}} as {"train.num_steps": 7}: a section given as a dict updates
  the fields it names (it does not replace the section)."""
  out: dict[str, Any] = {}
  for key, value in overrides.items():
    if isinstance(value, Mapping):
      out.update(_dotted(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _coerce(field: str, value: Any, default: Any) -> Any:
  """Casts `value` to the type of `default`, or raises a ConfigError naming `field`."""
  if hasattr(value, "tolist") and not isinstance(value, (list, tuple, str)):  # numpy values
    value = value.tolist()
  if isinstance(default, bool):
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
      return value.lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
      return bool(value)
    raise ConfigError(f"{field}={value!r}: expected true or false.")
  if isinstance(default, int):
    if isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
      raise ConfigError(f"{field}={value!r}: expected an integer.")
    return int(value)
  if isinstance(default, float):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{field}={value!r}: expected a number.")
    return float(value)
  if isinstance(default, str):
    if not isinstance(value, str):
      raise ConfigError(f"{field}={value!r}: expected a string.")
    return value
  if isinstance(default, tuple) and default and not isinstance(default[0], str):
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
      raise ConfigError(f"{field}={value!r}: expected a list of numbers.")
    return tuple(float(v) for v in value)
  if isinstance(default, tuple):
    if isinstance(value, str):
      value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
      raise ConfigError(f"{field}={value!r}: expected a list of strings.")
    return tuple(value)
  return value


def section_from_mapping(name: str, cls: type, values: Mapping[str, Any]):
  """`cls` (a dataclass of defaults) from `values`, each coerced to its default's type;
  ConfigError naming '<name>.<key>' for an unknown key or a value of the wrong type."""
  known = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in values.items():
    if key not in known:
      raise ConfigError(
          f"unknown config key '{name}.{key}'; known keys of '{name}': {', '.join(sorted(known))}.")
    kwargs[key] = _coerce(f"{name}.{key}", value, known[key].default)
  return cls(**kwargs)


# Keys renamed since runs were first written: (section, old) -> new. An old run's config.json
# reads as if written today.
RENAMED_KEYS = {("finetune", "task"): "objective"}


def _renamed(section: str, values: Mapping[str, Any]) -> Mapping[str, Any]:
  count = values.get("profile_steps") if section == "train" else None
  if isinstance(count, int) and not isinstance(count, bool):  # (it was a number of steps)
    values = {**values, "profile_steps": str(count) if count > 0 else ""}
  if not any((section, key) in RENAMED_KEYS for key in values):
    return values
  return {RENAMED_KEYS.get((section, key), key): value for key, value in values.items()}


def upgrade(values: Mapping[str, Any]) -> dict[str, Any]:
  """A saved config's nested dict with renamed keys under their new names."""
  return {key: _renamed(key, value) if isinstance(value, Mapping) else value
          for key, value in values.items()}


def profile_window(text: str) -> tuple[int, int] | None:
  """train.profile_steps as (first traced step, first step after the trace), None for ''.
  ValueError if malformed."""
  text = text.strip()
  if not text:
    return None
  if ":" not in text:
    count = int(text)
    if count < 0:
      raise ValueError(text)
    return (3, 3 + count) if count else None
  start, end = (int(part) for part in text.split(":"))
  if start < 1 or end <= start:
    raise ValueError(text)
  return start, end


def from_dict(values: Mapping[str, Any] | ml_collections.ConfigDict) -> Config:
  """Builds a Config from a (possibly partial) nested mapping; unknown keys are errors (renamed
  ones, `RENAMED_KEYS`, are read under their new name)."""
  if isinstance(values, ml_collections.ConfigDict):
    values = values.to_dict()
  if not isinstance(values, Mapping):
    raise ConfigError(f"a config is a dict, ConfigDict or Config, not {type(values).__name__} "
                      f"(a config file: jaxlm.config.load_file(path)).")
  sections: dict[str, Any] = {}
  for key, value in values.items():
    if key in _SECTIONS and isinstance(value, Mapping):
      value = _renamed(key, value)
    if key == "seed":
      sections["seed"] = _coerce("seed", value, 0)
    elif key in _SECTIONS:
      if not isinstance(value, Mapping):
        raise ConfigError(f"config key '{key}' must be a section (a dict), got {value!r}.")
      sections[key] = section_from_mapping(key, _SECTIONS[key], value)
    else:
      raise ConfigError(
          f"unknown config key '{key}'; top-level keys are: seed, {', '.join(_SECTIONS)}.")
  return Config(**sections)


# Checks of one field each, by dotted name: > 0, >= 0, one of a few choices, inside an interval
# (written as the message writes it). `check` runs them first, then the cross-field checks.
_POSITIVE = (
    "model.num_layers", "model.num_heads", "model.embed_dim", "model.mlp_dim",
    "model.vocab_size", "model.max_seq_len", "model.scan_unroll", "model.norm_eps",
    "model.init_std", "model.rope_theta", "model.rope_scaling_factor",
    "model.rope_low_freq_factor", "model.rope_high_freq_factor", "model.rope_original_max_len",
    "data.seq_len", "data.tokenizer_max_sentences",
    "train.num_steps", "train.global_batch_size", "train.microbatches", "train.log_every",
    "train.pipeline_microbatches",
    "train.eval_batches", "train.keep_checkpoints", "train.spike_window", "optim.learning_rate",
    "optim.eps", "optim.muon_ns_steps", "optim.muon_adam_lr_scale",
    "train.loss_scale_init", "train.loss_scale_period",
    "finetune.epochs", "finetune.max_new_tokens", "finetune.beta")
_NON_NEGATIVE = (
    "train.eval_every", "train.checkpoint_every", "train.sample_every",
    "train.sample_max_new_tokens", "train.z_loss", "train.loss_chunk_size", "train.sample_top_k",
    "train.max_nonfinite_steps", "train.eval_tasks_limit", "train.max_spike_steps",
    "train.rollback_skip_batches", "train.rollback_lr_steps", "train.max_rollbacks",
    "train.layer_stats_every", "train.sample_temperature",
    "optim.min_learning_rate", "data.stride", "model.prefix_length",
    "finetune.train_eval_examples",
    "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip",
    "optim.adafactor_clip_threshold", "model.logit_softcap", "finetune.simpo_gamma")
CHOICES = {
    "model.positional": POSITIONALS, "model.norm": NORMS, "model.mlp": MLPS,
    "model.parametrization": PARAMETRIZATIONS,
    "model.rope_scaling": ROPE_SCALINGS,
    "model.attention_impl": ATTENTION_IMPLS, "model.remat_policy": REMAT_POLICIES,
    "model.dtype": DTYPES, "data.corpus": CORPORA, "train.spike_action": SPIKE_ACTIONS,
    "optim.schedule": SCHEDULES, "optim.name": OPTIMIZERS,
    "train.loss_scaling": LOSS_SCALINGS, "train.zero_stage": (0, 1, 2),
    "finetune.trainable": TRAINABLE, "finetune.template": TEMPLATES,
    "finetune.preference_loss": PREFERENCE_LOSSES}
_INTERVALS = {"model.dropout": "[0, 1)", "model.lora_dropout": "[0, 1)",
              "data.validation_fraction": "(0, 1)", "optim.decay_fraction": "[0, 1]",
              "optim.b1": "[0, 1)", "optim.b2": "[0, 1)", "optim.muon_beta": "[0, 1)",
              "optim.lion_b1": "[0, 1)", "optim.lion_b2": "[0, 1)",
              "optim.adafactor_decay_rate": "[0, 1]", "optim.adafactor_momentum": "[0, 1)",
              "finetune.label_smoothing": "[0, 0.5)"}


def _check_fields(config: Config) -> None:
  """ConfigError for the first field that fails its check in the tables above."""
  def value(field: str) -> Any:
    section, name = field.split(".")
    return getattr(getattr(config, section), name)

  if not 0 <= config.seed < 2**32:  # (JAX's PRNG seeds, numpy's and Python's)
    raise ConfigError(f"seed={config.seed}: must be in [0, 2**32).")
  for section in _SECTIONS:  # NaN passes every comparison below: refused here
    for field in dataclasses.fields(getattr(config, section)):
      x = getattr(getattr(config, section), field.name)
      if isinstance(x, float) and not math.isfinite(x):
        raise ConfigError(f"{section}.{field.name}={x}: must be a finite number.")
  for field in _POSITIVE:
    if not value(field) > 0:
      raise ConfigError(f"{field}={value(field)!r}: must be positive.")
  for field in _NON_NEGATIVE:
    if value(field) < 0:
      raise ConfigError(f"{field}={value(field)!r}: must be >= 0.")
  for field, choices in CHOICES.items():
    if value(field) not in choices:
      raise ConfigError(f"{field}={value(field)!r}: must be one of "
                        f"{', '.join(repr(c) if c == '' else str(c) for c in choices)}.")
  for field, interval in _INTERVALS.items():
    x, (low, high) = value(field), map(float, interval[1:-1].split(","))
    if not ((x > low if interval[0] == "(" else x >= low)
            and (x < high if interval[-1] == ")" else x <= high)):
      raise ConfigError(f"{field}={x}: must be in {interval}.")


def _check_pipeline(config: Config) -> None:
  """mesh.stage > 1: the layers split evenly, stacked, and the batch into microbatches."""
  m, t, stages = config.model, config.train, config.mesh.stage
  if m.num_layers % stages:
    raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by mesh.stage={stages}; "
                      f"each stage holds an equal share of consecutive layers: choose a stage "
                      f"count among {divisors(m.num_layers)}.")
  if not m.scan_layers:
    raise ConfigError(f"mesh.stage={stages} needs model.scan_layers=true (the pipeline splits "
                      f"the stacked layer parameters across stages).")
  per_step = t.global_batch_size // t.microbatches
  if per_step % t.pipeline_microbatches:
    raise ConfigError(f"train.pipeline_microbatches={t.pipeline_microbatches} must divide the "
                      f"batch of each step ({per_step} = global_batch_size / microbatches); "
                      f"choose a divisor of {per_step}.")
  if t.layer_stats_every:
    raise ConfigError(f"train.layer_stats_every={t.layer_stats_every} with mesh.stage={stages}: "
                      f"per-layer statistics are not computed through the pipeline yet; set "
                      f"train.layer_stats_every=0 or mesh.stage=1.")


def language_model(config: Config | ModelConfig, what: str) -> ModelConfig:
  """The ModelConfig of `config` (a Config or a ModelConfig); ConfigError if it is neither or a
  classifier, which has no language-model head for `what` (e.g. "generation")."""
  model = config.model if isinstance(config, Config) else config
  if not isinstance(model, ModelConfig):
    raise ConfigError(f"{what} takes a jaxlm Config or ModelConfig, not {type(config).__name__}.")
  if model.num_classes:
    raise ConfigError(f"{what} needs a language model, but this is a classifier "
                      f"(model.num_classes={model.num_classes}): its head predicts classes, not "
                      f"tokens; use the run it was fine-tuned from (its source.json).")
  return model


def check_sampling(config: Config) -> None:
  """ConfigError if a run that samples (train.sample_*) would have no room for a prompt: checked
  by the runs that sample, before they start, instead of failing at the first sample."""
  t, m = config.train, config.model
  if t.sample_max_new_tokens >= m.max_seq_len:
    raise ConfigError(f"train.sample_max_new_tokens={t.sample_max_new_tokens} leaves no room for "
                      f"a prompt in model.max_seq_len={m.max_seq_len}; lower it (0: no samples).")


def check_training_data(data: DataConfig) -> None:
  """ConfigError for data.* values that pretraining would silently follow against the user's
  intent: checked by pretraining before it starts (a saved run still opens for generation)."""
  if data.stride > data.seq_len:
    raise ConfigError(f"data.stride={data.stride} exceeds data.seq_len={data.seq_len}: the "
                      f"tokens between windows would never be trained on; set data.stride <= "
                      f"seq_len (0: equal to it, windows follow each other).")
  for key, corpus in (("files", "text_files"), ("tfds_name", "tfds"), ("tokens", "tokens"),
                      ("mixture", "tokens")):
    if getattr(data, key) and data.corpus != corpus:
      raise ConfigError(f"data.{key} is read only with data.corpus='{corpus}' (data.corpus="
                        f"'{data.corpus}' ignores it); add --config.data.corpus={corpus} or "
                        f"drop data.{key}.")


def divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def normalized_folder(folder: str) -> str:
  """A folder path without surrounding spaces and trailing slashes (`~` expanded, `.` and `..`
  resolved for local paths), so one folder is written one way."""
  folder = folder.strip()
  if "://" in folder:
    return folder.rstrip("/")
  return os.path.normpath(os.path.expanduser(folder)) if folder else ""


def mixture_sources(mixture: str) -> list[tuple[str, float]]:
  """[(folder, weight)] of data.mixture 'DIR_A:0.7,DIR_B:0.3' (a folder may be a gs:// URL: the
  weight follows its last ':'); ConfigError naming the item and the fix."""
  if ";" in mixture:
    raise ConfigError(f"data.mixture={mixture!r}: separate the sources with commas, "
                      f"'/data/a:0.7,/data/b:0.3'.")
  sources = []
  for item in [i.strip() for i in mixture.split(",") if i.strip()]:
    folder, _, weight = item.rpartition(":")
    folder, weight = normalized_folder(folder), weight.strip()
    try:
      value = float(weight)
    except ValueError:
      value = None
    if not folder or "/" in weight or value is None:
      raise ConfigError(f"data.mixture item {item!r} is not FOLDER:WEIGHT; write "
                        f"'/data/a:0.7,/data/b:0.3' (weights relative to each other).")
    if not (value > 0 and math.isfinite(value)):
      raise ConfigError(f"data.mixture item {item!r}: the weight must be a positive number; "
                        f"drop a source rather than giving it weight {weight}.")
    sources.append((folder, value))
  if not sources:
    raise ConfigError("data.mixture is empty; write '/data/a:0.7,/data/b:0.3'.")
  folders = [folder for folder, _ in sources]
  if len(set(folders)) < len(folders):
    raise ConfigError(f"data.mixture names a folder twice ({mixture!r}); give each once with "
                      f"the sum of its weights.")
  smallest = min(sources, key=lambda source: source[1])
  if smallest[1] < 1e-6 * max(weight for _, weight in sources):
    raise ConfigError(f"data.mixture: the weight of {smallest[0]} ({smallest[1]:g}) is under a "
                      f"millionth of the largest: it would get no data; raise it or drop the "
                      f"source.")
  return sources


def parse_groups(text: str, field: str) -> dict[str, float]:
  """{group: value} of a PARAM_GROUPS setting: "embed=0.5,head=2" (optim.lr_multipliers) or
  "embed,head" (optim.weight_decay_groups: each named group -> 1.0). ConfigError naming `field`
  for an unknown group or a value that is not a number >= 0."""
  groups: dict[str, float] = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, has_value, value = part.partition("=")
    name = name.strip()
    if name not in PARAM_GROUPS:
      raise ConfigError(f"{field}={text!r}: {name!r} is not a parameter group; use "
                        f"{', '.join(PARAM_GROUPS)}.")
    try:
      number = float(value) if has_value else 1.0
    except ValueError:
      number = -1.0
    if not number >= 0:
      raise ConfigError(f"{field}={text!r}: {part!r} needs a number >= 0 after '=', e.g. "
                        f"embed=0.5.")
    groups[name] = number
  return groups


def _check_window_layers(m: ModelConfig) -> None:
  if not m.window_layers:
    return
  if not m.sliding_window:
    raise ConfigError(f"model.window_layers={m.window_layers!r} chooses the layers that use "
                      f"model.sliding_window, which is 0; set a window, or drop window_layers.")
  try:
    layers = m.windowed_layers()
  except ValueError:
    raise ConfigError(f"model.window_layers={m.window_layers!r}: write layer indices and "
                      f"ranges separated by commas, e.g. 0,2,4-7.") from None
  beyond = sorted(i for i in layers if i >= m.num_layers)
  if beyond:
    raise ConfigError(f"model.window_layers={m.window_layers!r} names layer {beyond[0]}, but "
                      f"model.num_layers={m.num_layers} (layers 0-{m.num_layers - 1}).")


def check(config: Config) -> Config:
  """Checks ranges and cross-field constraints; returns the config unchanged."""
  _check_fields(config)
  m, d, t, o, f = config.model, config.data, config.train, config.optim, config.finetune
  if m.num_kv_heads < 0 or m.head_size < 0 or m.sliding_window < 0:
    field, value = next((k, getattr(m, k)) for k in ("num_kv_heads", "head_size",
                                                    "sliding_window") if getattr(m, k) < 0)
    raise ConfigError(f"model.{field}={value} must be >= 0 (0: "
                      + {"num_kv_heads": "as many as num_heads", "head_size": "embed_dim / "
                         "num_heads", "sliding_window": "the whole context"}[field] + ").")
  _check_window_layers(m)
  if m.num_heads % m.kv_heads:
    raise ConfigError(
        f"model.num_kv_heads={m.num_kv_heads} does not divide model.num_heads={m.num_heads}: "
        f"each key/value head serves an equal group of query heads; choose among "
        f"{', '.join(str(h) for h in divisors(m.num_heads))}.")
  if m.embed_dim % m.num_heads and not m.head_size:
    raise ConfigError(
        f"model.num_heads={m.num_heads} does not divide model.embed_dim={m.embed_dim}; "
        f"choose num_heads among the divisors of embed_dim (e.g. "
        f"{', '.join(str(h) for h in divisors(m.embed_dim) if h <= 32)}).")
  if t.batch_warmup_tokens < 0:
    raise ConfigError(f"train.batch_warmup_tokens={t.batch_warmup_tokens} must be >= 0 (0: off).")
  if t.batch_warmup_tokens:
    start, full = t.batch_warmup_start, t.global_batch_size
    ratio = full // start if start > 0 and full % start == 0 else 0
    if ratio < 1 or ratio & (ratio - 1):
      raise ConfigError(
          f"train.batch_warmup_start={start} must divide train.global_batch_size={full} by a "
          f"power of two (the batch doubles up to it), e.g. {max(full // 8, 1)}.")
    if start % t.microbatches:
      raise ConfigError(f"train.batch_warmup_start={start} is not divisible by "
                        f"train.microbatches={t.microbatches}: every step splits its rows into "
                        f"that many microbatches.")
  try:
    profile_window(t.profile_steps)
  except ValueError:
    raise ConfigError(f"train.profile_steps={t.profile_steps!r}: use START:END (steps START .. "
                      f"END-1, START >= 1, e.g. 10:15) or a number of steps after step 2; '' "
                      f"for none.") from None
  if m.parametrization == "mup" and m.mup_base_width <= 0:
    raise ConfigError(f"model.parametrization=mup needs model.mup_base_width (> 0, got "
                      f"{m.mup_base_width}): the embed_dim the learning rate was tuned at, e.g. "
                      f"--config.model.mup_base_width={m.embed_dim}.")
  if m.parametrization == "mup" and not m.head_size and m.mup_base_width < m.num_heads:
    raise ConfigError(f"model.mup_base_width={m.mup_base_width} is narrower than "
                      f"model.num_heads={m.num_heads}: the base model needs a head width >= 1.")
  if m.num_classes < 0:
    raise ConfigError(f"model.num_classes={m.num_classes}: use 0 (language model), 1 (a "
                      f"regression head) or >= 2 classes.")
  if m.lora_rank < 0:
    raise ConfigError(f"model.lora_rank={m.lora_rank} must be >= 0 (0: no LoRA).")
  if m.lora_rank and m.lora_alpha <= 0:
    raise ConfigError(f"model.lora_alpha={m.lora_alpha} must be positive.")
  unknown = [t for t in m.lora_targets if t not in LORA_TARGETS]
  if unknown or (m.lora_rank and not m.lora_targets):
    raise ConfigError(f"model.lora_targets={','.join(m.lora_targets)!r}: choose among "
                      f"{', '.join(LORA_TARGETS)}.")
  present = {"query", "key", "value", "out"} | (
      {"fc", "proj"} if m.mlp != "swiglu" else {"gate", "up", "down"})
  if m.lora_rank and not present & set(m.lora_targets):
    raise ConfigError(f"model.lora_targets={','.join(m.lora_targets)!r} names no layer of this "
                      f"model (mlp={m.mlp!r} has {', '.join(sorted(present))}).")
  if m.rope_scaling and m.rope_high_freq_factor <= m.rope_low_freq_factor:
    raise ConfigError(f"model.rope_high_freq_factor={m.rope_high_freq_factor} must exceed "
                      f"model.rope_low_freq_factor={m.rope_low_freq_factor} (Llama 3: 4 and 1).")
  if m.positional == "rope" and m.head_dim % 2:
    raise ConfigError(f"model.positional='rope' needs an even head dim; the head dim is "
                      f"{m.head_dim}. Change model.num_heads, model.embed_dim or "
                      f"model.head_size.")
  if m.dropout > 0 and m.attention_impl not in ("reference", "auto"):
    raise ConfigError(
        f"model.dropout={m.dropout} with model.attention_impl='{m.attention_impl}': the fused "
        f"kernels have no attention dropout; use attention_impl='reference' (or 'auto') or "
        f"dropout=0.")
  if m.attention_impl == "triton" and m.sliding_window:
    raise ConfigError(f"model.attention_impl='triton' with model.sliding_window="
                      f"{m.sliding_window}: jax's GPU flash kernel has no sliding window; use "
                      f"attention_impl='auto' (cuDNN) or 'xla'.")
  if m.scan_unroll > m.num_layers:
    raise ConfigError(f"model.scan_unroll={m.scan_unroll} exceeds model.num_layers="
                      f"{m.num_layers}; use 1..{m.num_layers}.")

  if d.corpus == "text_files" and not d.files:
    raise ConfigError("data.corpus='text_files' needs data.files, e.g. "
                      "--config.data.files='/data/*.txt' (comma-separate several globs).")
  if d.corpus == "tfds" and not d.tfds_name:
    raise ConfigError("data.corpus='tfds' needs data.tfds_name, e.g. "
                      "--config.data.tfds_name=tiny_shakespeare.")
  if d.corpus == "tokens" and bool(d.tokens) == bool(d.mixture):
    raise ConfigError("data.corpus='tokens' needs one of data.tokens (a prepare_data folder, "
                      "e.g. --config.data.tokens=/data/fineweb) or data.mixture "
                      "('DIR_A:0.7,DIR_B:0.3')" + (", not both." if d.tokens else "."))
  if d.mixture:
    mixture_sources(d.mixture)  # (ConfigError for a malformed one)
  if d.seq_len > m.max_seq_len:
    raise ConfigError(
        f"data.seq_len={d.seq_len} is longer than model.max_seq_len={m.max_seq_len}, the "
        f"context the model is built for; lower data.seq_len or raise model.max_seq_len.")

  if t.global_batch_size % t.microbatches:
    raise ConfigError(
        f"train.global_batch_size={t.global_batch_size} is not divisible by "
        f"train.microbatches={t.microbatches}; pick microbatches that divide the batch.")
  if not 0.0 < t.rollback_lr_factor <= 1.0:
    raise ConfigError(f"train.rollback_lr_factor={t.rollback_lr_factor}: must be in (0, 1] (the "
                      f"learning rate's multiplier after a rollback; e.g. 0.5).")
  for name in ("spike_loss_ratio", "spike_grad_ratio"):
    if not getattr(t, name) > 1.0:
      raise ConfigError(f"train.{name}={getattr(t, name)}: must be > 1 (a multiple of the "
                        f"running mean that counts as a spike; e.g. 2.0).")
  parse_groups(o.lr_multipliers, "optim.lr_multipliers")
  parse_groups(o.weight_decay_groups, "optim.weight_decay_groups")
  muon_groups = parse_groups(o.muon_groups, "optim.muon_groups")
  if "vectors" in muon_groups or "matrices" not in muon_groups:
    why = ("vectors: norm scales and biases are not matrices (they stay on AdamW)"
           if "vectors" in muon_groups else "its list lacks matrices, the groups it is for")
    raise ConfigError(f"optim.muon_groups={o.muon_groups!r}: Muon takes matrices and optionally "
                      f"embed and head, not {why}; e.g. matrices,head.")
  if o.min_learning_rate > o.learning_rate:
    raise ConfigError(f"optim.min_learning_rate={o.min_learning_rate} exceeds "
                      f"optim.learning_rate={o.learning_rate}; lower it.")

  sizes = dataclasses.asdict(config.mesh)
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{name}={size}: must be a positive size or -1 (all remaining).")
  if sum(1 for s in sizes.values() if s == -1) > 1:
    raise ConfigError(f"mesh {sizes}: at most one axis may be -1.")
  if config.mesh.stage == -1:
    raise ConfigError("mesh.stage=-1: give the number of pipeline stages explicitly (it must "
                      "divide model.num_layers); -1 is for data, fsdp or tensor.")
  if config.mesh.stage > 1:
    _check_pipeline(config)

  if m.lora_rank and f.trainable not in ("", "lora"):
    raise ConfigError(f"finetune.trainable={f.trainable!r} conflicts with model.lora_rank="
                      f"{m.lora_rank}: LoRA trains only the adapters (and a classification "
                      f"head); drop one of the two.")
  if m.prefix_length and m.lora_rank:
    raise ConfigError(f"model.prefix_length={m.prefix_length} and model.lora_rank={m.lora_rank}: "
                      f"prefix tuning and LoRA are two ways to adapt a model; set one of them "
                      f"to 0.")
  if m.prefix_length and f.trainable not in ("", "prefix"):
    raise ConfigError(f"finetune.trainable={f.trainable!r} conflicts with model.prefix_length="
                      f"{m.prefix_length}: prefix tuning trains only the prefixes (and a "
                      f"classification head); drop one of the two.")
  if f.trainable == "prefix" and not m.prefix_length:
    raise ConfigError("finetune.trainable='prefix' needs prefixes: set "
                      "--config.model.prefix_length (e.g. 16).")
  if f.trainable == "lora" and not m.lora_rank:
    raise ConfigError("finetune.trainable='lora' needs adapters: set --config.model.lora_rank "
                      "(e.g. 8).")
  if not 1 <= f.last_n_blocks <= m.num_layers:
    raise ConfigError(f"finetune.last_n_blocks={f.last_n_blocks} must be in [1, "
                      f"model.num_layers={m.num_layers}].")
  if f.max_length < 0 or f.max_length > m.max_seq_len:
    raise ConfigError(f"finetune.max_length={f.max_length} must be in [0, model.max_seq_len="
                      f"{m.max_seq_len}] (0: the whole context).")
  if f.table_columns:
    names = [c.strip() for c in f.table_columns.split(",")]
    if "" in names or len(set(names)) < len(names):
      raise ConfigError(f"finetune.table_columns={f.table_columns!r}: name each column once, "
                        f"comma-separated (e.g. 'label,text').")
    for key, column in (("text_column", f.text_column), ("label_column", f.label_column)):
      if column not in names:
        raise ConfigError(f"finetune.table_columns={f.table_columns!r} has no column "
                          f"{column!r} (finetune.{key}); name it there or set finetune.{key}.")
  if not (0 < f.train_fraction < 1 and 0 <= f.validation_fraction < 1
          and f.train_fraction + f.validation_fraction <= 1):
    raise ConfigError(f"finetune.train_fraction={f.train_fraction} and validation_fraction="
                      f"{f.validation_fraction} must be in (0, 1) and sum to at most 1 (the rest "
                      f"is the test split).")
  return config


def validate(values: Mapping[str, Any] | ml_collections.ConfigDict | Config) -> Config:
  """The one entry point: mapping/ConfigDict/Config -> checked, frozen Config.

  Paths (`data.data_dir`, `data.files`, `data.tokenizer`) are expanded (`~`), and
  comma-separated `model.lora_targets` split.
  """
  config = values if isinstance(values, Config) else from_dict(values)
  data = config.data
  expanded = dataclasses.replace(
      data,
      data_dir=os.path.expanduser(data.data_dir),
      files=",".join(os.path.expanduser(f.strip()) for f in data.files.split(",") if f.strip()),
      tokenizer=os.path.expanduser(data.tokenizer) if data.tokenizer else "",
      tokens=normalized_folder(data.tokens),
      mixture=",".join(f.strip() for f in data.mixture.split(",") if f.strip()))
  # --config.model.lora_targets=query,value arrives as one comma-joined string.
  targets = tuple(t.strip() for item in config.model.lora_targets for t in item.split(",")
                  if t.strip())
  model = dataclasses.replace(config.model, lora_targets=targets)
  return check(dataclasses.replace(config, data=expanded, model=model))


def diff(base: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Flat {dotted.key: {'from': a, 'to': b}} of the values in `new` that differ from `base`."""
  out: dict[str, Any] = {}
  for key in sorted(set(base) | set(new)):
    a, b = base.get(key), new.get(key)
    name = f"{prefix}{key}"
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out.update(diff(a, b, name + "."))
    elif a != b:
      out[name] = {"from": a, "to": b}
  return out


def replace(config: Config, **sections: Mapping[str, Any]) -> Config:
  """Returns `config` with some section fields replaced, e.g. replace(c, model={'dtype': ...}),
  checked and coerced as `validate` checks a dict (a typo or a value of the wrong type is a
  ConfigError naming the field)."""
  return validate(apply_overrides(to_dict(config), sections))
