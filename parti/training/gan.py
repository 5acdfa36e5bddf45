"""What the GAN-trained image models (the tokenizer, the upsampler) share: the
discriminator's update, and a step compiled with and without the adversarial terms."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from parti.tokenizer import losses


def discriminator_step(disc, optimizer, params, opt_state, real, fake, kind: str, r1_gamma: float):
  """One update of discriminator `disc` (a Flax module) on real images and generated
  ones (their gradient stopped): (params, opt_state, loss)."""

  def objective(p):
    discriminate = lambda x: disc.apply({"params": p}, x)  # noqa: E731
    return losses.discriminator_objective(
      discriminate, real, jax.lax.stop_gradient(fake), kind, r1_gamma
    )

  loss, grads = jax.value_and_grad(objective)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def gan_schedule_step(
  train_step: Callable,
  gan_start: int | None,
  state_shardings,
  batch_shardings,
  replicated,
  perceptual_weights=None,
) -> Callable:
  """(step, state, batch) -> (state, metrics) for GAN-trained models (the tokenizer, the
  upsampler): `train_step(state, batch, with_gan, perceptual_weights)` compiled twice,
  without the adversarial terms before step `gan_start` and with them from it (None:
  never), each jitted with the state donated.

  `perceptual_weights` (VGG16's, replicated; None: no perceptual loss) go in as an
  argument of every call, not as constants of the program: closed over, their 59 MB
  would be embedded in the compiled step and hashed into and stored with its
  compilation-cache entry (24 s more to compile the tokenizer's tiny test step).
  """

  def jit_step(with_gan: bool):
    return jax.jit(
      lambda state, batch, frozen: train_step(state, batch, with_gan, frozen),
      in_shardings=(state_shardings, batch_shardings, replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0,
    )

  steps = {False: jit_step(False), True: jit_step(True)}

  def step_fn(step: int, state, batch):
    return steps[gan_start is not None and step >= gan_start](state, batch, perceptual_weights)

  return step_fn
