"""Train state, loss, and the pure train/eval steps, jitted with shardings from `sharding.py`.

State is created sharded: `jax.eval_shape` gives the abstract state with logical axis names,
`sharding.py` turns them into NamedShardings, and `jax.jit(init, out_shardings=...)` builds
every shard where it lives. No device ever holds the full unsharded state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import diagnostics, sharding
from jaxlm import params as params_lib
from jaxlm.config import Config, ConfigError, ModelConfig
from jaxlm.loss import LossFn, class_logits, classifier_loss, lm_loss, loss_for  # noqa: F401
from jaxlm.model import Transformer, init_params, resolve_attention_impl
from jaxlm.optim import make_optimizer, make_schedule

DeviceBatch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `rng` is a raw uint32[2] key; step t uses fold_in(rng, t).
  `spike_stats` float32[3]: running means of the loss and gradient norm over accepted steps,
  and how many steps were accepted (see `spike_update`). `rollback_lr_until` int32[]: steps
  before it run at train.rollback_lr_factor x the learning rate (set by a rollback, see
  `jaxlm.loop`). `loss_scale_log2` float32[] and `loss_scale_good_steps` int32[]: the dynamic
  loss scale (log2; train.loss_scaling) and the finite steps since it last changed. All are
  checkpointed with the rest, so a resumed run decides spikes, learning rates and loss scales
  exactly as an uninterrupted one (a checkpoint from before a field existed restores it as
  zeros: loss scale 1, which then grows)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  spike_stats: jax.Array = dataclasses.field(
      default_factory=lambda: jnp.zeros([3], jnp.float32))
  rollback_lr_until: jax.Array = dataclasses.field(
      default_factory=lambda: jnp.zeros([], jnp.int32))
  loss_scale_log2: jax.Array = dataclasses.field(
      default_factory=lambda: jnp.zeros([], jnp.float32))
  loss_scale_good_steps: jax.Array = dataclasses.field(
      default_factory=lambda: jnp.zeros([], jnp.int32))


# The dynamic loss scale stays within [2^0, 2^MAX_LOSS_SCALE_LOG2].
MAX_LOSS_SCALE_LOG2 = 24.0


def loss_scaling_on(config: Config) -> bool:
  """Whether the train step scales its loss (train.loss_scaling; auto: float16 compute)."""
  scaling = config.train.loss_scaling
  return scaling == "dynamic" or (scaling == "auto" and config.model.dtype == "float16")


def next_loss_scale(config: Config, log2: jax.Array, good_steps: jax.Array, overflow: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """(log2 scale, finite steps in a row) after a step: an overflow halves the scale (and
  restarts the count), train.loss_scale_period finite steps in a row double it."""
  good_steps = jnp.where(overflow, 0, good_steps + 1)
  grow = good_steps >= config.train.loss_scale_period
  log2 = jnp.where(overflow, log2 - 1.0, jnp.where(grow, log2 + 1.0, log2))
  return (jnp.clip(log2, 0.0, MAX_LOSS_SCALE_LOG2),
          jnp.where(grow, 0, good_steps).astype(jnp.int32))


def spike_update(config: Config, stats: jax.Array, loss: jax.Array, grad_norm: jax.Array,
                 finite: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(is a spike, apply the update, new stats) for a step's loss and gradient norm.

  stats = [loss mean, grad-norm mean, accepted steps]: a plain mean over the first steps, then
  exponential with span train.spike_window (weight 2 / (window + 1)); a spike needs
  spike_window accepted steps before it. Under every action but `log` a spike is not applied
  and does not enter the means.
  """
  t = config.train
  loss_mean, grad_mean, seen = stats[0], stats[1], stats[2]
  armed = (seen >= t.spike_window) & (t.spike_action != "none")
  spike = armed & finite & ((loss > t.spike_loss_ratio * loss_mean)
                            | (grad_norm > t.spike_grad_ratio * grad_mean))
  apply = finite & ~(spike & (t.spike_action != "log"))
  weight = jnp.maximum(2.0 / (t.spike_window + 1), 1.0 / (seen + 1))
  updated = jnp.stack([loss_mean + weight * (loss - loss_mean),
                       grad_mean + weight * (grad_norm - grad_mean), seen + 1])
  # The applied steps enter the means (under `log` a spike is applied, so the means follow it).
  return spike, apply, jnp.where(apply, updated, stats)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted functions of a run and the shardings they use.

  `init` (rng -> fresh TrainState), `init_from` (params, rng -> TrainState around given params,
  e.g. a pretrained model being fine-tuned), `train` and `eval` trace under the run's mesh and
  logical-axis rules; `compile_train` (state, batch -> compiled step) compiles the train step
  ahead of time for arrays or ShapeDtypeStructs like `state` and `batch` (for timing and
  memory analysis); `compile_init` (-> the compiled `init`, for a key like
  jax.random.PRNGKey(seed)) does the same for the initial state, so that it can compile while
  the train step does. `split` divides params into (trainable, frozen).
  """
  init: Callable[[jax.Array], TrainState]
  init_from: Callable[[Any, jax.Array], TrainState]
  train: Callable[[TrainState, DeviceBatch], tuple[TrainState, Metrics]]
  eval: Callable[[Any, DeviceBatch], Metrics]
  split: Callable[[Any], tuple[Any, Any]]
  state_shardings: Any
  abstract_state: TrainState
  compile_train: Callable[[Any, Any], Any]
  compile_init: Callable[[], Any]


def use_compilation_cache(directory: str) -> None:
  """Turns on JAX's persistent compilation cache in `directory` for this process.

  A rerun of the same step (same shapes, jax version and devices) then loads the executable
  instead of compiling it: on a GPU most of a first compile is XLA's GEMM autotuning. Entries
  are written atomically, so several processes (a sweep, a multi-host job on a shared
  filesystem) can share one directory. Process-wide: the first directory set wins.
  """
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", directory)


BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def abstract_batch(config: Config, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs [global_batch_size, seq_len] sharded like the real batches."""
  shape = (config.train.global_batch_size, config.data.seq_len)
  batch_sharding = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32,
                                  sharding=batch_sharding) for k in BATCH_KEYS}


class DoesNotFit(ConfigError):
  """The compiled train step needs more memory than a device has."""


def step_bytes(compiled: Any) -> int:
  """Peak bytes per device of a compiled step: its arguments, the outputs that do not reuse a
  donated input buffer, and XLA's temporaries."""
  memory = compiled.memory_analysis()
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


def _host_available_bytes() -> int | None:
  """MemAvailable of this host (Linux), or None where unknown."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def device_memory_bytes(mesh: Mesh) -> tuple[int, str] | None:
  """(bytes one device of `mesh` can use, what they are) or None where unknown.

  GPU/TPU: the allocator's limit (`memory_stats()['bytes_limit']`). CPU: the host's available
  memory shared by this process's devices of the mesh.
  """
  device = mesh.devices.flat[0]
  if device.platform == "cpu":
    available = _host_available_bytes()
    local = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    if available is None:
      return None
    return available // max(local, 1), f"available host memory shared by {local} CPU devices"
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]), f"{device.device_kind} memory"


def check_fits(needed: int, available: tuple[int, str] | None, config: Config,
               length_knob: str = "") -> None:
  """DoesNotFit (one line: the bytes needed and available and the knobs that cut them) when a
  step needing `needed` bytes per device cannot run in `available`. length_knob: what sets
  the sequence length (default data.seq_len)."""
  if available is None or needed <= available[0]:
    return
  gib = lambda n: f"{n / 2**30:.2f} GiB"
  knobs = [f"train.global_batch_size={config.train.global_batch_size} (or raise "
           f"train.microbatches={config.train.microbatches})",
           length_knob or f"data.seq_len={config.data.seq_len}"]
  if config.model.remat_policy != "full":
    knobs.append(f"model.remat_policy={config.model.remat_policy} -> full")
  if config.model.dtype == "float32":
    knobs.append("model.dtype=bfloat16")
  knobs.append("mesh.fsdp (shard the state over more devices)")
  raise DoesNotFit(
      f"the compiled train step needs {gib(needed)} per device but only {gib(available[0])} "
      f"are available ({available[1]}); lower {', '.join(knobs)}. Nothing was written.")


def compile_checked(config: Config, steps: Steps, batch: Any, mesh: Mesh, length_knob: str = ""
                    ) -> tuple[Any, float]:
  """(the train step compiled from shapes for `batch`, the seconds compiling took), with the
  persistent compilation cache on if train.compilation_cache; DoesNotFit (see `check_fits`)
  unless it fits one device of `mesh`. Runs before anything is written, so that a step that
  cannot fit is refused before the run directory is touched."""
  if config.train.compilation_cache:
    use_compilation_cache(os.path.join(config.data.data_dir, "jax_cache"))
  started = time.perf_counter()
  compiled = steps.compile_train(steps.abstract_state, batch)
  seconds = time.perf_counter() - started
  check_fits(step_bytes(compiled), device_memory_bytes(mesh), config, length_knob)
  return compiled, seconds


def abstract_params(model_config: ModelConfig, mesh: Mesh) -> Any:
  """The parameters of a model on `mesh` as ShapeDtypeStructs with their shardings, from the
  model config alone (no batch, optimizer or train step): what restoring, importing and
  fine-tuning need to place arrays. Nothing is allocated."""
  sharding.check_model(model_config, mesh)
  model = Transformer(model_config)

  def init(rng: jax.Array) -> Any:
    return init_params(model, rng, jnp.zeros((1, 1), jnp.int32))

  return _abstract(init, mesh)[0]


def _abstract(init: Callable[[jax.Array], Any], mesh: Mesh) -> tuple[Any, Any]:
  """(ShapeDtypeStructs with shardings, the shardings) of what `init` (rng -> boxed tree)
  returns, from shapes alone. The key is abstract too (not jax.random.PRNGKey(0), a concrete
  array), so this also works for devices this process cannot run on (a TPU topology planned on
  a CPU machine, see experiments/plan.py)."""
  with jax.set_mesh(mesh), sharding.axis_rules():
    boxed = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32))
  shardings = sharding.state_shardings(boxed, mesh)
  return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                      nn.unbox(boxed), shardings), shardings


def _under_rules(fn: Callable, mesh: Mesh) -> Callable:
  """`fn` traced and run under `mesh` and the logical-axis rules."""
  @functools.wraps(fn)
  def wrapped(*args):
    with jax.set_mesh(mesh), sharding.axis_rules():
      return fn(*args)
  return wrapped


def make_eval_step(model_config: ModelConfig, mesh: Mesh, loss: LossFn
                   ) -> Callable[[Any, DeviceBatch], Metrics]:
  """(params, batch) -> the loss's sums (no dropout), jitted with the params' shardings from
  the model config alone (`abstract_params`): no optimizer or train step is built."""
  model = Transformer(model_config)
  param_shardings = jax.tree.map(lambda leaf: leaf.sharding,
                                 abstract_params(model_config, mesh))
  return _under_rules(jax.jit(lambda params, batch: loss(model, params, batch, None)[1],
                             in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                             out_shardings=sharding.replicated(mesh)), mesh)


def make_steps(config: Config, mesh: Mesh, *, loss: LossFn | None = None,
               trainable: Callable[[params_lib.Path], bool] | None = None) -> Steps:
  """Builds init/train/eval for `config` on `mesh`; compilation happens on first call.

  loss: the task's loss (default `loss_for(config)`). trainable: which params train, by path
  (default all). Frozen params get no gradient (the step differentiates only the trainable
  half, so XLA never computes the rest) and no optimizer state. Microbatching
  (`train.microbatches`), skipping non-finite steps and the shardings hold for every task.
  """
  sharding.check_batch(config.train, mesh)
  sharding.check_model(config.model, mesh)
  # 'auto' attention is resolved for the mesh's devices (which may be a TPU topology planned
  # on a CPU host), not for the host's default backend.
  platform = mesh.devices.flat[0].platform
  config = dataclasses.replace(config, model=dataclasses.replace(
      config.model, attention_impl=resolve_attention_impl(config.model, platform)))
  if mesh.shape["stage"] != config.mesh.stage:  # the config's checks cover its own stage count
    raise ConfigError(
        f"the mesh has {mesh.shape['stage']} pipeline stages but mesh.stage={config.mesh.stage}; "
        f"build the mesh from the config (sharding.make_mesh(config.mesh)).")
  # Pipeline stages come from the mesh (mesh.stage); the eval step and decoding run unpipelined.
  model = Transformer(config.model, pipeline_stages=mesh.shape["stage"],
                      pipeline_microbatches=config.train.pipeline_microbatches)
  loss = loss_for(config) if loss is None else loss
  optimizer = make_optimizer(config.optim, config.train.num_steps,
                             config.model.width_multiplier)
  schedule = make_schedule(config.optim, config.train.num_steps)
  microbatches = config.train.microbatches
  stats_every = config.train.layer_stats_every
  use_dropout = config.model.dropout > 0 or (config.model.lora_rank > 0
                                              and config.model.lora_dropout > 0)

  def split(params: Any) -> tuple[Any, Any]:
    if trainable is None:
      return params, {}
    return params_lib.partition(params, trainable)

  scaling = loss_scaling_on(config)
  initial_log2 = (min(math.log2(config.train.loss_scale_init), MAX_LOSS_SCALE_LOG2) if scaling
                  else 0.0)

  def new_state(params: Any, rng: jax.Array) -> TrainState:
    trainable = split(params)[0]
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      opt_state=sharding.unbox_foreign(optimizer.init(trainable), trainable),
                      rng=rng, loss_scale_log2=jnp.float32(initial_log2))

  def init_boxed(rng: jax.Array) -> TrainState:
    tokens = jnp.zeros((1, min(config.data.seq_len, config.model.max_seq_len)), jnp.int32)
    return new_state(init_params(model, rng, tokens), rng)

  def init(rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    state = nn.unbox(init_boxed(init_rng))
    return state.replace(rng=state_rng)

  abstract_state, state_shardings = _abstract(init_boxed, mesh)
  if config.train.zero_stage:  # ZeRO-1/2: the optimizer state split over mesh.data as well
    opt_shardings = jax.tree.map(lambda s, a: sharding.over_data(s, a.shape),
                                 state_shardings.opt_state, abstract_state.opt_state)
    state_shardings = state_shardings.replace(opt_state=opt_shardings)
    abstract_state = abstract_state.replace(opt_state=jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state.opt_state, opt_shardings))
  # ZeRO-2: each gradient reduced straight into its optimizer-state shards (a reduce-scatter
  # over data instead of an all-reduce); the trainable params' shardings, split over data.
  grad_shardings = (jax.tree.map(lambda s, a: sharding.over_data(s, a.shape),
                                 split(state_shardings.params)[0],
                                 split(abstract_state.params)[0])
                    if config.train.zero_stage == 2 else None)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  # Microbatch m takes rows m, m+M, m+2M, ...: each device keeps its own rows (no reshuffling
  # across devices), because every device's block of rows is a multiple of M long.
  micro_sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))

  def train_step(state: TrainState, batch: DeviceBatch) -> tuple[TrainState, Metrics]:
    step_rng = jax.random.fold_in(state.rng, state.step)
    trainable_params, frozen = split(state.params)

    # (ldexp: exactly 2^k; exp2 rounds on some backends)
    loss_scale = (jnp.ldexp(jnp.float32(1.0), state.loss_scale_log2.astype(jnp.int32))
                  if scaling else None)

    def objective(trainable_params, micro, rng):
      value, sums = loss(model, params_lib.combine(trainable_params, frozen), micro, rng)
      # (scaled before the backward pass runs through the float16 activations)
      return (value * loss_scale if scaling else value), sums

    def micro_grads(m: jax.Array, micro: DeviceBatch):
      rng = jax.random.fold_in(step_rng, m) if use_dropout else None
      return jax.grad(objective, has_aux=True)(trainable_params, micro, rng)

    if microbatches == 1:
      grads, sums = micro_grads(jnp.int32(0), batch)
    else:
      def split_rows(x):  # [batch, ...] -> [microbatches, batch / microbatches, ...]
        x = x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, micro_sharding)

      micro_batches = jax.tree.map(split_rows, batch)

      def accumulate(carry, inputs):
        return jax.tree.map(jnp.add, carry, micro_grads(*inputs)), None

      shapes = jax.eval_shape(micro_grads, jnp.int32(0),
                              jax.tree.map(lambda x: x[0], micro_batches))
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
      (grads, sums), _ = jax.lax.scan(accumulate, zeros,
                                      (jnp.arange(microbatches), micro_batches))
    if grad_shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    denominator = jnp.maximum(sums["weight_sum"], 1.0)
    grad_denominator = denominator * loss_scale if scaling else denominator
    grads = jax.tree.map(lambda g: g / grad_denominator, grads)
    loss_value = sums["loss_sum"] / denominator
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable_params)
    learning_rate = schedule(state.step)
    if config.train.rollback_lr_factor != 1.0:  # after a rollback (see TrainState)
      factor = jnp.where(state.step < state.rollback_lr_until,
                         jnp.float32(config.train.rollback_lr_factor), jnp.float32(1.0))
      updates = jax.tree.map(lambda u: u * factor.astype(u.dtype), updates)
      learning_rate = learning_rate * factor
    updated = optax.apply_updates(trainable_params, updates)
    # A non-finite step, or a spike under any spike_action but log, is not applied (params and
    # optimizer state unchanged, step still advances so data and dropout move on); the loop
    # stops after too many in a row, or rolls back.
    finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
    # With loss scaling, gradients that overflow while the loss is finite mean a scale too
    # large: skipped and rescaled, not a failure of the run.
    overflow = (jnp.isfinite(loss_value) & ~finite) if scaling else jnp.bool_(False)
    spike, apply, spike_stats = spike_update(config, state.spike_stats, loss_value, grad_norm,
                                             finite)
    scale_log2, good_steps = state.loss_scale_log2, state.loss_scale_good_steps
    if scaling:
      scale_log2, good_steps = next_loss_scale(config, scale_log2, good_steps, overflow)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=params_lib.combine(keep(updated, trainable_params), frozen),
        opt_state=keep(opt_state, state.opt_state), spike_stats=spike_stats,
        loss_scale_log2=scale_log2, loss_scale_good_steps=good_steps)
    metrics = {"train_loss": loss_value, "grad_norm": grad_norm,
               "learning_rate": learning_rate,
               "nonfinite": (~finite & ~overflow).astype(jnp.int32),
               "train_tokens": sums["weight_sum"], "spike": spike.astype(jnp.int32),
               "loss_mean": state.spike_stats[0], "grad_norm_mean": state.spike_stats[1]}
    if scaling:  # the scale this step used, and whether it overflowed (then skipped)
      metrics.update(loss_scale=loss_scale, overflow=overflow.astype(jnp.int32))
    if stats_every:  # per-layer statistics, computed only at the steps that report them
      first = batch if microbatches == 1 else jax.tree.map(lambda x: x[0], micro_batches)
      diagnose = lambda: diagnostics.layer_stats(model, config, state.params, first, grads,
                                                 updates)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(diagnose))
      metrics["layer_stats"] = jax.lax.cond(((state.step + 1) % stats_every == 0) | spike,
                                            diagnose, lambda: zeros)
    return new_state, metrics

  # One sharding for the whole batch dict: every key (whatever the task's) splits its rows.
  train_jit = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                      out_shardings=(state_shardings, replicated), donate_argnums=0)
  init_from = jax.jit(new_state, in_shardings=(state_shardings.params, replicated),
                      out_shardings=state_shardings, donate_argnums=0)
  init_jit = jax.jit(init, in_shardings=replicated, out_shardings=state_shardings)

  def compile_train(state: Any, batch: Any):
    with jax.set_mesh(mesh), sharding.axis_rules():
      return train_jit.lower(state, batch).compile()

  def compile_init():
    with jax.set_mesh(mesh), sharding.axis_rules():
      return init_jit.lower(jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()

  return Steps(
      init=_under_rules(init_jit, mesh),
      init_from=_under_rules(init_from, mesh), train=_under_rules(train_jit, mesh),
      eval=make_eval_step(config.model, mesh, loss),
      split=split, state_shardings=state_shardings, abstract_state=abstract_state,
      compile_train=compile_train, compile_init=compile_init)
