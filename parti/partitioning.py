"""Device meshes and the logical-to-mesh axis rules: the one module that knows mesh axes.

Model code names only *logical* axes (`batch`, `embed`, `mlp`, `heads`, ...), through
`nn.with_logical_partitioning` on parameters and `nn.with_logical_constraint` on
activations. This module owns the physical side: the mesh axes, how a mesh is built
from a `MeshConfig`, and the rule sets that map logical axes onto mesh axes.

Mesh axes (always all three, so every rule set applies to every mesh; unused ones
have size 1):

| mesh axis | what it splits                                                     |
|-----------|--------------------------------------------------------------------|
| `data`    | the batch (pure data parallelism: parameters replicated)          |
| `fsdp`    | the batch *and* the parameters (ZeRO-3 / fully-sharded data par.) |
| `model`   | attention heads and the MLP hidden dimension (Megatron-style)      |

Logical axes used by the project's modules:

| logical axis | meaning                                   |
|--------------|-------------------------------------------|
| `batch`      | examples                                  |
| `length`     | sequence positions (text or image tokens) |
| `embed`      | the model (residual) dimension            |
| `mlp`        | the MLP hidden dimension                  |
| `heads`      | attention heads                           |
| `kv_heads`   | key and value heads, when fewer than the query's (grouped-query attention) |
| `kv`         | per-head dimension                        |
| `vocab`      | vocabulary / codebook entries             |
| `layers`     | the stacked-layer axis of a scanned stack |
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from parti.runtime.errors import ConfigError

MESH_AXES = ("data", "fsdp", "model")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# The batch is split over every axis that holds copies of the model.
_BATCH = ("data", "fsdp")

# Rule sets, named after the strategies of the Parti and GSPMD papers. Every
# logical axis a module uses appears in each set; `None` means replicated.
# `kv_heads` is replicated in all of them: grouped key and value heads are few (one
# for multi-query attention), often fewer than the model axis's devices, and their
# projections are a group's fraction of the queries', so each model partition
# computes them whole, as Megatron-LM does when there are fewer than its ranks.
RULE_SETS: dict[str, LogicalRules] = {
  # Parti 350M / 750M: parameters replicated, batch split.
  "data_parallel": (
    ("batch", _BATCH),
    ("length", None),
    ("embed", None),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("kv_heads", None),
    ("vocab", None),
    ("layers", None),
    ("relpos_buckets", None),
    ("abspos_buckets", None),
  ),
  # Parti 3B: in-layer model parallelism over heads and the MLP hidden dimension.
  "model_parallel": (
    ("batch", _BATCH),
    ("length", None),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("kv_heads", None),
    ("vocab", "model"),
    ("layers", None),
    ("relpos_buckets", None),
    ("abspos_buckets", None),
  ),
  # FSDP: as model_parallel, plus each parameter's embed dimension split over
  # `fsdp`, gathered just in time for its matmul by GSPMD.
  "fsdp": (
    ("batch", _BATCH),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("kv_heads", None),
    ("vocab", "model"),
    ("layers", None),
    ("relpos_buckets", None),
    ("abspos_buckets", None),
  ),
  # GSPMD's "2d sharding": weights split on both dimensions, activations on the
  # embed dimension too, so no device holds a full activation or weight.
  "2d": (
    ("batch", _BATCH),
    ("length", None),
    ("embed", "model"),
    ("mlp", "fsdp"),
    ("heads", "fsdp"),
    ("kv", None),
    ("kv_heads", None),
    ("vocab", "fsdp"),
    ("layers", None),
    ("relpos_buckets", None),
    ("abspos_buckets", None),
  ),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """How to lay the devices out as a (data, fsdp, model) mesh.

  Attributes:
    data: size of the `data` axis; -1 takes every device the other axes leave.
    fsdp: size of the `fsdp` axis.
    model: size of the `model` axis (number of model partitions).
    rules: name of the logical-axis rule set in `RULE_SETS`.
  """

  data: int = -1
  fsdp: int = 1
  model: int = 1
  rules: str = "data_parallel"

  def __post_init__(self):
    for name in MESH_AXES:
      size = getattr(self, name)
      if not isinstance(size, int) or (size < 1 and size != -1):
        raise ConfigError(f"MeshConfig.{name} must be a positive int or -1, got {size!r}.")
    if [getattr(self, name) for name in MESH_AXES].count(-1) > 1:
      raise ConfigError(f"At most one MeshConfig axis may be -1, got {self}.")
    if self.rules not in RULE_SETS:
      raise ConfigError(f"Unknown rule set {self.rules!r}; known: {sorted(RULE_SETS)}.")

  def axis_sizes(self, num_devices: int) -> tuple[int, ...]:
    """The concrete (data, fsdp, model) sizes for `num_devices` devices.

    Raises:
      ConfigError: if the sizes do not multiply to `num_devices`.
    """
    sizes = [getattr(self, name) for name in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ConfigError(
          f"Mesh {self._describe()} does not divide the {num_devices} devices: "
          f"{num_devices} is not a multiple of {known}."
        )
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ConfigError(
        f"Mesh {self._describe()} needs {math.prod(sizes)} devices but {num_devices} "
        "are available. Set one axis to -1 to take the rest."
      )
    return tuple(sizes)

  def _describe(self) -> str:
    return " x ".join(f"{name}={getattr(self, name)}" for name in MESH_AXES)


def create_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, model) mesh over `devices` (default: every device).

  Every axis is `AxisType.Auto`, which linen's logical constraints need.
  `jax.make_mesh` orders devices by their physical topology (and, across hosts,
  keeps each host's devices together), so the same config is multi-host aware.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = config.axis_sizes(len(devices))
  return jax.make_mesh(
    sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def rules_for(config: MeshConfig) -> LogicalRules:
  """The logical-to-mesh rules that `config` names."""
  return RULE_SETS[config.rules]


def logical_to_spec(logical_axes: Sequence[str | None], rules: LogicalRules) -> PartitionSpec:
  """The mesh PartitionSpec of an array whose dimensions have `logical_axes`."""
  return nn.logical_to_mesh_axes(tuple(logical_axes), rules)


def logical_sharding(
  mesh: Mesh, logical_axes: Sequence[str | None], rules: LogicalRules
) -> NamedSharding:
  """A NamedSharding on `mesh` for an array whose dimensions have `logical_axes`."""
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def tree_shardings(mesh: Mesh, abstract_tree, rules: LogicalRules):
  """Shardings for a pytree of (possibly logically partitioned) abstract values.

  This is the middle of the init recipe: `jax.eval_shape(init)` -> this ->
  `jax.jit(init, out_shardings=...)`.
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_divisor(mesh: Mesh) -> int:
  """How many ways the batch is split: a global batch must be a multiple of it."""
  return int(np.prod([mesh.shape[axis] for axis in _BATCH]))


def local_mesh() -> Mesh:
  """A one-device mesh on this host's first device: where a library call (tokenizer,
  upsampler) runs when given no mesh. Not jax.devices()[0], which on other hosts is not
  addressable."""
  return create_mesh(MeshConfig(), jax.local_devices()[:1])


def pad_batch(array: np.ndarray, mesh: Mesh) -> tuple[np.ndarray, int]:
  """(array padded to a multiple of the mesh's batch ways by repeating its last row, the
  original size): what a library call does with a batch that does not divide."""
  size = array.shape[0]
  divisor = batch_divisor(mesh)
  padded = -(-size // divisor) * divisor
  if padded != size:
    array = np.concatenate([array, np.repeat(array[-1:], padded - size, axis=0)])
  return array, size


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """Fails early, and clearly, when the batch is not a positive integer or does not
  split over the mesh."""
  if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int):
    raise ConfigError(f"The batch size should be an integer, not {global_batch_size!r}.")
  if global_batch_size < 1:
    raise ConfigError(f"The batch size must be positive, not {global_batch_size}.")
  divisor = batch_divisor(mesh)
  if global_batch_size % divisor:
    raise ConfigError(
      f"Global batch size {global_batch_size} does not divide over the data axes "
      f"({' x '.join(f'{a}={mesh.shape[a]}' for a in _BATCH)} = {divisor} ways). "
      f"Use a multiple of {divisor}."
    )


@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
  """The mesh and rules under which model code is traced (for its logical constraints)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def init_sharded(init_fn: Callable[[], Any], mesh: Mesh, rules: LogicalRules) -> tuple[Any, Any]:
  """Initializes a pytree directly into its shardings, never whole on one device.

  The recipe: `jax.eval_shape(init_fn)` (allocates nothing) -> the logical
  partition specs of its boxed leaves -> mesh shardings -> `jax.jit(init_fn,
  out_shardings=...)`, returning plain (unboxed) arrays.

  Args:
    init_fn: builds the tree, with leaves boxed by `nn.with_logical_partitioning`.
    mesh: the device mesh.
    rules: logical-to-mesh rules.

  Returns:
    (tree of sharded arrays, tree of their shardings).
  """
  abstract = jax.eval_shape(init_fn)
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  with activate(mesh, rules):
    tree = jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=shardings)()
  # The arrays' own shardings mirror the tree exactly (optax's empty MaskedNodes
  # included), which the logical tree above need not.
  return tree, jax.tree_util.tree_map(lambda x: x.sharding, tree)


def place(tree, shardings):
  """`tree` (the same values on every host, on any of its devices) laid out by `shardings`.

  Goes through host memory: a device_put from one host's device to a mesh that
  spans other hosts' devices is not a transfer JAX makes, while each host placing
  its own shards of the same host values is.
  """
  return jax.device_put(jax.device_get(tree), shardings)


def replicate(tree, mesh: Mesh):
  """`tree` (the same values on every host) replicated over `mesh`; see `place`."""
  return place(tree, NamedSharding(mesh, PartitionSpec()))


def abstract_with_shardings(tree, shardings):
  """jax.ShapeDtypeStructs carrying `shardings`: what orbax restores into."""
  return jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


class _ParamAxes:
  """A parameter's logical names and shape, as one pytree leaf."""

  def __init__(self, names: tuple[str | None, ...] | None, shape: tuple[int, ...]):
    self.names, self.shape = names, shape


def _state_leaf_axes(leaf, param: _ParamAxes):
  """Logical names for an optimizer-state leaf that belongs to `param`.

  Full-shape leaves (Adam moments, momentum) take the parameter's names; factored
  second moments (Adafactor's row and column statistics) and per-row scales drop
  or blank the reduced axis; anything else is replicated.
  """
  names, shape = param.names, param.shape
  if names is None or not hasattr(leaf, "shape"):
    return leaf
  if leaf.shape == shape:
    axes = names
  elif len(shape) >= 2 and leaf.shape == shape[:-1]:
    axes = names[:-1]
  elif len(shape) >= 2 and leaf.shape == shape[:-2] + shape[-1:]:
    axes = names[:-2] + names[-1:]
  elif leaf.shape == (*shape[:-1], 1):
    axes = (*names[:-1], None)
  else:
    return leaf
  return nn.LogicallyPartitioned(leaf, tuple(axes))


def box_optimizer_state(optimizer, opt_state, boxed_params):
  """Gives each optimizer-state leaf the logical names of the parameter it tracks.

  `optimizer.init(boxed_params)` is wrong for optimizers whose state is not
  parameter-shaped (Adafactor's factored moments would inherit names of the wrong
  rank), so initialize on plain parameters and box the state with this.
  """
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
  axes = jax.tree_util.tree_map(
    lambda b: _ParamAxes(b.names, b.value.shape) if is_box(b) else _ParamAxes(None, ()),
    boxed_params,
    is_leaf=is_box,
  )
  return optax.tree_utils.tree_map_params(optimizer, _state_leaf_axes, opt_state, axes)
