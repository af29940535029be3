"""Train state, loss, and the pure train/eval steps, jitted with shardings from `sharding.py`.

State is created sharded: `jax.eval_shape` gives the abstract state with logical axis names,
`sharding.py` turns them into NamedShardings, and `jax.jit(init, out_shardings=...)` builds
every shard where it lives. No device ever holds the full unsharded state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm import sharding
from jaxlm.config import Config, ConfigError, ModelConfig
from jaxlm import loss as loss_lib
from jaxlm.model import Transformer, lm_head, resolve_attention_impl
from jaxlm.optim import make_optimizer, make_schedule

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `rng` is a raw uint32[2] key; step t uses fold_in(rng, t)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def loss_sums(params: Any, batch: Batch, model: Transformer, z_loss: float,
              dropout_rng: jax.Array | None, chunk_size: int = 0
              ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """(weighted sum of nll + z_loss * log Z^2, (sum of nll, sum of weights)) over a batch.

  Sums, not means, so microbatches add up to exactly the full-batch gradient. The model
  returns hidden states and `jaxlm.loss` applies the head in chunks of `chunk_size` positions
  (0: all at once), so [batch, length, vocab] logits are never materialized.
  """
  rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
  hidden = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"], deterministic=dropout_rng is None,
                       rngs=rngs, return_hidden=True)
  head, layout = lm_head(params, model.config)
  weights = batch["weights"]
  nll_sum, z_sum = loss_lib.cross_entropy_sums(hidden, head, batch["targets"], weights,
                                               layout=layout, chunk_size=chunk_size)
  return nll_sum + z_loss * z_sum, (nll_sum, jnp.sum(weights))


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted functions of a run and the shardings they use.

  `init`, `train` and `eval` trace under the run's mesh and logical-axis rules;
  `compile_train` compiles the train step ahead of time (for timing and memory analysis).
  """
  init: Callable[[jax.Array], TrainState]
  train: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
  eval: Callable[[Any, Batch], Metrics]
  state_shardings: Any
  abstract_state: TrainState
  mesh: Mesh
  train_jit: Any

  def compile_train(self, state: Any, batch: Any):
    """The compiled train step for arrays (or ShapeDtypeStructs) like `state` and `batch`."""
    with jax.set_mesh(self.mesh), sharding.axis_rules():
      return self.train_jit.lower(state, batch).compile()


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


def check_fits(needed: int, available: tuple[int, str] | None, config: Config) -> None:
  """DoesNotFit (one line: the bytes needed and available and the knobs that cut them) when a
  step needing `needed` bytes per device cannot run in `available`."""
  if available is None or needed <= available[0]:
    return
  gib = lambda n: f"{n / 2**30:.2f} GiB"
  knobs = [f"train.global_batch_size={config.train.global_batch_size} (or raise "
           f"train.microbatches={config.train.microbatches})",
           f"data.seq_len={config.data.seq_len}"]
  if config.model.remat_policy != "full":
    knobs.append(f"model.remat_policy={config.model.remat_policy} -> full")
  if config.model.dtype == "float32":
    knobs.append("model.dtype=bfloat16")
  knobs.append("mesh.fsdp (shard the state over more devices)")
  raise DoesNotFit(
      f"the compiled train step needs {gib(needed)} per device but only {gib(available[0])} "
      f"are available ({available[1]}); lower {', '.join(knobs)}. Nothing was written.")


def abstract_params(model_config: ModelConfig, mesh: Mesh) -> Any:
  """The parameters of a model on `mesh` as ShapeDtypeStructs with their shardings, from the
  model config alone (no batch, optimizer or train step): what restoring, importing and
  fine-tuning need to place arrays. Nothing is allocated."""
  sharding.check_model(model_config, mesh)
  model = Transformer(model_config)

  def init(rng: jax.Array) -> Any:
    return model.init({"params": rng}, jnp.zeros((1, 1), jnp.int32))["params"]

  with jax.set_mesh(mesh), sharding.axis_rules():
    boxed = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32))
  shardings = sharding.state_shardings(boxed, mesh)
  return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                      nn.unbox(boxed), shardings)


def make_model(config: Config) -> Transformer:
  return Transformer(config.model)


def _dummy_tokens(config: Config) -> jax.Array:
  return jnp.zeros((1, min(config.data.seq_len, config.model.max_seq_len)), jnp.int32)


def make_steps(config: Config, mesh: Mesh) -> Steps:
  """Builds init/train/eval for `config` on `mesh`; compilation happens on first call."""
  sharding.check_batch(config.train.global_batch_size, config.train.microbatches, mesh)
  sharding.check_model(config.model, mesh)
  # 'auto' attention is resolved for the mesh's devices (which may be a TPU topology planned
  # on a CPU host), not for the host's default backend.
  platform = mesh.devices.flat[0].platform
  config = dataclasses.replace(config, model=dataclasses.replace(
      config.model, attention_impl=resolve_attention_impl(config.model, platform)))
  model = make_model(config)
  optimizer = make_optimizer(config.optim, config.train.num_steps)
  schedule = make_schedule(config.optim, config.train.num_steps)
  microbatches = config.train.microbatches
  z_loss = config.train.z_loss
  chunk_size = config.train.loss_chunk_size
  use_dropout = config.model.dropout > 0

  def init_boxed(rng: jax.Array) -> TrainState:
    params = model.init({"params": rng}, _dummy_tokens(config))["params"]
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=rng)

  def init(rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    state = nn.unbox(init_boxed(init_rng))
    return state.replace(rng=state_rng)

  # An abstract key (not jax.random.PRNGKey(0), which is a concrete array): everything here
  # stays abstract, so the step also compiles for devices this process cannot run on (a TPU
  # topology planned on a CPU machine, see experiments/plan.py).
  with jax.set_mesh(mesh), sharding.axis_rules():
    abstract_boxed = jax.eval_shape(init_boxed, jax.ShapeDtypeStruct((2,), jnp.uint32))
  state_shardings = sharding.state_shardings(abstract_boxed, mesh)
  abstract_state = jax.tree.map(
      lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
      nn.unbox(abstract_boxed), state_shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  # Microbatch m takes rows m, m+M, m+2M, ...: each device keeps its own rows (no reshuffling
  # across devices), because every device's block of rows is a multiple of M long.
  micro_sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp")))

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    step_rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.grad(loss_sums, has_aux=True)

    def micro_grads(m: jax.Array, micro: Batch):
      rng = jax.random.fold_in(step_rng, m) if use_dropout else None
      return grad_fn(state.params, micro, model, z_loss, rng, chunk_size)

    if microbatches == 1:
      grads, (nll_sum, weight_sum) = micro_grads(jnp.int32(0), batch)
    else:
      def split(x):  # [batch, ...] -> [microbatches, batch / microbatches, ...]
        x = x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, micro_sharding)

      def accumulate(carry, inputs):
        m, micro = inputs
        grads, (nll, weight) = micro_grads(m, micro)
        return jax.tree.map(jnp.add, carry, (grads, nll, weight)), None

      zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.float32(0), jnp.float32(0))
      (grads, nll_sum, weight_sum), _ = jax.lax.scan(
          accumulate, zeros, (jnp.arange(microbatches), jax.tree.map(split, batch)))
    denominator = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    loss = nll_sum / denominator
    grad_norm = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite step is skipped (params and optimizer state unchanged, step still advances
    # so data and dropout move on); the trainer halts after too many in a row.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state))
    metrics = {"train_loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "nonfinite": (~finite).astype(jnp.int32), "train_tokens": weight_sum}
    return new_state, metrics

  def eval_step(params: Any, batch: Batch) -> Metrics:
    _, (nll_sum, weight_sum) = loss_sums(params, batch, model, 0.0, None, chunk_size)
    return {"loss_sum": nll_sum, "weight_sum": weight_sum}

  def with_rules(fn):
    @functools.wraps(fn)
    def wrapped(*args):
      with jax.set_mesh(mesh), sharding.axis_rules():
        return fn(*args)
    return wrapped

  batch_shardings = {k: batch_sharding for k in
                     ("inputs", "targets", "weights", "segment_ids", "positions")}
  train_jit = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                      out_shardings=(state_shardings, replicated), donate_argnums=0)
  return Steps(
      init=with_rules(jax.jit(init, in_shardings=replicated, out_shardings=state_shardings)),
      train=with_rules(train_jit),
      eval=with_rules(jax.jit(eval_step, in_shardings=(state_shardings.params, batch_shardings),
                              out_shardings=replicated)),
      state_shardings=state_shardings, abstract_state=abstract_state, mesh=mesh,
      train_jit=train_jit)
