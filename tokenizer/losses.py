"""The tokenizer's losses: reconstruction (L2, logit-Laplace), perceptual, adversarial, R1.

ViT-VQGAN's objective is L = L_VQ + 0.1 L_adv + 0.1 L_perceptual + 0.1 L_logit-laplace
+ 1.0 L2; Parti drops logit-Laplace. Every weight is a `LossWeights` field (gin).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from parti.runtime.validation import check_types


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights of each term, and how the adversarial game is played.

  Attributes:
    l2: mean squared error on pixels in [0, 1].
    logit_laplace: the logit-Laplace NLL (needs TokenizerConfig.logit_laplace).
    perceptual: the LPIPS-style VGG distance (needs a weights file; else off).
    adversarial: the generator's adversarial term.
    codebook: the VQ codebook term (1.0 in VQ-VAE).
    view_invariance: with views (`train_tokenizer.group_views`), the squared distance
      between an image's and its view's normalized encoder outputs in every group the
      view's factor should not reach.
    commitment: set by TokenizerConfig.commitment_cost; kept here for the log.
    adversarial_start_step: steps before this train without the discriminator.
    gan_loss: "non_saturating" or "hinge".
    r1_gamma: weight of the R1 penalty gamma/2 * |grad_x D(x)|^2 on real images.
  """

  l2: float = 1.0
  logit_laplace: float = 0.0
  perceptual: float = 0.1
  adversarial: float = 0.1
  codebook: float = 1.0
  view_invariance: float = 1.0
  adversarial_start_step: int = 0
  gan_loss: str = "non_saturating"
  r1_gamma: float = 10.0

  def __post_init__(self):
    check_types(self)
    if self.gan_loss not in ("non_saturating", "hinge"):
      raise ValueError(f"gan_loss must be 'non_saturating' or 'hinge', not {self.gan_loss!r}.")


def l2(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
  return jnp.mean((reconstruction - target) ** 2)


def logit_laplace_nll(raw: jax.Array, target: jax.Array, eps: float = 0.1) -> jax.Array:
  """DALL-E's logit-Laplace negative log-likelihood.

  `raw` holds the location (channels 0-2, in logit space) and the log scale
  (channels 3-5); pixels are squeezed into (eps, 1 - eps) so their logit is finite.
  """
  x = (1 - 2 * eps) * target + eps
  mu, log_b = raw[..., :3], raw[..., 3:]
  logit_x = jnp.log(x) - jnp.log1p(-x)
  return jnp.mean(
    jnp.log(2.0) + log_b + jnp.log(x * (1 - x)) + jnp.abs(logit_x - mu) * jnp.exp(-log_b)
  )


def psnr(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
  """Peak signal-to-noise ratio in dB for images in [0, 1], averaged over the batch."""
  mse = jnp.mean((jnp.clip(reconstruction, 0, 1) - target) ** 2, axis=(1, 2, 3))
  return jnp.mean(-10.0 * jnp.log10(jnp.maximum(mse, 1e-10)))


def generator_adversarial(fake_logits: jax.Array, kind: str) -> jax.Array:
  if kind == "hinge":
    return -jnp.mean(fake_logits)
  return jnp.mean(jax.nn.softplus(-fake_logits))


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str) -> jax.Array:
  if kind == "hinge":
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))
  return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))


def discriminator_objective(discriminate, real, fake, kind: str, r1_gamma: float) -> jax.Array:
  """The discriminator's loss with its R1 penalty; `discriminate` maps images to logits."""
  loss = discriminator_loss(discriminate(real), discriminate(fake), kind)
  if r1_gamma > 0:
    loss += r1_gamma / 2 * r1_penalty(discriminate, real)
  return loss


def r1_penalty(discriminate, images: jax.Array) -> jax.Array:
  """E |grad_x D(x)|^2 over real images (multiply by gamma / 2)."""
  gradients = jax.grad(lambda x: jnp.sum(discriminate(x)))(images)
  return jnp.mean(jnp.sum(gradients**2, axis=(1, 2, 3)))


def codebook_stats(ids: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
  """Usage (fraction of codes used) and perplexity (exp entropy) of a batch of ids."""
  counts = jnp.bincount(ids.reshape(-1), length=codebook_size)
  probs = counts / jnp.maximum(counts.sum(), 1)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0))
  return {"usage": jnp.mean(counts > 0), "perplexity": jnp.exp(entropy)}
