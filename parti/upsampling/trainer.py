"""The upsampler's training state, losses and jitted steps (`parti.train_upsampler`
drives them through `parti.training.loop`).

The loss is L1 on pixels, with the tokenizer's perceptual (VGG) and adversarial terms
as options: the same functions and discriminator, so a GAN-trained upsampler plays
the game the tokenizer plays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from parti.runtime.validation import check_types
from parti.tokenizer import discriminator, losses, vgg
from parti.training import gan
from parti.upsampling import model
from parti.upsampling.config import UpsamplerConfig


@dataclasses.dataclass(frozen=True)
class UpsamplerLossWeights:
  """Weights of each term, and how the adversarial game is played.

  Attributes:
    l1: mean absolute error on pixels in [0, 1] (WDSR's loss).
    perceptual: the LPIPS-style VGG distance (needs a weights file; else off).
    adversarial: the generator's adversarial term (0: no discriminator is trained).
    adversarial_start_step: steps before this train without the discriminator.
    gan_loss: "non_saturating" or "hinge".
    r1_gamma: weight of the R1 penalty on real images.
  """

  l1: float = 1.0
  perceptual: float = 0.0
  adversarial: float = 0.0
  adversarial_start_step: int = 0
  gan_loss: str = "non_saturating"
  r1_gamma: float = 10.0

  def __post_init__(self):
    check_types(self)
    if self.gan_loss not in ("non_saturating", "hinge"):
      raise ValueError(f"gan_loss must be 'non_saturating' or 'hinge', not {self.gan_loss!r}.")


@flax.struct.dataclass
class UpsamplerState:
  """Everything a checkpoint holds."""

  step: jax.Array
  params: Any
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any


def downscale(images: jax.Array, size: int) -> jax.Array:
  """Antialiased bicubic downscaling to `size` square: how training pairs are made from
  any image task (the shapes pairs task renders both sizes instead)."""
  b, _, _, c = images.shape
  return jnp.clip(jax.image.resize(images, (b, size, size, c), "cubic", antialias=True), 0, 1)


class Trainer:
  """The jitted steps of one configuration."""

  def __init__(
    self,
    config: UpsamplerConfig,
    weights: UpsamplerLossWeights,
    optimizer: optax.GradientTransformation,
    disc_optimizer: optax.GradientTransformation,
    disc_channels: int,
  ):
    self.config = config
    self.weights = weights
    self.model = model.WDSR(config)
    self.disc = discriminator.Discriminator(base_channels=disc_channels)
    self.optimizer = optimizer
    self.disc_optimizer = disc_optimizer

  def init(self, rng: jax.Array, crop: int) -> UpsamplerState:
    """Fresh parameters; the discriminator is sized for outputs of `crop` * scale pixels."""
    size = crop * self.config.scale
    g_rng, d_rng = jax.random.split(rng)
    params = self.model.init(g_rng, jnp.zeros((1, crop, crop, 3), jnp.float32))["params"]
    disc_params = self.disc.init(d_rng, jnp.zeros((1, size, size, 3), jnp.float32))["params"]
    return UpsamplerState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=self.optimizer.init(params),
      disc_params=disc_params,
      disc_opt_state=self.disc_optimizer.init(disc_params),
    )

  def _generator_loss(self, params, disc_params, low, high, with_gan: bool, perceptual_weights):
    w = self.weights
    raw = self.model.apply({"params": params}, low)
    terms = {"l1": jnp.mean(jnp.abs(raw - high))}
    total = w.l1 * terms["l1"]
    upsampled = model.to_image(raw)
    if perceptual_weights is not None and w.perceptual > 0:
      terms["perceptual"] = vgg.perceptual_distance(perceptual_weights, upsampled, high)
      total += w.perceptual * terms["perceptual"]
    if with_gan:
      fake = self.disc.apply({"params": disc_params}, upsampled)
      terms["adversarial"] = losses.generator_adversarial(fake, w.gan_loss)
      total += w.adversarial * terms["adversarial"]
    terms["total"] = total
    return total, (terms, upsampled)

  def train_step(
    self,
    state: UpsamplerState,
    batch: tuple[jax.Array, jax.Array],
    with_gan: bool,
    perceptual_weights: dict | None = None,
  ):
    """One generator update on `batch` = (low, high) (and, with the GAN on, one
    discriminator update); `perceptual_weights` as in the tokenizer's `Trainer`."""
    low, high = batch
    grad_fn = jax.value_and_grad(self._generator_loss, has_aux=True)
    (_, (terms, upsampled)), grads = grad_fn(
      state.params, state.disc_params, low, high, with_gan, perceptual_weights
    )
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {f"loss/{k}": v for k, v in terms.items()}
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["psnr"] = losses.psnr(upsampled, high)
    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    if with_gan:
      disc_params, disc_opt_state, metrics["loss/discriminator"] = gan.discriminator_step(
        self.disc, self.disc_optimizer, disc_params, disc_opt_state, high, upsampled,
        self.weights.gan_loss, self.weights.r1_gamma,
      )  # fmt: skip
    state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      disc_params=disc_params,
      disc_opt_state=disc_opt_state,
    )
    return state, metrics

  def eval_step(self, params, low, high):
    """(upsampled, PSNR of the upsampler, PSNR of bicubic interpolation) on whole images."""
    upsampled = model.to_image(self.model.apply({"params": params}, low))
    base = jnp.clip(model.bicubic(low, self.config.scale), 0, 1)
    return upsampled, losses.psnr(upsampled, high), losses.psnr(base, high)
