"""Optimizers and learning-rate schedules, from optax."""

from __future__ import annotations

import dataclasses

import jax
import optax

from parti.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class AdamConfig:
  """Adam with linear warm-up, cosine decay and decoupled weight decay (ViT-VQGAN's).

  The paper: lr 1e-4, 50k warm-up steps, cosine to 5e-5, weight decay 1e-4,
  betas (0.9, 0.99).
  """

  learning_rate: float = 1e-4
  final_learning_rate: float = 5e-5
  warmup_steps: int = 50_000
  weight_decay: float = 1e-4
  b1: float = 0.9
  b2: float = 0.99
  clip_norm: float | None = None


def warmup_cosine(config: AdamConfig, total_steps: int) -> optax.Schedule:
  if config.warmup_steps >= total_steps:
    raise ConfigError(
      f"warmup_steps ({config.warmup_steps}) must be fewer than the total steps ({total_steps})."
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=config.learning_rate,
    warmup_steps=config.warmup_steps,
    decay_steps=total_steps,
    end_value=config.final_learning_rate,
  )


def _decay_mask(params):
  """Decay matrices only: not biases, norm scales or other vectors."""
  return jax.tree_util.tree_map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def adam(config: AdamConfig, total_steps: int) -> optax.GradientTransformation:
  """The optimizer of `config` over `total_steps`."""
  parts = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
  parts.append(
    optax.adamw(
      warmup_cosine(config, total_steps),
      b1=config.b1,
      b2=config.b2,
      weight_decay=config.weight_decay,
      mask=_decay_mask,
    )
  )
  return optax.chain(*parts)
