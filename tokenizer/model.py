"""ViT-VQGAN: a ViT encoder, a factorized l2-normalized codebook, and a ViT decoder.

  images [B, H, W, 3] in [0, 1]
    -> patches [B, N, p*p*3] -> ViT encoder -> [B, N, dim]
    -> project to code_dim, l2-normalize, nearest code by cosine similarity -> ids [B, N]
    -> code vectors (straight-through) -> project to dim -> ViT decoder
    -> 2-layer head with tanh -> patches -> images [B, H, W, 3]

The decoder has no final sigmoid: Parti removed it (and the logit-Laplace loss)
to fix pixelation, and reads the raw outputs as RGB in [0, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from parti.modeling import layers
from parti.modeling.layers import l2_normalize, patchify, unpatchify
from parti.tokenizer.config import TokenizerConfig, ViTSize


class ViT(nn.Module):
  """Position embeddings (fixed 2-D sincos), pre-norm blocks, a final norm.

  Without attention (size `patch`, no blocks; `patch_mlp`, blocks of an MLP alone)
  nothing mixes positions, so the embeddings are left out: added there, they would
  only make each patch's code depend on where the patch sits, and a flat background
  would take a different code at every place in the grid.
  """

  size: ViTSize
  grid: tuple[int, int]
  dtype: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = jnp.dtype(self.dtype)
    if self.size.num_layers and self.size.attention:
      x = x + layers.sincos_2d(*self.grid, self.size.dim)[None]
    for i in range(self.size.num_layers):
      if self.size.attention:
        x = layers.EncoderBlock(self.size.num_heads, self.size.mlp_dim, dtype, name=f"block_{i}")(x)
      else:
        x = MlpBlock(self.size.mlp_dim, dtype, name=f"block_{i}")(x)
    return layers.Norm(name="final_norm")(x)


class MlpBlock(nn.Module):
  """A pre-norm MLP with a residual connection: a ViT block without its attention."""

  mlp_dim: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = layers.Mlp(self.mlp_dim, self.dtype, name="mlp")(layers.Norm(name="pre_mlp_norm")(x))
    return nn.with_logical_constraint((x + y).astype(jnp.float32), layers.ACTIVATION_AXES)


class FactorizedQuantizer(nn.Module):
  """Nearest-code lookup in low-dimensional, optionally l2-normalized codebooks.

  With `groups` > 1 this is a product quantizer: a vector [..., groups * code_dim]
  is cut into `groups` sub-vectors, and each takes the nearest code of its own
  codebook of codebook_size / groups codes. Ids are global, group g's codes being
  g * (codebook_size / groups) onwards, so the groups share one vocabulary of
  `codebook_size` ids. The codebook is one [codebook_size, code_dim] parameter,
  group after group, so a single group is the plain ViT-VQGAN quantizer.

  Returns the straight-through code vectors, the ids [..., groups], and the two VQ
  losses: codebook = |sg(z) - e|^2 (moves codes) and commitment = |z - sg(e)|^2
  (moves the encoder), each averaged over positions and code dimensions.
  """

  codebook_size: int
  code_dim: int
  l2_normalize: bool = True
  groups: int = 1

  def setup(self):
    self.codebook = self.param(
      "codebook",
      nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", None)),
      (self.codebook_size, self.code_dim),
      jnp.float32,
    )

  def codes(self) -> jax.Array:
    """The code vectors [codebook_size, code_dim] as the lookup sees them
    (normalized if configured)."""
    return l2_normalize(self.codebook) if self.l2_normalize else self.codebook

  def split(self, z: jax.Array) -> jax.Array:
    """[..., groups * code_dim] -> [..., groups, code_dim], normalized if configured."""
    z = z.astype(jnp.float32).reshape(*z.shape[:-1], self.groups, self.code_dim)
    return l2_normalize(z) if self.l2_normalize else z

  def lookup(self, z: jax.Array) -> jax.Array:
    """The nearest code ids [..., groups] of z [..., groups * code_dim]."""
    return self._nearest(self.split(z))

  def _nearest(self, z: jax.Array) -> jax.Array:
    """The nearest code ids [..., groups] of sub-vectors z [..., groups, code_dim],
    already normalized if configured."""
    codes = self.codes().reshape(self.groups, -1, self.code_dim)
    if self.l2_normalize:
      local = jnp.argmax(jnp.einsum("...gd,gkd->...gk", z, codes), axis=-1)
    else:
      distance = (
        jnp.sum(z * z, -1, keepdims=True)
        - 2 * jnp.einsum("...gd,gkd->...gk", z, codes)
        + jnp.sum(codes**2, -1)
      )
      local = jnp.argmin(distance, axis=-1)
    offsets = jnp.arange(self.groups) * codes.shape[1]
    return (local + offsets).astype(jnp.int32)

  def embed(self, ids: jax.Array) -> jax.Array:
    """Code ids [..., groups] -> their vectors concatenated, [..., groups * code_dim]."""
    vectors = jnp.take(self.codes(), ids, axis=0)
    return vectors.reshape(*ids.shape[:-1], self.groups * self.code_dim)

  def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    split = self.split(z)
    ids = self._nearest(split)
    z = split.reshape(*z.shape[:-1], self.groups * self.code_dim)
    quantized = self.embed(ids)
    losses = {
      "codebook": jnp.mean((jax.lax.stop_gradient(z) - quantized) ** 2),
      "commitment": jnp.mean((z - jax.lax.stop_gradient(quantized)) ** 2),
    }
    straight_through = z + jax.lax.stop_gradient(quantized - z)
    return straight_through, ids, losses


class Encoder(nn.Module):
  config: TokenizerConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] in [0, 1] -> unnormalized codes [B, N, groups * code_dim]."""
    cfg, size = self.config, self.config.encoder_size
    x = patchify(images.astype(jnp.float32) * 2.0 - 1.0, cfg.patch_size)
    x = layers.dense(size.dim, (None, "embed"), cfg.dtype, use_bias=True, name="patch_embed")(x)
    x = ViT(size, cfg.patch_grid, cfg.dtype, name="vit")(x)
    x = layers.dense(
      cfg.code_dim * cfg.codebook_groups,
      ("embed", None),
      jnp.float32,
      use_bias=True,
      name="to_code",
    )(x)
    return x.astype(jnp.float32)


class Decoder(nn.Module):
  config: TokenizerConfig

  @nn.compact
  def __call__(self, codes: jax.Array) -> jax.Array:
    """Code vectors [B, N, groups * code_dim] -> raw outputs [B, H, W, 3] (or 6 with logit-Laplace)."""
    cfg, size = self.config, self.config.decoder_size
    palette = cfg.decoder_head == "palette"
    if palette:
      # Group 0 says the colors, group 1 (what the ViT and the head read) where each goes.
      codes, palette_code = codes[..., cfg.code_dim :], codes[..., : cfg.code_dim]
    x = layers.dense(size.dim, (None, "embed"), jnp.float32, use_bias=True, name="from_code")(codes)
    x = ViT(size, cfg.patch_grid, cfg.dtype, name="vit")(x)
    channels = cfg.palette_colors if palette else 6 if cfg.logit_laplace else 3
    # The output head: two matrices with tanh between (ViT-VQGAN).
    x = layers.dense(size.mlp_dim, ("embed", "mlp"), cfg.dtype, use_bias=True, name="head_hidden")(
      x
    )
    x = jnp.tanh(x)
    x = layers.dense(
      cfg.patch_size**2 * channels, ("mlp", None), jnp.float32, use_bias=True, name="head_out"
    )(x)
    x = x.astype(jnp.float32)
    if palette:
      colors = Palette(cfg, name="palette")(palette_code)
      x = _mix_palette(x, colors, cfg.palette_colors)
    return unpatchify(x, cfg.patch_size, cfg.patch_grid)


class Palette(nn.Module):
  """The palette head's colors: palette codes [B, N, code_dim] -> [B, N, palette_colors, 3].
  A patch's colors are read from its palette code alone (a two-layer tanh MLP)."""

  config: TokenizerConfig

  @nn.compact
  def __call__(self, code: jax.Array) -> jax.Array:
    cfg, dim = self.config, self.config.decoder_size.dim
    x = layers.dense(dim, (None, "embed"), jnp.float32, use_bias=True, name="input")(code)
    x = layers.Norm(name="norm")(x)
    x = jnp.tanh(layers.dense(dim, ("embed", "mlp"), cfg.dtype, use_bias=True, name="hidden")(x))
    colors = layers.dense(
      cfg.palette_colors * 3, ("mlp", None), jnp.float32, use_bias=True, name="output"
    )(x)
    return colors.astype(jnp.float32).reshape(*code.shape[:-1], cfg.palette_colors, 3)


def _mix_palette(logits: jax.Array, colors: jax.Array, count: int) -> jax.Array:
  """Per-pixel softmax weights over a patch's colors: logits [B, N, p*p*count] and colors
  [B, N, count, 3] -> patches [B, N, p*p*3]."""
  weights = jax.nn.softmax(logits.reshape(*logits.shape[:-1], -1, count), axis=-1)
  mixed = jnp.einsum("bnpk,bnkc->bnpc", weights, colors)
  return mixed.reshape(*mixed.shape[:2], -1)


class VitVQGAN(nn.Module):
  """The whole tokenizer; `__call__` reconstructs, `encode`/`decode` convert.

  Ids are laid out on the config's token grid (`TokenizerConfig.grid`): with one
  group, a code per patch; with several, as `group_layout` says.
  """

  config: TokenizerConfig

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg)
    self.quantizer = FactorizedQuantizer(
      cfg.codebook_size, cfg.code_dim, cfg.l2_normalize, cfg.codebook_groups
    )
    self.decoder = Decoder(cfg)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Returns (raw decoder outputs, ids [B, h, w], VQ losses)."""
    return self.reconstruct_with_latents(images)[:3]

  def reconstruct_with_latents(self, images: jax.Array):
    """`__call__`'s (raw decoder outputs, ids [B, h, w], VQ losses), and the encoder
    outputs [B, N, groups, code_dim] as the lookup sees them (`latents`), from one pass."""
    z = self.encoder(images)
    quantized, ids, losses = self.quantizer(z)
    return self.decoder(quantized), self.config.to_grid(ids), losses, self.quantizer.split(z)

  def latents(self, images: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(encoder outputs [B, N, groups, code_dim] as the lookup sees them, code ids
    [B, N, groups], VQ losses): what training compares an image and its views by."""
    z = self.encoder(images)
    _, ids, losses = self.quantizer(z)
    return self.quantizer.split(z), ids, losses

  def encode(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] in [0, 1] -> code ids int32 [B, *grid]."""
    return self.config.to_grid(self.quantizer.lookup(self.encoder(images)))

  def decode(self, ids: jax.Array) -> jax.Array:
    """code ids [B, *grid] -> images [B, H, W, 3], clipped to [0, 1]."""
    codes = self.quantizer.embed(self.config.from_grid(ids))
    return to_image(self.decoder(codes), self.config)


def to_image(raw: jax.Array, config: TokenizerConfig) -> jax.Array:
  """Decoder outputs as RGB in [0, 1]: raw values clipped (or sigmoid of the
  logit-Laplace location)."""
  if config.logit_laplace:
    return jax.nn.sigmoid(raw[..., :3])
  return jnp.clip(raw, 0.0, 1.0)
