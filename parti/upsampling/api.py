"""The upsampler as a library: images in, images `scale` times larger out, jitted and
sharded over the batch.

    upsampler = Upsampler.from_checkpoint("runs/upsampler")
    large = upsampler.upsample(images)   # [B, S, S, 3] in [0, 1] (or uint8) -> float32 [B, 4S, 4S, 3]

With a mesh, the batch is split over its data axes (a batch that does not divide is
padded, then trimmed) and the parameters laid out by the mesh's rules.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from parti import partitioning
from parti.upsampling import checkpoint_io, model
from parti.upsampling.config import UpsamplerConfig


class Upsampler:
  """A trained WDSR's forward pass."""

  def __init__(
    self,
    config: UpsamplerConfig,
    params,
    mesh: jax.sharding.Mesh | None = None,
    rules: partitioning.LogicalRules = partitioning.RULE_SETS["data_parallel"],
    step: int | None = None,
  ):
    self.config = config
    self.step = step
    self._model = model.WDSR(config)
    self._mesh = mesh or partitioning.local_mesh()
    self._rules = rules
    param_shardings = partitioning.tree_shardings(
      self._mesh, checkpoint_io.abstract_params(config), rules
    )
    self.params = partitioning.place(params, param_shardings)
    self._images = partitioning.logical_sharding(self._mesh, ("batch", None, None, None), rules)
    self._upsample = jax.jit(
      lambda p, x: model.to_image(self._model.apply({"params": p}, x)),
      in_shardings=(param_shardings, self._images),
      out_shardings=self._images,
    )

  @classmethod
  def from_checkpoint(
    cls,
    model_dir: str | pathlib.Path,
    step: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: partitioning.LogicalRules = partitioning.RULE_SETS["data_parallel"],
  ) -> Upsampler:
    """Loads the upsampler trained in `model_dir` (its latest checkpoint by default)."""
    config, params, found = checkpoint_io.load_params(model_dir, step)
    return cls(config, params, mesh, rules, step=found)

  def upsample(self, images) -> np.ndarray:
    """images [B, S, S, 3] (float in [0, 1], or uint8) -> float32 [B, S*scale, S*scale, 3]."""
    images = np.asarray(images)
    side = self.config.input_size
    if images.ndim != 4 or images.shape[1:] != (side, side, 3):
      raise ValueError(f"upsample expects images [B, {side}, {side}, 3], got {images.shape}.")
    if images.dtype == np.uint8:
      images = images.astype(np.float32) / 255.0
    padded, size = partitioning.pad_batch(images.astype(np.float32), self._mesh)
    with partitioning.activate(self._mesh, self._rules):
      large = self._upsample(self.params, jax.device_put(padded, self._images))
    return np.asarray(large)[:size]
