"""The tokenizer's architecture as frozen dataclasses; gin sets their fields.

ViT sizes follow ViT-VQGAN (Yu et al. 2021); Parti pairs a Small encoder with a
Large decoder. `tiny` is for CPU tests and the demo.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from parti.runtime.config_files import JsonConfig
from parti.runtime.errors import ConfigError
from parti.runtime.validation import check_types


@dataclasses.dataclass(frozen=True)
class ViTSize:
  """Depth and width of one ViT.

  `attention` False makes each block an MLP alone (pre-norm, residual), so every patch
  is coded on its own, with no position embeddings: nothing there could read them.
  """

  num_layers: int
  num_heads: int
  dim: int
  mlp_dim: int
  attention: bool = True


VIT_SIZES: dict[str, ViTSize] = {
  # No attention blocks: each patch is encoded and decoded on its own (patch embedding,
  # final norm, the tanh head). The CPU demo's tokenizer: at a few CPU minutes on the
  # shapes the blocks cost 10x the step time and converge slower (bench/README.md).
  "patch": ViTSize(num_layers=0, num_heads=4, dim=128, mlp_dim=512),
  # One MLP block per patch, still no attention: a patch encoder that is not linear in its
  # pixels. A linear encoder cannot give a red and a green cross one code unless it also
  # gives them one color, so the palette head's layout codes need this one (bench/README.md).
  "patch_mlp": ViTSize(num_layers=1, num_heads=4, dim=128, mlp_dim=512, attention=False),
  "tiny": ViTSize(num_layers=2, num_heads=4, dim=128, mlp_dim=512),
  "small": ViTSize(num_layers=8, num_heads=8, dim=512, mlp_dim=2048),
  "base": ViTSize(num_layers=12, num_heads=12, dim=768, mlp_dim=3072),
  "large": ViTSize(num_layers=32, num_heads=16, dim=1280, mlp_dim=5120),
}


GROUP_LAYOUTS = ("interleaved", "stacked")
DECODER_HEADS = ("pixels", "palette")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig(JsonConfig):
  """A ViT-VQGAN.

  Attributes:
    image_size: side of the square input images.
    patch_size: side of each patch; the token grid is image_size / patch_size square.
    encoder: a key of VIT_SIZES.
    decoder: a key of VIT_SIZES.
    codebook_size: number of codes (over all groups).
    code_dim: dimension of the factorized (low-dimensional) codes.
    codebook_groups: sub-codes per patch (product quantization): each patch takes one
      code from each of this many codebooks of codebook_size / codebook_groups codes,
      and the patch's tokens sit side by side on the token grid. With one group a patch
      is one code, as in ViT-VQGAN; with several, a patch's combination of sub-codes
      need not have been seen in training for Parti to write it.
    group_layout: where a patch's sub-codes sit on the token grid, with several groups.
      "interleaved": side by side, so the grid is read patch by patch, group by group
      ([h, w * groups]). "stacked": each group's whole [h, w] grid in turn ([groups * h,
      w]), so an autoregressive model draws every patch's first group before any
      patch's second: the layout the first group decides is whole before the second
      group's codes are drawn against it.
    group_order: the groups in the order they are written (a permutation of
      range(codebook_groups)); empty: 0, 1, ... .
    decoder_head: how the decoder turns a patch's codes into pixels. "pixels": ViT-VQGAN's
      two-layer tanh head reads all of a patch's codes. "palette" (two groups): group 0's
      code is decoded, on its own, to `palette_colors` colors, and group 1's code, through
      the decoder ViT and the tanh head, to each pixel's mix of them (a softmax). Color can
      then come from group 0 only and the arrangement from group 1 only, so any pair of
      codes draws, also a pair never seen together in training: a held-out color-shape
      pair is a seen color code with a seen layout code (bench/README.md).
    palette_colors: colors per patch of the palette head.
    commitment_cost: beta, the weight of the commitment loss.
    logit_laplace: the decoder also predicts a scale, for the logit-Laplace loss.
    dtype: compute dtype of projections and MLPs ("float32" or "bfloat16").
  """

  image_size: int = 256
  patch_size: int = 8
  encoder: str = "small"
  decoder: str = "large"
  codebook_size: int = 8192
  code_dim: int = 32
  codebook_groups: int = 1
  group_layout: str = "interleaved"
  group_order: tuple[int, ...] = ()
  decoder_head: str = "pixels"
  palette_colors: int = 2
  l2_normalize: bool = True
  commitment_cost: float = 0.25
  logit_laplace: bool = False
  dtype: str = "bfloat16"

  def __post_init__(self):
    check_types(self)
    for field in ("encoder", "decoder"):
      if getattr(self, field) not in VIT_SIZES:
        raise ConfigError(
          f"TokenizerConfig.{field} {getattr(self, field)!r} is not one of {sorted(VIT_SIZES)}."
        )
    if self.image_size % self.patch_size:
      raise ConfigError(
        f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}."
      )
    for field in ("image_size", "patch_size", "codebook_size", "code_dim", "codebook_groups"):
      if getattr(self, field) < 1:
        raise ConfigError(f"TokenizerConfig.{field} must be positive.")
    if self.codebook_size % self.codebook_groups:
      raise ConfigError(
        f"TokenizerConfig.codebook_size {self.codebook_size} does not split into "
        f"codebook_groups {self.codebook_groups} equal codebooks."
      )
    if isinstance(self.group_order, list):  # From JSON.
      object.__setattr__(self, "group_order", tuple(self.group_order))
    if self.group_layout not in GROUP_LAYOUTS:
      raise ConfigError(
        f"TokenizerConfig.group_layout {self.group_layout!r} is not one of {GROUP_LAYOUTS}."
      )
    if self.group_order and sorted(self.group_order) != list(range(self.codebook_groups)):
      raise ConfigError(
        f"TokenizerConfig.group_order {self.group_order} is not an order of the "
        f"{self.codebook_groups} groups 0 .. {self.codebook_groups - 1}."
      )
    if self.decoder_head not in DECODER_HEADS:
      raise ConfigError(
        f"TokenizerConfig.decoder_head {self.decoder_head!r} is not one of {DECODER_HEADS}."
      )
    if self.decoder_head == "palette":
      if self.codebook_groups != 2:
        raise ConfigError(
          "TokenizerConfig.decoder_head 'palette' decodes group 0 to colors and group 1 to "
          f"their layout, so it needs codebook_groups = 2, not {self.codebook_groups}."
        )
      if self.logit_laplace:
        raise ConfigError(
          "TokenizerConfig.decoder_head 'palette' mixes colors, which has no logit-Laplace "
          "scale: set logit_laplace to False."
        )
      if self.palette_colors < 2:
        raise ConfigError(
          f"TokenizerConfig.palette_colors must be at least 2, got {self.palette_colors}."
        )
    if self.dtype not in ("float32", "bfloat16"):
      raise ConfigError(f"TokenizerConfig.dtype must be float32 or bfloat16, not {self.dtype!r}.")

  @property
  def patch_grid(self) -> tuple[int, int]:
    """Patches per side: the grid the encoder and decoder see."""
    side = self.image_size // self.patch_size
    return (side, side)

  @property
  def grid(self) -> tuple[int, int]:
    """The token grid (see `group_layout`)."""
    rows, cols = self.patch_grid
    if self.group_layout == "stacked":
      return (rows * self.codebook_groups, cols)
    return (rows, cols * self.codebook_groups)

  @property
  def groups_in_order(self) -> tuple[int, ...]:
    """The groups in the order the grid writes them."""
    return self.group_order or tuple(range(self.codebook_groups))

  def to_grid(self, ids):
    """Code ids [B, patches, groups] (group g's codes in column g) -> [B, *grid]."""
    ids = ids[..., list(self.groups_in_order)]
    if self.group_layout == "stacked":
      ids = ids.swapaxes(1, 2)
    return ids.reshape(ids.shape[0], *self.grid)

  def from_grid(self, ids):
    """The inverse of `to_grid`: [B, *grid] -> [B, patches, groups]."""
    groups = self.codebook_groups
    if self.group_layout == "stacked":
      ids = ids.reshape(ids.shape[0], groups, -1).swapaxes(1, 2)
    else:
      ids = ids.reshape(ids.shape[0], -1, groups)
    inverse = [self.groups_in_order.index(g) for g in range(groups)]
    return ids[..., inverse]

  def token_mask(self, patches):
    """A bool mask over the patch grid [h, w] -> the same over the token grid,
    flattened: the tokens of every sub-code of the masked patches."""
    patches = np.asarray(patches, bool).reshape(-1)
    per_group = np.repeat(patches[:, None], self.codebook_groups, axis=1)
    return self.to_grid(per_group[None])[0].reshape(-1)

  @property
  def encoder_size(self) -> ViTSize:
    return VIT_SIZES[self.encoder]

  @property
  def decoder_size(self) -> ViTSize:
    return VIT_SIZES[self.decoder]
