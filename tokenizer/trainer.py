"""The tokenizer's training state and jitted steps: the generator and discriminator
updates, dead-code restarts and the evaluation step (`parti.tokenizer.train` drives
them through `parti.training.loop`).

With views (`Trainer(views=...)`), each image comes with, per codebook group, an image
that differs from it only in what that group should code (the shapes' recolored and
reshaped scenes). Every other group must then code the view as it codes the image: their
normalized encoder outputs are pulled together (`LossWeights.view_invariance`). The
reconstruction alone does not split the factors: without views, most of a palette
tokenizer's layout codes still tell the color, and Parti then binds a shape to the colors
its codes were seen with (bench/README.md).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from parti.tokenizer import discriminator, losses, model, vgg
from parti.tokenizer.config import TokenizerConfig
from parti.training import gan


@flax.struct.dataclass
class TokenizerState:
  """Everything a checkpoint holds."""

  step: jax.Array
  params: Any
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any
  code_counts: jax.Array  # Codes chosen since the last dead-code restart.


class Trainer:
  """The jitted steps of one configuration; `train` drives them."""

  def __init__(
    self,
    config: TokenizerConfig,
    weights: losses.LossWeights,
    optimizer: optax.GradientTransformation,
    disc_optimizer: optax.GradientTransformation,
    disc_channels: int,
    views: Sequence[str] = (),
  ):
    """`views`: empty, or per codebook group the batch feature holding a view of each
    image that changes only what that group codes ("" where a group has none); the
    batches the steps take are then dicts of `image` and those features."""
    if views and len(views) != config.codebook_groups:
      raise ValueError(
        f"views names {len(views)} features for {config.codebook_groups} codebook groups."
      )
    self.views = tuple(views) if any(views) else ()
    self.config = config
    self.weights = weights
    self.model = model.VitVQGAN(config)
    self.disc = discriminator.Discriminator(base_channels=disc_channels)
    self.optimizer = optimizer
    self.disc_optimizer = disc_optimizer

  def init(self, rng: jax.Array) -> TokenizerState:
    images = jnp.zeros((1, self.config.image_size, self.config.image_size, 3), jnp.float32)
    g_rng, d_rng = jax.random.split(rng)
    params = self.model.init(g_rng, images)["params"]
    disc_params = self.disc.init(d_rng, images)["params"]
    return TokenizerState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=self.optimizer.init(params),
      disc_params=disc_params,
      disc_opt_state=self.disc_optimizer.init(disc_params),
      code_counts=jnp.zeros((self.config.codebook_size,), jnp.int32),
    )

  def images(self, batch) -> jax.Array:
    """The images [B, H, W, 3] of a batch (an array, or with views a dict)."""
    return batch["image"] if self.views else batch

  def _view_invariance(self, params, z, batch):
    """(invariance loss, view ids [B, N, groups] per view): each view's encoder outputs
    against the image's (`z`, the model's `latents` of the images), in the groups its
    factor should leave unchanged."""
    apply = functools.partial(self.model.apply, {"params": params}, method="latents")
    distances, view_ids = [], []
    for group, feature in enumerate(self.views):
      if not feature:
        continue
      z_view, ids, _ = apply(batch[feature])
      others = [g for g in range(self.config.codebook_groups) if g != group]
      distances.append(jnp.mean((z[..., others, :] - z_view[..., others, :]) ** 2))
      view_ids.append(ids)
    return sum(distances) / len(distances), view_ids

  def _generator_loss(self, params, disc_params, batch, with_gan: bool, perceptual_weights):
    cfg, w = self.config, self.weights
    images = self.images(batch)
    # The latents cost nothing where no view reads them: jit drops what goes unused.
    raw, ids, vq, latents = self.model.apply(
      {"params": params}, images, method="reconstruct_with_latents"
    )
    reconstruction = model.to_image(raw, cfg)
    rgb = raw[..., :3] if not cfg.logit_laplace else reconstruction
    terms = {
      "l2": losses.l2(rgb, images),
      "codebook": vq["codebook"],
      "commitment": vq["commitment"],
    }
    total = (
      w.l2 * terms["l2"] + w.codebook * vq["codebook"] + cfg.commitment_cost * vq["commitment"]
    )
    if cfg.logit_laplace:
      terms["logit_laplace"] = losses.logit_laplace_nll(raw, images)
      total += w.logit_laplace * terms["logit_laplace"]
    if perceptual_weights is not None and w.perceptual > 0:
      terms["perceptual"] = vgg.perceptual_distance(perceptual_weights, reconstruction, images)
      total += w.perceptual * terms["perceptual"]
    if with_gan:
      fake = self.disc.apply({"params": disc_params}, reconstruction)
      terms["adversarial"] = losses.generator_adversarial(fake, w.gan_loss)
      total += w.adversarial * terms["adversarial"]
    if self.views:
      terms["view_invariance"], view_ids = self._view_invariance(params, latents, batch)
      total += w.view_invariance * terms["view_invariance"]
      # The views' codes count as used, as the images' do (dead-code restarts).
      ids = jnp.concatenate([ids.reshape(-1), *(v.reshape(-1) for v in view_ids)])
    terms["total"] = total
    return total, (terms, reconstruction, ids)

  def train_step(
    self,
    state: TokenizerState,
    batch,
    with_gan: bool,
    perceptual_weights: dict | None = None,
  ):
    """One generator update (and, with the GAN on, one discriminator update).

    `batch`: images [B, H, W, 3] in [0, 1]; with views, a dict of them and the views.
    `perceptual_weights`: VGG16's (`vgg.load_vgg16`) for the perceptual loss, None for
    none; pass them as an argument of the jitted step (see `gan.gan_schedule_step`).
    """
    images = self.images(batch)
    grad_fn = jax.value_and_grad(self._generator_loss, has_aux=True)
    (_, (terms, reconstruction, ids)), grads = grad_fn(
      state.params, state.disc_params, batch, with_gan, perceptual_weights
    )
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {f"loss/{k}": v for k, v in terms.items()}
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["psnr"] = losses.psnr(reconstruction, images)
    metrics.update(
      {f"codebook/{k}": v for k, v in losses.codebook_stats(ids, self.config.codebook_size).items()}
    )
    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    if with_gan:
      disc_params, disc_opt_state, metrics["loss/discriminator"] = gan.discriminator_step(
        self.disc, self.disc_optimizer, disc_params, disc_opt_state, images, reconstruction,
        self.weights.gan_loss, self.weights.r1_gamma,
      )  # fmt: skip
    counts = state.code_counts + jnp.bincount(ids.reshape(-1), length=self.config.codebook_size)
    state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      disc_params=disc_params,
      disc_opt_state=disc_opt_state,
      code_counts=counts,
    )
    return state, metrics

  def restart_dead_codes(self, state: TokenizerState, batch, rng: jax.Array):
    """Moves codes unused since the last restart onto current encoder outputs (of the
    batch's images and views).

    Outputs are drawn with probability proportional to their squared distance to the
    nearest code (k-means++ seeding), not uniformly: in images that are mostly flat
    background, uniform picks land on patches the codebook already serves and the
    restarted codes die again, while the rarer edge patches stay coarsely coded.
    """

    cfg = self.config
    images = self.images(batch)
    if self.views:
      images = jnp.concatenate([images, *(batch[v] for v in self.views if v)])

    def encode(module, x):
      z = module.encoder(x).reshape(-1, cfg.codebook_groups * cfg.code_dim)
      nearest = module.quantizer.embed(module.quantizer.lookup(z))
      z, nearest = (v.reshape(-1, cfg.codebook_groups, cfg.code_dim) for v in (z, nearest))
      if cfg.l2_normalize:
        z = model.l2_normalize(z)
      return z, jnp.sum((z - nearest) ** 2, axis=-1)

    # z [M, groups, code_dim]: a dead code of group g restarts on group g's sub-vectors.
    z, distance = self.model.apply({"params": state.params}, images, method=encode)
    per_group = cfg.codebook_size // cfg.codebook_groups
    group = jnp.arange(cfg.codebook_size) // per_group
    logits = jnp.log(jnp.maximum(distance, 1e-12)).T  # [groups, M]
    # One pick per code, [per_group, groups] drawn from each group's row of logits,
    # then laid out in code order (group after group).
    picks = jax.random.categorical(rng, logits, shape=(per_group, cfg.codebook_groups)).T
    picks = picks.reshape(-1)
    dead = state.code_counts == 0
    codebook = state.params["quantizer"]["codebook"]
    codebook = jnp.where(dead[:, None], z[picks, group], codebook)
    params = flax.core.copy(state.params, {"quantizer": {"codebook": codebook}})
    restarted = jnp.sum(dead)
    return state.replace(params=params, code_counts=jnp.zeros_like(state.code_counts)), restarted

  def eval_step(self, params, images):
    raw, ids, _ = self.model.apply({"params": params}, images)
    reconstruction = model.to_image(raw, self.config)
    counts = jnp.bincount(ids.reshape(-1), length=self.config.codebook_size)
    return losses.psnr(reconstruction, images), counts, reconstruction


def freeze_groups(optimizer: optax.GradientTransformation, frozen: Sequence[str]):
  """Zero updates for the top-level parameter groups in `frozen` (stage two)."""
  if not frozen:
    return optimizer

  def labels(params):
    return {
      name: jax.tree_util.tree_map(
        lambda _, label="frozen" if name in frozen else "trained": label, sub
      )
      for name, sub in params.items()
    }

  return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)
