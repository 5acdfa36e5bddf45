"""The token-level objective: weighted cross-entropy with label smoothing and z-loss.

The same functions serve the train job, eval and the t5x-style model API, so that
every path reports the same numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(
  logits: jax.Array,
  targets: jax.Array,
  weights: jax.Array,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
) -> dict[str, jax.Array]:
  """Sums over the weighted positions; divide by `weight_sum` for means.

  Args:
    logits: float32 [..., vocab].
    targets: int [...].
    weights: [...], 0 for positions that do not count.
    label_smoothing: mass spread uniformly over the other classes.
    z_loss: weight of log(Z)^2, which keeps the softmax normalizer near 1 (PaLM).

  Returns:
    loss (cross-entropy plus z-loss), z_loss, nll (plain negative log-likelihood,
    what perplexity and scoring use), correct (argmax hits) and weight_sum, each
    summed over positions.
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - target_logit
  if label_smoothing:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    soft = jax.nn.one_hot(targets, vocab) * (confidence - low) + low
    loss = optax.softmax_cross_entropy(logits, soft)
    # Subtract the entropy of the smoothed targets so a perfect model scores 0.
    loss -= -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
  else:
    loss = nll
  z_term = z_loss * jnp.square(log_z)
  return {
    "loss": jnp.sum((loss + z_term) * weights),
    "z_loss": jnp.sum(z_term * weights),
    "nll": jnp.sum(nll * weights),
    "correct": jnp.sum((jnp.argmax(logits, -1) == targets) * weights),
    "weight_sum": jnp.sum(weights),
  }
