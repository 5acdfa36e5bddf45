"""Reading a trained tokenizer: its config file and its parameters, nothing else."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
from flax import linen as nn

from parti.tokenizer import model
from parti.tokenizer.config import TokenizerConfig
from parti.training import checkpoints

CONFIG_FILE = "tokenizer_config.json"


def load_config(model_dir: str | pathlib.Path) -> TokenizerConfig:
  path = pathlib.Path(model_dir) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(
      f"{model_dir} holds no trained tokenizer: {path} is missing. Train one with "
      "`python -m parti.tokenizer.train`."
    )
  return TokenizerConfig.load(path)


def abstract_params(config: TokenizerConfig):
  """The parameter tree's shapes and dtypes, without allocating it (boxed with logical axes)."""
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  return jax.eval_shape(
    lambda x: model.VitVQGAN(config).init(jax.random.key(0), x)["params"], images
  )


def load_params(model_dir: str | pathlib.Path, step: int | None = None, shardings=None):
  """(config, params) of the tokenizer in `model_dir`, at `step` (default: the latest).

  Args:
    model_dir: a tokenizer training run's MODEL_DIR.
    step: a checkpoint step, or None for the latest usable one.
    shardings: a tree of shardings for the parameters (default: this host's first device).

  Returns:
    The config, the parameters and the step they come from.
  """
  config = load_config(model_dir)
  folder = pathlib.Path(model_dir) / "checkpoints"
  if not folder.is_dir():
    raise FileNotFoundError(f"No tokenizer checkpoints in {folder}.")
  shapes = nn.meta.unbox(abstract_params(config))
  if shardings is None:
    # This host's first device: on other hosts jax.devices()[0] is not addressable.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree_util.tree_map(lambda _: device, shapes)
  abstract = jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )
  found_step, params = checkpoints.restore_params(model_dir, abstract, step)
  return config, params, found_step


def load_for_model(tokenizer_dir: str | pathlib.Path, model_config, step: int | None = None):
  """(config, params, step) of a tokenizer that must write or read `model_config`'s codes.

  Raises:
    ConfigError: no trained tokenizer there, or its codebook or grid is not the model's.
  """
  from parti.runtime.errors import ConfigError

  try:
    config, params, step = load_params(tokenizer_dir, step)
  except FileNotFoundError as error:
    raise ConfigError(str(error)) from error
  if config.codebook_size != model_config.image_vocab_size:
    raise ConfigError(
      f"The tokenizer in {tokenizer_dir} has {config.codebook_size} codes, but the model "
      f"writes {model_config.image_vocab_size}: they were not trained together."
    )
  if tuple(config.grid) != tuple(model_config.image_grid):
    raise ConfigError(
      f"The tokenizer in {tokenizer_dir} makes a {config.grid} grid; the model writes "
      f"{model_config.image_grid}."
    )
  check_token_layout(model_config, config.codebook_groups, tokenizer_dir, config.group_layout)
  return config, params, step


def check_token_layout(
  model_config,
  codebook_groups: int,
  source,
  group_layout: str = "interleaved",
  editing: bool = False,
) -> None:
  """Whether a model can write codes laid out so (`TokenizerConfig.group_layout`).

  A model may draw a patch's sub-codes one after another (tokens_per_patch 1) or, when
  they sit side by side, each independently (tokens_per_patch = codebook_groups); any
  other count would restrict positions to the wrong groups' codes. Stacked groups are
  drawn one after another only, and editing's random regions cover every group's tokens
  of their patches only when the model's `stacked_groups` says how many grids there are.

  Raises:
    ConfigError: naming `source` (the tokenizer or token folder) and what to change.
  """
  from parti.runtime.errors import ConfigError

  if model_config.tokens_per_patch not in (1, codebook_groups):
    raise ConfigError(
      f"{source} has {codebook_groups} token(s) per patch (codebook_groups), but the model's "
      f"tokens_per_patch is {model_config.tokens_per_patch}: set it to 1 or {codebook_groups}."
    )
  stacked_layout = codebook_groups > 1 and group_layout == "stacked"
  if model_config.stacked_groups != 1 and not stacked_layout:
    raise ConfigError(
      f"The model's stacked_groups is {model_config.stacked_groups}, but {source} does not "
      "stack its codes' groups (group_layout 'stacked'): set stacked_groups to 1."
    )
  if stacked_layout:
    stacked = (
      f"{source} writes each of its {codebook_groups} groups' grids in turn "
      "(group_layout 'stacked')"
    )
    if model_config.tokens_per_patch != 1:
      raise ConfigError(
        f"{stacked}, so a patch's tokens are not side by side: set tokens_per_patch to 1."
      )
    if editing and model_config.stacked_groups != codebook_groups:
      raise ConfigError(
        f"{stacked}, but the model's stacked_groups is {model_config.stacked_groups}: set "
        f"it to {codebook_groups}, so that editing's random regions cover a patch's tokens "
        "in every group."
      )
