"""WDSR-B: wide-activation residual blocks and a pixel-shuffle output.

  images [B, S, S, 3] in [0, 1]
    -> 3x3 conv to `features`
    -> num_blocks x (1x1 conv widening to features * expansion, ReLU,
                     1x1 low-rank conv, 3x3 conv back to `features`, residual add)
    -> 3x3 conv to 3 * scale^2 channels -> pixel shuffle        (the body)
  + 5x5 conv of the input to 3 * scale^2 channels -> pixel shuffle (WDSR's skip)
  + the input upsampled bicubically
    -> images [B, S * scale, S * scale, 3]

The bicubic term, and output convolutions that start at zero, make the untrained
network exactly bicubic interpolation: training learns only what bicubic misses,
which on a CPU budget converges in a few hundred steps instead of first relearning
interpolation. WDSR's weight normalization is left out: with Adam it changed nothing
measurable here, and plain convolutions keep the checkpoint a plain tree.

Channels carry logical axis names ("embed" between blocks, "mlp" inside them), so
the upsampler shards by the same rules as every other model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from parti.upsampling.config import UpsamplerConfig

_ACTIVATIONS = ("batch", None, None, None)
_WIDE_ACTIVATIONS = ("batch", None, None, "mlp")


def _conv(features: int, size: int, axes: tuple[str | None, str | None], dtype, name: str,
          zero: bool = False) -> nn.Conv:  # fmt: skip
  """A same-padded conv whose kernel's (in, out) channel axes carry logical `axes`."""
  init = nn.initializers.zeros_init() if zero else nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal"
  )  # fmt: skip
  return nn.Conv(
    features,
    (size, size),
    padding="SAME",
    dtype=dtype,
    kernel_init=nn.with_logical_partitioning(init, (None, None, *axes)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
    name=name,
  )


def pixel_shuffle(x: jax.Array, scale: int) -> jax.Array:
  """[B, H, W, C * scale^2] -> [B, H * scale, W * scale, C] (depth to space)."""
  b, h, w, c = x.shape
  channels = c // (scale * scale)
  x = x.reshape(b, h, w, scale, scale, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * scale, w * scale, channels)


def bicubic(images: jax.Array, scale: int) -> jax.Array:
  b, h, w, c = images.shape
  return jax.image.resize(images, (b, h * scale, w * scale, c), "cubic")


class WideBlock(nn.Module):
  """x + conv3x3(lowrank1x1(relu(wide1x1(x)))) * res_scale."""

  config: UpsamplerConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    y = _conv(cfg.features * cfg.expansion, 1, ("embed", "mlp"), dtype, "wide")(x)
    y = nn.with_logical_constraint(nn.relu(y), _WIDE_ACTIVATIONS)
    y = _conv(cfg.low_rank_features, 1, ("mlp", None), dtype, "low_rank")(y)
    y = _conv(cfg.features, 3, (None, "embed"), dtype, "narrow")(y)
    return nn.with_logical_constraint(x + cfg.res_scale * y, _ACTIVATIONS)


class WDSR(nn.Module):
  """images [B, S, S, 3] in [0, 1] -> float32 [B, S * scale, S * scale, 3] (not clipped)."""

  config: UpsamplerConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    images = nn.with_logical_constraint(images.astype(jnp.float32), _ACTIVATIONS)
    centered = images - 0.5
    out_channels = 3 * cfg.scale * cfg.scale
    x = _conv(cfg.features, 3, (None, "embed"), dtype, "head")(centered)
    for i in range(cfg.num_blocks):
      x = WideBlock(cfg, name=f"block_{i}")(x)
    body = _conv(out_channels, 3, ("embed", None), dtype, "tail", zero=True)(x)
    skip = _conv(out_channels, 5, (None, None), dtype, "skip", zero=True)(centered)
    residual = pixel_shuffle((body + skip).astype(jnp.float32), cfg.scale)
    return nn.with_logical_constraint(bicubic(images, cfg.scale) + residual, _ACTIVATIONS)


def to_image(raw: jax.Array) -> jax.Array:
  return jnp.clip(raw, 0.0, 1.0)
