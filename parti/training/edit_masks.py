"""Random regions to redraw, for fine-tuning the editing head (`PartiConfig.edit_context`).

GLIDE fine-tuned its inpainting model on random masks; ours are over the patch grid,
drawn inside the train step from its own key, of three kinds that cover the edits
inference sees (`parti.sampling.editing`):

  box:        a random rectangle of tokens is redrawn (inpainting, a recolor, a removal);
  border:     everything but a random rectangle is redrawn (outpainting a crop);
  everything: every token is redrawn: plain generation, which the head must keep.

Each example's context is its own tokens with the redrawn ones replaced by the mask
id, and only the redrawn tokens carry loss: the kept ones are fed as given when
editing, so learning to copy them from the context would be wasted capacity.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from parti.runtime.errors import ConfigError
from parti.runtime.validation import check_types


@dataclasses.dataclass(frozen=True)
class EditMaskConfig:
  """How often each kind of region is drawn (normalized; see the module docstring)."""

  box: float = 0.5
  border: float = 0.3
  everything: float = 0.2

  def __post_init__(self):
    check_types(self)
    weights = (self.box, self.border, self.everything)
    if min(weights) < 0 or sum(weights) <= 0:
      raise ConfigError(f"EditMaskConfig weights must be >= 0 and not all 0, got {self}.")


def _rectangles(rng: jax.Array, batch: int, rows: int, cols: int) -> jax.Array:
  """bool [batch, rows, cols]: a rectangle per example, its two corners uniform."""
  row_key, col_key = jax.random.split(rng)
  r = jnp.sort(jax.random.randint(row_key, (batch, 2), 0, rows), axis=1)
  c = jnp.sort(jax.random.randint(col_key, (batch, 2), 0, cols), axis=1)
  row_in = (jnp.arange(rows) >= r[:, :1]) & (jnp.arange(rows) <= r[:, 1:])
  col_in = (jnp.arange(cols) >= c[:, :1]) & (jnp.arange(cols) <= c[:, 1:])
  return row_in[:, :, None] & col_in[:, None, :]


def random_masks(
  rng: jax.Array, batch: int, grid: tuple[int, int], config: EditMaskConfig, stacked: int = 1
):
  """bool [batch, rows * cols]: the tokens each example redraws, never none of them
  (a border whose kept rectangle is the whole grid redraws everything instead). With
  `stacked` patch grids one after another on the token grid (`PartiConfig.stacked_groups`),
  a region is drawn on one of them and covers the same patches in each."""
  rows, cols = grid[0] // stacked, grid[1]
  kind_key, box_key = jax.random.split(rng)
  weights = jnp.asarray([config.box, config.border, config.everything], jnp.float32)
  kind = jax.random.categorical(kind_key, jnp.log(weights), shape=(batch,))
  rectangle = _rectangles(box_key, batch, rows, cols).reshape(batch, -1)
  border = ~rectangle
  border = jnp.where(border.any(axis=1, keepdims=True), border, True)
  masks = jnp.stack([rectangle, border, jnp.ones_like(rectangle)], axis=1)
  masks = jnp.take_along_axis(masks, kind[:, None, None], axis=1)[:, 0]
  return jnp.tile(masks, (1, stacked))


def edit_features(batch: dict, rng: jax.Array, config, masks: EditMaskConfig) -> dict:
  """A token batch with `edit_context_tokens` (the targets, `config.mask_id` where
  redrawn) added, and loss on the redrawn tokens only."""
  targets = batch["decoder_target_tokens"]
  redraw = random_masks(rng, targets.shape[0], config.image_grid, masks, config.stacked_groups)
  weights = batch["decoder_loss_weights"] * redraw.astype(batch["decoder_loss_weights"].dtype)
  return {
    **batch,
    "edit_context_tokens": jnp.where(redraw, config.mask_id, targets).astype(jnp.int32),
    "decoder_loss_weights": weights,
  }
