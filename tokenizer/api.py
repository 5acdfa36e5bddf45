"""The tokenizer as a library: images to code ids and back, jitted and sharded over the batch.

    tokenizer = ImageTokenizer.from_checkpoint("runs/tokenizer")
    ids = tokenizer.encode(images)        # [B, H, W, 3] in [0, 1] (or uint8) -> int32 [B, h, w]
    images = tokenizer.decode(ids)        # -> float32 [B, H, W, 3] in [0, 1]

With a mesh, the batch is split over its data axes (a batch that does not divide
is padded, then trimmed) and the parameters laid out by the mesh's rules.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from parti import partitioning
from parti.tokenizer import checkpoint_io, model
from parti.tokenizer.config import TokenizerConfig


class ImageTokenizer:
  """A trained ViT-VQGAN's encode and decode."""

  def __init__(
    self,
    config: TokenizerConfig,
    params,
    mesh: jax.sharding.Mesh | None = None,
    rules: partitioning.LogicalRules = partitioning.RULE_SETS["data_parallel"],
    step: int | None = None,
  ):
    self.config = config
    self.step = step
    self._model = model.VitVQGAN(config)
    self._mesh = mesh or partitioning.local_mesh()
    self._rules = rules
    self._param_shardings = partitioning.tree_shardings(
      self._mesh, checkpoint_io.abstract_params(config), rules
    )
    self.params = partitioning.place(params, self._param_shardings)
    self._images = partitioning.logical_sharding(self._mesh, ("batch", None, None, None), rules)
    self._ids = partitioning.logical_sharding(self._mesh, ("batch", None, None), rules)
    self._encode = jax.jit(
      lambda p, x: self._model.apply({"params": p}, x, method=model.VitVQGAN.encode),
      in_shardings=(self._param_shardings, self._images),
      out_shardings=self._ids,
    )
    self._decode = jax.jit(
      lambda p, ids: self._model.apply({"params": p}, ids, method=model.VitVQGAN.decode),
      in_shardings=(self._param_shardings, self._ids),
      out_shardings=self._images,
    )

  @classmethod
  def from_checkpoint(
    cls,
    model_dir: str | pathlib.Path,
    step: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: partitioning.LogicalRules = partitioning.RULE_SETS["data_parallel"],
  ) -> ImageTokenizer:
    """Loads the tokenizer trained in `model_dir` (its latest checkpoint by default)."""
    config, params, found = checkpoint_io.load_params(model_dir, step)
    return cls(config, params, mesh, rules, step=found)

  @property
  def grid(self) -> tuple[int, int]:
    return self.config.grid

  @property
  def codebook_size(self) -> int:
    return self.config.codebook_size

  def encode(self, images) -> np.ndarray:
    """images [B, S, S, 3] (float in [0, 1], or uint8) -> code ids int32 [B, h, w]."""
    images = np.asarray(images)
    expected = (self.config.image_size, self.config.image_size, 3)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise ValueError(
        f"encode expects images [B, {', '.join(map(str, expected))}], got {images.shape}."
      )
    if images.dtype == np.uint8:
      images = images.astype(np.float32) / 255.0
    padded, size = partitioning.pad_batch(images.astype(np.float32), self._mesh)
    with partitioning.activate(self._mesh, self._rules):
      ids = self._encode(self.params, jax.device_put(padded, self._images))
    return np.asarray(ids)[:size]

  def decode(self, ids) -> np.ndarray:
    """code ids [B, h, w] -> images float32 [B, S, S, 3] in [0, 1]."""
    ids = np.asarray(ids)
    if ids.ndim != 3 or ids.shape[1:] != self.grid:
      raise ValueError(f"decode expects ids [B, {self.grid[0]}, {self.grid[1]}], got {ids.shape}.")
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= self.codebook_size:
      raise ValueError(f"Code ids must lie in [0, {self.codebook_size}).")
    padded, size = partitioning.pad_batch(ids.astype(np.int32), self._mesh)
    with partitioning.activate(self._mesh, self._rules):
      images = self._decode(self.params, jax.device_put(padded, self._ids))
    return np.asarray(images)[:size]
