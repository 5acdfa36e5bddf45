"""The contrastive dual encoder's training state and jitted steps (`parti.train_contrastive`
drives them through `parti.training.loop`)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from parti import partitioning
from parti.modeling.contrastive import ContrastiveConfig, DualEncoder, contrastive_loss


@flax.struct.dataclass
class ContrastiveState:
  step: jax.Array
  params: Any
  opt_state: Any


class ContrastiveTrainer:
  """The jitted steps of one configuration; `train_contrastive` drives them."""

  def __init__(self, config: ContrastiveConfig, optimizer: optax.GradientTransformation):
    self.config = config
    self.model = DualEncoder(config)
    self.optimizer = optimizer

  def init(self, seed: int) -> ContrastiveState:
    """The initial state, with boxed leaves (for `partitioning.init_sharded`)."""
    cfg = self.config
    params = self.model.init(
      jax.random.key(seed),
      jnp.ones((1, cfg.text_length), jnp.int32),
      jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32),
    )["params"]
    opt_state = self.optimizer.init(nn.meta.unbox(params))
    return ContrastiveState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=partitioning.box_optimizer_state(self.optimizer, opt_state, params),
    )

  def loss(self, params, batch):
    text, image, scale = self.model.apply(
      {"params": params}, batch["encoder_input_tokens"], batch["images"]
    )
    return contrastive_loss(text, image, scale)

  def train_step(self, state: ContrastiveState, batch) -> tuple[ContrastiveState, dict]:
    (_, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(state.params, batch)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return ContrastiveState(state.step + 1, params, opt_state), metrics

  def eval_step(self, params, batch) -> dict:
    return self.loss(params, batch)[1]
