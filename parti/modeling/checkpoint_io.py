"""Reading a trained Parti run: its config file and its parameters, nothing else.

The Parti counterpart of `parti.tokenizer.checkpoint_io`. Inference, evaluation and
the scaling study load runs through here; training writes what this reads.
"""

from __future__ import annotations

import math
import pathlib

import jax
from flax import linen as nn

from parti import partitioning
from parti.modeling import model
from parti.modeling.config import PartiConfig
from parti.runtime.errors import ConfigError
from parti.training import checkpoints

CONFIG_FILE = "parti_config.json"


def load_config(model_dir: str | pathlib.Path) -> PartiConfig:
  """The config a `parti.train` run saved.

  Raises:
    ConfigError: `model_dir` is not a Parti run.
  """
  path = pathlib.Path(model_dir) / CONFIG_FILE
  if not path.is_file():
    raise ConfigError(f"{model_dir} is not a Parti run: {path} is missing.")
  return PartiConfig.load(path)


def parameter_count(config: PartiConfig) -> int:
  """Parameters of a model of `config` (nothing allocated)."""
  shapes = nn.meta.unbox(model.abstract_params(config))
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


def load_params(model_dir: str | pathlib.Path, mesh, rules, step: int | None = None):
  """(config, sharded parameters, their shardings, step) of a Parti run's checkpoint.

  Args:
    model_dir: a `parti.train` MODEL_DIR.
    mesh: the device mesh the parameters are sharded over.
    rules: logical-axis rules.
    step: a checkpoint step, or None for the latest usable one.

  Raises:
    ConfigError: not a Parti run, or no checkpoint restores.
  """
  config = load_config(model_dir)
  boxed = model.abstract_params(config)
  shardings = partitioning.tree_shardings(mesh, boxed, rules)
  abstract = partitioning.abstract_with_shardings(nn.meta.unbox(boxed), shardings)
  try:
    found, params = checkpoints.restore_params(pathlib.Path(model_dir), abstract, step)
  except FileNotFoundError as error:
    raise ConfigError(str(error)) from error
  return config, params, shardings, found
