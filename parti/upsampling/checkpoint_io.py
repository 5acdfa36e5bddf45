"""Reading a trained upsampler: its config file and its parameters, nothing else."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
from flax import linen as nn

from parti.runtime.errors import ConfigError
from parti.training import checkpoints
from parti.upsampling import model
from parti.upsampling.config import UpsamplerConfig

CONFIG_FILE = "upsampler_config.json"


def load_config(model_dir: str | pathlib.Path) -> UpsamplerConfig:
  path = pathlib.Path(model_dir) / CONFIG_FILE
  if not path.is_file():
    raise ConfigError(
      f"{model_dir} holds no trained upsampler: {path} is missing. Train one with "
      "`python -m parti.train_upsampler`."
    )
  return UpsamplerConfig.load(path)


def abstract_params(config: UpsamplerConfig):
  """The parameter tree's shapes and dtypes, without allocating it (boxed with logical axes)."""
  images = jax.ShapeDtypeStruct((1, config.input_size, config.input_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.WDSR(config).init(jax.random.key(0), x)["params"], images)


def load_params(
  model_dir: str | pathlib.Path,
  step: int | None = None,
  shardings=None,
  expect: UpsamplerConfig | None = None,
):
  """(config, params, step) of the upsampler in `model_dir` (default: its latest step).

  Args:
    model_dir: a `parti.train_upsampler` MODEL_DIR.
    step: a checkpoint step, or None for the latest usable one.
    shardings: a tree of shardings for the parameters (default: this host's first device).
    expect: a config the checkpoint must match (a job that names its own).

  Raises:
    ConfigError: no trained upsampler there, or one of another scale or shape than
      `expect` or than its own config file says.
  """
  config = load_config(model_dir)
  if expect is not None and expect != config:
    raise ConfigError(
      f"{model_dir} holds a {config.input_size} -> {config.output_size} upsampler "
      f"({config}); this job's config is {expect.input_size} -> {expect.output_size} ({expect})."
    )
  folder = pathlib.Path(model_dir) / "checkpoints"
  if not folder.is_dir():
    raise ConfigError(f"No upsampler checkpoints in {folder}.")
  shapes = nn.meta.unbox(abstract_params(config))
  _check_stored_shapes(folder, step, config, shapes)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree_util.tree_map(lambda _: device, shapes)
  abstract = jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )
  try:
    found_step, params = checkpoints.restore_params(model_dir, abstract, step)
  except FileNotFoundError as error:
    raise ConfigError(str(error)) from error
  return config, params, found_step


def _check_stored_shapes(folder: pathlib.Path, step: int | None, config, shapes) -> None:
  """Refuses a checkpoint whose parameters (read from its metadata, not its arrays) do
  not have the config's shapes: one of another scale, whose output convolutions have
  3 * scale^2 channels, or of another width or depth."""
  import orbax.checkpoint as ocp

  steps = sorted((int(p.name) for p in folder.iterdir() if p.name.isdigit()), reverse=True)
  if step is not None:
    steps = [step]
  if not steps:
    return  # restore_params names what is missing.
  try:
    stored = ocp.StandardCheckpointer().metadata(folder / str(steps[0]) / "params").item_metadata
    stored = jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), dict(stored))
  except Exception:  # Unreadable metadata: the restore itself reports what is wrong.
    return
  wanted = jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), shapes)
  if stored == wanted:
    return
  tail = stored.get("tail", {}).get("kernel")
  stored_scale = round((tail[-1] / 3) ** 0.5) if tail else "unknown"
  raise ConfigError(
    f"The checkpoint {folder / str(steps[0])} does not fit {CONFIG_FILE}: it holds an "
    f"upsampler of scale {stored_scale} with {len([k for k in stored if k.startswith('block_')])} "
    f"blocks, the config says scale {config.scale} with {config.num_blocks} blocks of "
    f"{config.features} features."
  )
