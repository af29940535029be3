"""Device mesh, logical-axis rules, and shardings for params, train state and batches.

Model code names axes logically (`batch, length, embed, heads, head_dim, mlp, vocab, layers`);
this module maps them onto the mesh axes `stage, data, fsdp, tensor` with one small table. Changing
the mesh in the config is all it takes to go from one CPU to data parallel, FSDP, tensor
parallel or pipeline stages (`layers` -> `stage`: jaxlm/pipeline.py).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlm.config import ConfigError, MeshConfig, ModelConfig, TrainConfig

# Outermost first: stages exchange only activations once per microbatch, so they may sit on
# slower links (across hosts or slices); tensor parallelism, the chattiest, is innermost.
MESH_AXES = ("stage", "data", "fsdp", "tensor")

# Logical axis -> mesh axes. A mesh axis is used at most once per array: for activations
# ('batch', 'length', 'embed') `batch` takes fsdp first, so `embed` stays replicated there, while
# for parameters `embed` is sharded over fsdp (ZeRO-3-like).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("length", None),
    ("layers", "stage"),  # stacked layers: consecutive groups per pipeline stage
)


def mesh_shape(mesh: MeshConfig, num_devices: int) -> tuple[int, int, int, int]:
  """(stage, data, fsdp, tensor): resolves a -1 axis and checks that the mesh uses exactly
  `num_devices` devices."""
  sizes = {"stage": mesh.stage, "data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
  known = math.prod(s for s in sizes.values() if s != -1)
  for name, size in sizes.items():
    if size == -1:
      if num_devices % known:
        raise ConfigError(
            f"mesh.{name}=-1 cannot fill {num_devices} devices: the other axes multiply to "
            f"{known}, which does not divide {num_devices}; change the mesh sizes.")
      sizes[name] = num_devices // known
  product = math.prod(sizes.values())
  if product != num_devices:
    raise ConfigError(
        f"mesh stage={sizes['stage']} x data={sizes['data']} x fsdp={sizes['fsdp']} x "
        f"tensor={sizes['tensor']} = "
        f"{product} devices, but {num_devices} are available; make the product equal "
        f"{num_devices} (or set one axis to -1).")
  return sizes["stage"], sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (stage, data, fsdp, tensor) mesh with Auto axis types (GSPMD, logical-rule style).

  On a TPU torus `jax.make_mesh` maps each mesh axis onto whole physical axes (except on v5e),
  so e.g. data 4 x fsdp 64 on a v6e 16x16 slice has no layout; then a physical axis is split
  (`allow_split_physical_axes`, what jax does for v5e by default).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  except NotImplementedError:
    ordered = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(ordered, MESH_AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways a global batch is split (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_group(mesh: Mesh) -> tuple[int, int]:
  """(index, count): this process feeds block `index` of `count` equal blocks of every global
  batch's rows (data x fsdp split them). Processes whose devices hold the same rows (pipeline
  stages or tensor parallelism across processes) form one group and read the same rows; with
  data parallelism across processes alone, each process is its own group."""
  return _batch_groups(mesh)[jax.process_index()]


def processes_in_group(mesh: Mesh) -> int:
  """How many processes (this one included) read the same rows as this process."""
  groups = _batch_groups(mesh)
  return sum(1 for group, _ in groups.values() if group == groups[jax.process_index()][0])


@functools.lru_cache(maxsize=None)
def _batch_groups(mesh: Mesh) -> dict[int, tuple[int, int]]:
  shards = batch_sharding(mesh).devices_indices_map((data_parallel_size(mesh),))
  return row_groups([(device.process_index, index[0].start or 0)
                     for device, index in shards.items()], dict(mesh.shape))


def row_groups(holders: Sequence[tuple[int, int]], mesh_shape: Mapping[str, int]
               ) -> dict[int, tuple[int, int]]:
  """process -> (group, groups) from (process, data x fsdp block) for every device: processes
  holding the same blocks form a group; groups are numbered in block order."""
  blocks: dict[int, set[int]] = {}
  for process, block in holders:
    blocks.setdefault(process, set()).add(block)
  groups = sorted({tuple(sorted(b)) for b in blocks.values()})
  if len({len(g) for g in groups}) != 1 or len(set().union(*groups)) != sum(map(len, groups)):
    raise ConfigError(f"mesh {dict(mesh_shape)}: the processes hold overlapping or unequal "
                      f"shares of the batch rows; give each process whole data x fsdp blocks "
                      f"(e.g. equal device counts per process, the default device order).")
  return {process: (groups.index(tuple(sorted(b))), len(groups)) for process, b in blocks.items()}


def check_batch(train: TrainConfig, mesh: Mesh) -> None:
  """Raises ConfigError unless each microbatch (and, with pipeline stages, each pipeline
  microbatch) splits evenly over data x fsdp and the processes' row groups."""
  ways = data_parallel_size(mesh)
  size, micro = train.global_batch_size, train.global_batch_size // train.microbatches
  pipelined = micro // train.pipeline_microbatches
  if mesh.shape.get("stage", 1) > 1 and pipelined % ways:
    raise ConfigError(
        f"train.global_batch_size={size} / train.microbatches={train.microbatches} / "
        f"train.pipeline_microbatches={train.pipeline_microbatches} = {pipelined} rows per "
        f"pipeline microbatch, not divisible by mesh data x fsdp = {ways}; use a batch multiple "
        f"of {ways * train.microbatches * train.pipeline_microbatches} or fewer pipeline "
        f"microbatches.")
  if micro % ways:
    raise ConfigError(
        f"train.global_batch_size={size} / train.microbatches={train.microbatches} = {micro} per "
        f"microbatch, not divisible by mesh data x fsdp = {ways}; use a multiple of "
        f"{ways * train.microbatches}.")
  _, groups = batch_group(mesh)
  if size % groups:
    raise ConfigError(
        f"train.global_batch_size={size} is not divisible by the {groups} groups of processes "
        f"that read different rows; use a multiple of {groups}.")


def check_model(model: ModelConfig, mesh: Mesh) -> None:
  """Raises ConfigError if a dimension cannot be split the way the rule table says.

  Tensor parallelism splits heads, the MLP hidden dimension and the vocabulary; FSDP splits the
  embedding dimension. An indivisible size is refused (not silently replicated), since the run
  would not shard the way the mesh promises.
  """
  tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
  sizes = (("model.num_heads", model.num_heads, "tensor", tensor),
           ("model.num_kv_heads", model.kv_heads, "tensor", tensor),
           ("model.mlp_dim", model.mlp_dim, "tensor", tensor),
           ("model.vocab_size", model.vocab_size, "tensor", tensor),
           ("model.embed_dim", model.embed_dim, "fsdp", fsdp))
  for field, size, axis, ways in sizes:
    if size % ways:
      padded = -(-size // ways) * ways
      hint = (f"; use e.g. --config.model.vocab_size={padded} (a tokenizer trained here gets "
              f"that size; a fixed data.tokenizer keeps its own, the embedding is padded)"
              if field == "model.vocab_size"
              else f"; choose a multiple of {ways} or a smaller mesh.{axis}")
      raise ConfigError(f"{field}={size} is not divisible by mesh.{axis}={ways}{hint}.")


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings for a (possibly boxed) abstract state from `jax.eval_shape`.

  Leaves without logical names (step, RNG key, optimizer counters) are replicated.
  """
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_state), mesh, LOGICAL_RULES)


def unbox_foreign(opt_state: Any, params: Any) -> Any:
  """An optimizer state made from boxed `params` (logical axis names) without the boxes that
  hold something other than an array shaped like a parameter with their names.

  Optimizers map over the params, so each param's box (its names, hence its sharding) carries
  over to what they keep per parameter: Adam's moments, sharded like the params. It also wraps
  optax.partition's placeholder for a parameter another branch updates (Muon's split;
  optax.MaskedNode, no array) and Adafactor's factored row/column statistics (other shapes):
  those lose the box (replicated; they are small)."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  boxed_params = {(x.names, np.shape(x.value))
                  for x in jax.tree.leaves(params, is_leaf=is_box) if is_box(x)}

  def unbox(x):
    if is_box(x) and (isinstance(x.value, optax.MaskedNode)
                      or (x.names, np.shape(x.value)) not in boxed_params):
      return x.value
    return x
  return jax.tree.map(unbox, opt_state, is_leaf=is_box)


def over_data(array_sharding: NamedSharding, shape: Sequence[int]) -> NamedSharding:
  """`array_sharding` with its array also split over mesh.data, ZeRO-style (train.zero_stage):
  the first dimension that the data axis (times whatever already splits it) divides takes
  'data' as well; an array no dimension of which divides stays as it is."""
  mesh, spec = array_sharding.mesh, tuple(array_sharding.spec)
  data = mesh.shape["data"]
  if data == 1 or "data" in jax.tree.leaves(spec):
    return array_sharding
  spec = spec + (None,) * (len(shape) - len(spec))
  for dim, (size, axes) in enumerate(zip(shape, spec)):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if size % (data * math.prod(mesh.shape[a] for a in axes)) == 0:
      split = spec[:dim] + ((*axes, "data") if axes else "data",) + spec[dim + 1:]
      return NamedSharding(mesh, PartitionSpec(*split))
  return array_sharding


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, length] arrays: batch over data x fsdp, length replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles the processes' blocks of rows of a batch (`local_rows`) into global arrays
  sharded over data x fsdp."""
  sharding = batch_sharding(mesh)
  _, groups = batch_group(mesh)
  return {name: jax.make_array_from_process_local_data(
              sharding, value, (value.shape[0] * groups,) + value.shape[1:])
          for name, value in local_batch.items()}


def local_rows(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, np.ndarray]:
  """This process's block of rows of a global batch (all rows in a one-process run), what
  `global_batch` takes."""
  index, count = batch_group(mesh)
  size = next(iter(batch.values())).shape[0] // count
  return {k: v[index * size:(index + 1) * size] for k, v in batch.items()}


def to_host(x: Any) -> np.ndarray:
  """An array (in a multi-process job, gathered from every process: all of them call this) as
  one numpy array on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def axis_rules(rules: Sequence[tuple[str, Any]] = LOGICAL_RULES):
  """Context manager activating the rules for `nn.with_logical_constraint` in model code."""
  return nn.logical_axis_rules(rules)
