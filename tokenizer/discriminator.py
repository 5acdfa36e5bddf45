"""A StyleGAN2-style discriminator (residual, downsampling, minibatch stddev), not a PatchGAN.

ViT-VQGAN trains its tokenizer against this kind of discriminator; `losses.py`
holds the non-saturating and hinge objectives and the R1 penalty.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn


def _downsample(x: jax.Array) -> jax.Array:
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResidualBlock(nn.Module):
  """conv-lrelu-conv-lrelu-down plus a 1x1 downsampled skip, scaled by 1/sqrt(2)."""

  channels: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.leaky_relu(nn.Conv(x.shape[-1], (3, 3), name="conv_0")(x), 0.2)
    y = nn.leaky_relu(nn.Conv(self.channels, (3, 3), name="conv_1")(y), 0.2)
    y = _downsample(y)
    skip = nn.Conv(self.channels, (1, 1), use_bias=False, name="skip")(_downsample(x))
    return (y + skip) / math.sqrt(2.0)


class Discriminator(nn.Module):
  """Real/fake logits for images [B, H, W, 3] in [0, 1].

  Attributes:
    base_channels: channels of the first block; each halving of resolution
      doubles them, up to `max_channels`.
    max_channels: the cap.
    stddev_group: group size of the minibatch standard-deviation feature.
  """

  base_channels: int = 64
  max_channels: int = 512
  stddev_group: int = 4

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32) * 2.0 - 1.0
    channels = self.base_channels
    x = nn.leaky_relu(nn.Conv(channels, (1, 1), name="from_rgb")(x), 0.2)
    block = 0
    while x.shape[1] > 4:
      channels = min(channels * 2, self.max_channels)
      x = ResidualBlock(channels, name=f"block_{block}")(x)
      block += 1
    x = _minibatch_stddev(x, self.stddev_group)
    x = nn.leaky_relu(nn.Conv(channels, (3, 3), name="final_conv")(x), 0.2)
    x = nn.leaky_relu(nn.Dense(channels, name="final_dense")(x.reshape(x.shape[0], -1)), 0.2)
    return nn.Dense(1, name="logit")(x)[:, 0]


def _minibatch_stddev(x: jax.Array, group: int) -> jax.Array:
  """Appends the average feature stddev over groups of examples (StyleGAN)."""
  b, h, w, c = x.shape
  group = math.gcd(group, b)
  y = x.reshape(group, b // group, h, w, c)
  y = jnp.sqrt(jnp.var(y, axis=0) + 1e-8).mean(axis=(1, 2, 3))  # [b // group]
  y = jnp.tile(y[:, None, None, None], (group, h, w, 1))
  return jnp.concatenate([x, y], axis=-1)
