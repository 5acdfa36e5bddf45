"""Optimizers and learning-rate schedules, from optax.

`AdamConfig` / `adam` train the tokenizer (ViT-VQGAN's recipe); `AdafactorConfig` /
`adafactor` train the Parti transformer (Parti's recipe). Small Parti runs may take
Adam instead (`build` gives either with its schedule): at CPU scale it learns the
text-to-image mapping several times faster than Adafactor's absolute steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from parti.runtime.errors import ConfigError
from parti.runtime.validation import check_types


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

  def __post_init__(self):
    check_types(self)


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


# --- Parti's optimizer ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdafactorConfig:
  """Adafactor with momentum, as Parti trains (Yu et al. 2022, section 5.1).

  The paper: beta1 0.9, beta2 0.96, decoupled weight decay 4.5e-2, first moments
  quantized to int8; lr 4.5e-5 after 5k warm-up steps, decayed exponentially from
  step 85k to 0.025 of its peak at step 450k; gradients clipped to global norm 4.

  Attributes:
    learning_rate: peak learning rate.
    warmup_steps: linear warm-up from 0.
    decay_start: step at which exponential decay begins (constant before).
    decay_end: step at which the rate reaches `final_ratio` of the peak (then stays).
    final_ratio: the final rate as a fraction of the peak.
    b1: momentum (None: Adafactor without a first moment).
    b2: decay of the factored second-moment estimate (fixed, not step-dependent).
    weight_decay: decoupled weight decay (scaled by the learning rate), on matrices only.
    clip_norm: global gradient-norm clipping (None: off).
    quantize_momentum: store the first moment as int8 with per-row float32 scales.
    multiply_by_parameter_scale: Adafactor's relative step size (off in Parti,
      which uses an absolute learning rate).
  """

  learning_rate: float = 4.5e-5
  warmup_steps: int = 5_000
  decay_start: int = 85_000
  decay_end: int = 450_000
  final_ratio: float = 0.025
  b1: float | None = 0.9
  b2: float = 0.96
  weight_decay: float = 4.5e-2
  clip_norm: float | None = 4.0
  quantize_momentum: bool = True
  multiply_by_parameter_scale: bool = False

  def __post_init__(self):
    check_types(self)
    if not 0 <= self.warmup_steps <= self.decay_start <= self.decay_end:
      raise ConfigError(
        "AdafactorConfig needs 0 <= warmup_steps <= decay_start <= decay_end, got "
        f"{self.warmup_steps}, {self.decay_start}, {self.decay_end}."
      )
    if not 0 < self.final_ratio <= 1:
      raise ConfigError(f"AdafactorConfig.final_ratio must be in (0, 1], got {self.final_ratio}.")
    if self.learning_rate <= 0:
      raise ConfigError(
        f"AdafactorConfig.learning_rate must be positive, got {self.learning_rate}."
      )


def warmup_exponential(config: AdafactorConfig) -> optax.Schedule:
  """Linear warm-up, constant until `decay_start`, then exponential decay to the final ratio."""
  peak = config.learning_rate
  warmup = optax.linear_schedule(0.0, peak, max(config.warmup_steps, 1))
  decay = optax.exponential_decay(
    peak,
    transition_steps=max(config.decay_end - config.decay_start, 1),
    decay_rate=config.final_ratio,
    transition_begin=config.decay_start - config.warmup_steps,
    end_value=peak * config.final_ratio,
  )
  return optax.join_schedules([warmup, decay], [config.warmup_steps])


class QuantizedTraceState(NamedTuple):
  values: Any  # int8, the momentum divided by its per-row scale
  scales: Any  # float32, one per row (the last axis is reduced)


def _quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0 if x.ndim else jnp.abs(x) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0).astype(jnp.float32)
  return jnp.round(x / scale).astype(jnp.int8), scale


def quantized_trace(decay: float) -> optax.GradientTransformation:
  """Momentum (`optax.trace`) whose state is int8 with per-row float32 scales.

  Written here because optax's `trace` keeps its accumulator in a float dtype
  (at best bfloat16); Parti stores first moments in int8 to save memory. Rounding
  is to the nearest level of each row's absmax / 127.
  """

  def init(params):
    # What `_quantize` makes of zeros, written out: quantizing a constant would have
    # XLA fold every row's absmax at compile time (seconds per large parameter).
    values = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.int8), params)
    scales = jax.tree_util.tree_map(
      lambda p: jnp.ones((*p.shape[:-1], 1) if p.ndim else (), jnp.float32), params
    )
    return QuantizedTraceState(values, scales)

  def update(updates, state, params=None):
    del params
    previous = jax.tree_util.tree_map(
      lambda v, s: v.astype(jnp.float32) * s, state.values, state.scales
    )
    momentum = jax.tree_util.tree_map(lambda g, m: g + decay * m, updates, previous)
    values, scales = _split(jax.tree_util.tree_map(_quantize, momentum), momentum)
    return momentum, QuantizedTraceState(values, scales)

  return optax.GradientTransformation(init, update)


def _split(pairs, like):
  """A tree of (values, scales) pairs shaped like `like` -> (values tree, scales tree)."""
  treedef = jax.tree_util.tree_structure(like)
  leaves = treedef.flatten_up_to(pairs)
  return (
    treedef.unflatten([v for v, _ in leaves]),
    treedef.unflatten([s for _, s in leaves]),
  )


def adafactor(config: AdafactorConfig) -> optax.GradientTransformation:
  """Parti's optimizer: clipping, factored second moments, (int8) momentum, decay, lr."""
  parts = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
  parts += [
    optax.scale_by_factored_rms(
      decay_rate=config.b2, decay_rate_fn=lambda step, rate: jnp.asarray(rate, jnp.float32)
    ),
    optax.clip_by_block_rms(1.0),  # Adafactor's update clipping.
  ]
  if config.multiply_by_parameter_scale:
    parts.append(optax.scale_by_param_block_rms())
  if config.b1 is not None:
    parts.append(quantized_trace(config.b1) if config.quantize_momentum else optax.trace(config.b1))
  if config.weight_decay:
    parts.append(optax.add_decayed_weights(config.weight_decay, mask=_decay_mask))
  parts.append(optax.scale_by_learning_rate(warmup_exponential(config)))
  return optax.chain(*parts)


def build(
  config: AdafactorConfig | AdamConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer of either config, and its learning-rate schedule (for logging)."""
  if isinstance(config, AdamConfig):
    return adam(config, total_steps), warmup_cosine(config, total_steps)
  if isinstance(config, AdafactorConfig):
    return adafactor(config), warmup_exponential(config)
  raise ConfigError(f"Unknown optimizer config {config!r}: use AdafactorConfig or AdamConfig.")
