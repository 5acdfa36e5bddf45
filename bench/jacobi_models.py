"""The models the Jacobi benches time: a random tiny Parti, or a trained run's.

Shared by `bench/jacobi_sampling.py` and `bench/jacobi_call_cost.py`; it defines no flags,
so that both can import it beside their own.
"""

from __future__ import annotations

import jax
from flax import linen as nn

from parti.modeling import model
from parti.modeling.config import PartiConfig

# The trained palette model's shapes (bench/README.md, `runs/palette/parti`): a call's cost
# does not depend on the weights, so random ones time the same.
RANDOM = dict(
  text_vocab_size=128, text_length=32, image_vocab_size=512, num_encoder_layers=2,
  num_decoder_layers=4, embed_dim=128, mlp_dim=512, num_heads=4, dtype="float32",
)  # fmt: skip


def random_model(grid: int) -> tuple[PartiConfig, dict]:
  """RANDOM's Parti at a grid x grid image, with its parameters initialized."""
  config = PartiConfig(**RANDOM, image_grid=(grid, grid))
  params = jax.jit(lambda: nn.meta.unbox(model.init_params(config, jax.random.key(0))))()
  return config, params


def trained_model(checkpoint_dir: str) -> tuple[PartiConfig, dict, int]:
  """A parti.train run's config, parameters and step, on the default mesh."""
  from parti import partitioning
  from parti.modeling import checkpoint_io

  mesh_config = partitioning.MeshConfig()
  mesh = partitioning.create_mesh(mesh_config)
  config, params, _, step = checkpoint_io.load_params(
    checkpoint_dir, mesh, partitioning.rules_for(mesh_config)
  )
  return config, params, step
