"""Per-device memory of a Parti training run, before renting the hardware.

    python -m parti.memory --gin_file=gin/runs/memory.gin --gin_file=gin/models/parti_20b.gin \
      --gin_file=gin/partitioning/fsdp.gin --gin.NUM_DEVICES=256 --gin.BATCH_SIZE=2048

prints, for one device of the mesh that the partitioning rules lay over NUM_DEVICES:

- parameter bytes and optimizer-state bytes, exact: each array's shard shape
  under the rules, from `jax.eval_shape` (nothing is allocated);
- an analytic estimate of the activations the backward pass keeps, for the
  config's rematerialization policy (`activation_bytes_per_example`);
- when the devices can be had, XLA's own figures for the compiled train step
  (`jax.jit(...).lower(...).compile().memory_analysis()`): on the local
  devices when there are NUM_DEVICES of them, or on a named TPU topology
  (`--gin.TOPOLOGY='v4:8x8x4'`) compiled ahead of time without the hardware,
  which needs `pip install libtpu` (the version jax[tpu] pins) on any machine.
  On a CPU, `JAX_NUM_CPU_DEVICES=N` fakes N local devices.

It writes the report as `memory.json` (and the operative config.gin) to MODEL_DIR.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

from parti import partitioning
from parti.modeling.config import PartiConfig
from parti.runtime import files, gin_utils
from parti.runtime.errors import ConfigError
from parti.training import optim
from parti.training.trainer import PartiTrainer, batch_shardings, jit_train_step

REPORT = "memory.json"
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  """XLA's memory analysis of the compiled train step, per device, in bytes."""

  platform: str
  device_kind: str
  arguments: int
  outputs: int
  aliased: int  # Donated inputs whose buffers the outputs reuse.
  temporaries: int
  generated_code: int

  @property
  def peak(self) -> int:
    """Live at once, at most: inputs, non-aliased outputs, and temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Bytes per device of one training step's state and activations."""

  num_devices: int
  mesh: dict[str, int]
  rules: str
  parameters: int
  parameter_bytes: int
  optimizer_bytes: int
  activation_bytes: int
  batch_per_device: float
  compiled: CompiledMemory | None
  fits: bool | None  # None: not compiled; False: XLA found it does not fit the device.
  compile_note: str

  @property
  def estimated_total(self) -> int:
    """Parameters, optimizer state, gradients (parameter-sized) and activations."""
    return 2 * self.parameter_bytes + self.optimizer_bytes + self.activation_bytes

  def estimate_lines(self) -> list[str]:
    mesh = " x ".join(f"{name}={size}" for name, size in self.mesh.items())
    return [
      f"mesh {mesh} ({self.num_devices} devices), rules {self.rules!r}; "
      f"{self.parameters / 1e6:,.1f}M parameters; {self.batch_per_device:g} examples per device",
      f"  parameters      {_gib(self.parameter_bytes)}",
      f"  optimizer state {_gib(self.optimizer_bytes)}",
      f"  gradients       {_gib(self.parameter_bytes)}  (parameter-sized, float32)",
      f"  activations     {_gib(self.activation_bytes)}  (analytic estimate)",
      f"  total           {_gib(self.estimated_total)}  (estimate)",
    ]

  def compiled_lines(self) -> list[str]:
    if not self.compiled:
      return [f"not compiled: {self.compile_note}"]
    c = self.compiled
    return [
      f"compiled for {c.device_kind} ({c.platform}); XLA's memory analysis per device:",
      f"  arguments {_gib(c.arguments)}, outputs {_gib(c.outputs)} "
      f"({_gib(c.aliased).strip()} aliased to donated inputs), temporaries {_gib(c.temporaries)}",
      f"  peak      {_gib(c.peak)}",
    ]

  def lines(self) -> list[str]:
    return self.estimate_lines() + self.compiled_lines()


def _gib(num_bytes: int) -> str:
  if num_bytes < GIB:
    return f"{num_bytes / (1 << 20):9.1f} MiB"
  return f"{num_bytes / GIB:9.2f} GiB"


# --- Exact state bytes from logical axes ---------------------------------------------------------


def _mesh_axes(rules: partitioning.LogicalRules, logical: str | None) -> tuple[str, ...]:
  mesh_axes = dict(rules).get(logical) if logical else None
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def _dim_splits(names, rules, axis_sizes, taken=()) -> list[int]:
  """How many ways each dimension of an array with logical `names` is split.

  As flax resolves the rules, a mesh axis splits at most one dimension of an array:
  the first that claims it (or none, if it is in `taken`).
  """
  used = set(taken)
  splits = []
  for name in names:
    axes = _mesh_axes(rules, name)
    if used.intersection(axes):
      axes = ()
    used.update(axes)
    splits.append(math.prod(axis_sizes[axis] for axis in axes))
  return splits


def sharded_bytes(boxed_tree, rules: partitioning.LogicalRules, axis_sizes: Mapping[str, int]):
  """(elements, bytes on one device) of a tree of abstract, logically boxed arrays.

  A dimension split n ways keeps ceil(size / n) elements per device, as XLA pads.
  Unboxed leaves are replicated.
  """
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
  elements = per_device = 0
  for leaf in jax.tree_util.tree_leaves(boxed_tree, is_leaf=is_box):
    value = leaf.value if is_box(leaf) else leaf
    if not hasattr(value, "shape"):
      continue
    names = leaf.names if is_box(leaf) else (None,) * len(value.shape)
    splits = _dim_splits(names, rules, axis_sizes)
    shard = [-(-size // n) for size, n in zip(value.shape, splits, strict=True)]
    elements += math.prod(value.shape)
    per_device += math.prod(shard) * jnp.dtype(value.dtype).itemsize
  return elements, per_device


def _activation_splits(rules: partitioning.LogicalRules, axis_sizes: Mapping[str, int]):
  """logical axis -> its split in an activation, whose batch dimension comes first."""
  batch_axes = _mesh_axes(rules, "batch")
  return lambda logical: _dim_splits([logical], rules, axis_sizes, taken=batch_axes)[0]


# --- Activations ---------------------------------------------------------------------------------


def activation_bytes_per_example(
  config: PartiConfig, text_length: int, split=lambda logical: 1
) -> int:
  """What the backward pass keeps for one example, in bytes (an analytic estimate).

  Counts, per layer, the tensors autodiff saves: norm inputs and outputs, the
  attention projections, the float32 softmax probabilities (and their cast), the
  MLP hidden activations, and the float32 logits with their softmax. With remat
  "full" a layer keeps only its input, plus one layer's tensors recomputed during
  the backward pass; with "save_dots" it keeps its projection outputs instead of
  its attention probabilities. Dropout masks and XLA's workspace are left out.

  Args:
    config: the architecture.
    text_length: text tokens per example.
    split: how many ways a logical axis ("embed", "heads", "kv_heads", "mlp", "vocab") is
      split over the mesh; activations are divided accordingly.
  """
  c = jnp.dtype(config.dtype).itemsize
  f = 4
  t, n = text_length + (config.image_length if config.edit_context else 0), config.image_length
  d = config.embed_dim / split("embed")
  a = config.num_heads * config.per_head_dim / split("heads")
  # Keys' and values' width: the query's unless grouped, then on the `kv_heads` axis.
  grouped = config.kv_heads < config.num_heads
  kv = config.kv_heads * config.per_head_dim / split("kv_heads" if grouped else "heads")
  h = config.num_heads / split("heads")
  m = config.mlp_dim / split("mlp") * (2 if config.gated_mlp else 1)

  def attention(queries, keys, *, self_attention):
    projections = queries * a * c + 2 * (queries if self_attention else keys) * kv * c
    return projections + h * queries * keys * (f + c) + queries * a * c

  def layer(tokens, keys_text):
    norms = (3 if keys_text else 2) * tokens * d * (f + c)
    attn = attention(tokens, tokens, self_attention=True)
    if keys_text:
      attn += attention(tokens, keys_text, self_attention=False)
    return norms + attn + 2 * tokens * m * c

  def dots(tokens, keys_text):
    saved = tokens * (a + 2 * kv) * c + tokens * d * c + tokens * m * c + tokens * d * c
    if keys_text:
      saved += tokens * a * c + 2 * keys_text * kv * c + tokens * d * c
    return saved

  layer_input = {"encoder": t * d * f, "decoder": n * d * f}
  full = {"encoder": layer(t, 0), "decoder": layer(n, t)}
  saved = {
    "none": full,
    "full": {"encoder": 0, "decoder": 0},
    "save_dots": {"encoder": dots(t, 0), "decoder": dots(n, t)},
  }[config.remat_policy]
  counts = {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}
  total = sum(counts[k] * (layer_input[k] + saved[k]) for k in counts)
  if config.remat_policy != "none":
    total += max(full.values())  # One layer at a time is recomputed in the backward pass.
  total += 2 * n * config.image_vocab_size / split("vocab") * f
  return int(total)


# --- Ahead-of-time compilation -------------------------------------------------------------------


def topology_devices(name: str) -> list[jax.Device]:
  """Compile-only devices of a named TPU topology (needs libtpu).

  Names are GENERATION:CHIPS, one device per chip: 'v4:4x4x4' (64 chips),
  'v5p:8x8x8', 'v5e:16x16', 'v6e:8x8'.
  """
  from jax.experimental import topologies

  # v4 and v5p chips have two TensorCores that JAX drives as one device ("megacore").
  megacore = name.lower().startswith(("v4", "v5p"))
  options = {"chip_config_name": "megacore"} if megacore else {}
  try:
    return list(topologies.get_topology_desc(name, platform="tpu", **options).devices)
  except RuntimeError as error:
    if "not installed" in str(error):
      raise ConfigError(
        f"Compiling for topology {name!r} needs libtpu: `pip install libtpu` (the version "
        "that jax[tpu] pins for your jax). It works on any machine, without a TPU."
      ) from error
    raise ConfigError(f"Topology {name!r}: {error}") from error


def compile_train_step(
  trainer: PartiTrainer,
  mesh: jax.sharding.Mesh,
  rules: partitioning.LogicalRules,
  batch_size: int,
  text_length: int,
) -> CompiledMemory:
  """Lowers and compiles the sharded train step for `mesh`'s devices, allocating nothing."""
  abstract_state = jax.eval_shape(lambda: trainer.init(0))
  state_shardings = partitioning.tree_shardings(mesh, abstract_state, rules)
  state = partitioning.abstract_with_shardings(nn.meta.unbox(abstract_state), state_shardings)
  shardings = batch_shardings(mesh, rules)
  batch = {
    name: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=shardings[name])
    for name, shape in jax.eval_shape(lambda: trainer.dummy_batch(batch_size)).items()
  }
  if text_length != trainer.config.text_length:
    text = batch["encoder_input_tokens"]
    batch["encoder_input_tokens"] = jax.ShapeDtypeStruct(
      (batch_size, text_length), text.dtype, sharding=text.sharding
    )
  step = jit_train_step(trainer, mesh, state_shardings, shardings)
  with partitioning.activate(mesh, rules):
    compiled = step.lower(state, batch, None).compile()
  analysis = compiled.memory_analysis()
  device = mesh.devices.flat[0]
  return CompiledMemory(
    platform=device.platform,
    device_kind=device.device_kind,
    arguments=int(analysis.argument_size_in_bytes),
    outputs=int(analysis.output_size_in_bytes),
    aliased=int(analysis.alias_size_in_bytes),
    temporaries=int(analysis.temp_size_in_bytes),
    generated_code=int(analysis.generated_code_size_in_bytes),
  )


def estimate_memory(
  *,
  model: PartiConfig,
  mesh: partitioning.MeshConfig,
  batch_size: int,
  text_length: int = 128,
  optimizer: optim.AdafactorConfig = optim.AdafactorConfig(),
  microbatches: int = 1,
  num_devices: int | None = None,
  topology: str | None = None,
  compile: bool = True,
  model_dir: str | None = None,
) -> MemoryReport:
  """Bytes per device of training `model` with `batch_size` over `num_devices` devices.

  Args:
    model: the architecture.
    mesh: mesh layout and rule set (gin/partitioning/).
    batch_size: global batch size.
    text_length: text tokens per example.
    optimizer: the optimizer (int8 momentum changes its state's size).
    microbatches: gradient accumulation: activations are those of one microbatch.
    num_devices: devices of the mesh (default: the topology's, else the local ones).
    topology: a TPU topology to compile for, without the hardware (needs libtpu).
    compile: also compile the step when the devices can be had.
    model_dir: where to write memory.json and config.gin (None: nowhere).
  """
  devices: Sequence[jax.Device] | None = None
  if topology:
    devices = topology_devices(topology)
  num_devices = num_devices or (len(devices) if devices else jax.device_count())
  if devices is not None and num_devices != len(devices):
    raise ConfigError(
      f"Topology {topology!r} has {len(devices)} devices, not NUM_DEVICES={num_devices}."
    )
  sizes = dict(zip(partitioning.MESH_AXES, mesh.axis_sizes(num_devices), strict=True))
  rules = partitioning.rules_for(mesh)
  data_ways = math.prod(sizes[axis] for axis in ("data", "fsdp"))
  if batch_size % (data_ways * microbatches):
    raise ConfigError(
      f"Batch {batch_size} in {microbatches} microbatches does not split over the "
      f"{data_ways}-way data axes."
    )

  trainer = PartiTrainer(model, optim.adafactor(optimizer), microbatches=microbatches)
  abstract_state = jax.eval_shape(lambda: trainer.init(0))
  parameters, parameter_bytes = sharded_bytes(abstract_state.params, rules, sizes)
  _, optimizer_bytes = sharded_bytes(abstract_state.opt_state, rules, sizes)
  per_example = activation_bytes_per_example(model, text_length, _activation_splits(rules, sizes))
  activation_bytes = per_example * batch_size // (data_ways * microbatches)

  report = MemoryReport(
    num_devices=num_devices,
    mesh=sizes,
    rules=mesh.rules,
    parameters=parameters,
    parameter_bytes=parameter_bytes,
    optimizer_bytes=optimizer_bytes,
    activation_bytes=activation_bytes,
    batch_per_device=batch_size / data_ways,
    compiled=None,
    fits=None,
    compile_note="compile=False",
  )
  print("\n".join(report.estimate_lines()), flush=True)
  if compile:
    report = _compile(report, trainer, mesh, devices, batch_size, text_length)
    print("\n".join(report.compiled_lines()), flush=True)
  if model_dir and jax.process_index() == 0:
    folder = pathlib.Path(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    files.atomic_write_json(folder / REPORT, _as_json(report))
    gin_utils.write_operative_config(folder)
  return report


def _compile(report, trainer, mesh, devices, batch_size, text_length) -> MemoryReport:
  """`report` with XLA's figures for the compiled step, or why there are none."""
  num_devices = report.num_devices
  if devices is None and jax.device_count() >= num_devices:
    devices = jax.devices()[:num_devices]
  if devices is None:
    return dataclasses.replace(
      report,
      compile_note=(
        f"{num_devices} devices are needed and {jax.device_count()} are here; name a TOPOLOGY "
        f"(with libtpu), or fake CPU devices with JAX_NUM_CPU_DEVICES={num_devices}."
      ),
    )
  device_mesh = partitioning.create_mesh(mesh, devices)
  logging.info("Compiling the train step for %d %s devices.", num_devices, devices[0].platform)
  try:
    compiled = compile_train_step(
      trainer, device_mesh, partitioning.rules_for(mesh), batch_size, text_length
    )
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    # XLA refuses programs that cannot fit; that refusal is this job's answer.
    reason = str(error).split("RESOURCE_EXHAUSTED:", 1)[-1].strip()
    return dataclasses.replace(
      report, fits=False, compile_note=f"does not fit a {devices[0].device_kind}: {reason}"
    )
  return dataclasses.replace(report, compiled=compiled, fits=True, compile_note="")


def _as_json(report: MemoryReport) -> dict:
  out = dataclasses.asdict(report)
  out["estimated_total"] = report.estimated_total
  if report.compiled:
    out["compiled"]["peak"] = report.compiled.peak
  return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in out.items()}


configured_estimate_memory = gin.external_configurable(estimate_memory)

if __name__ == "__main__":
  gin_utils.run(configured_estimate_memory)
