"""The cross-entropy: its hand-written gradient equals autodiff of the textbook formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from parti.training import losses


def _reference(logits, targets, weights, label_smoothing, z_loss):
  """Cross-entropy against smoothed one-hot targets, through autodiff of log_softmax."""
  vocab = logits.shape[-1]
  confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
  soft = jax.nn.one_hot(targets, vocab) * (confidence - low) + low
  loss = optax.softmax_cross_entropy(logits, soft)
  if label_smoothing:
    loss -= -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
  log_z = jax.nn.logsumexp(logits, axis=-1)
  return jnp.sum((loss + z_loss * log_z**2) * weights)


@pytest.mark.parametrize(("label_smoothing", "z_loss"), [(0.0, 0.0), (0.0, 1e-4), (0.1, 1e-2)])
def test_loss_and_gradient_match_autodiff_of_the_formula(label_smoothing, z_loss):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((3, 5, 40)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 40, (3, 5)), jnp.int32)
  weights = jnp.asarray(rng.integers(0, 2, (3, 5)), jnp.float32)

  def ours(x):
    return losses.cross_entropy(x, targets, weights, label_smoothing, z_loss)["loss"]

  def reference(x):
    return _reference(x, targets, weights, label_smoothing, z_loss)

  np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-5)
  np.testing.assert_allclose(
    jax.grad(ours)(logits), jax.grad(reference)(logits), rtol=1e-4, atol=1e-6
  )


def test_metrics_count_hits_and_plain_nll():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.standard_normal((4, 6, 30)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 30, (4, 6)), jnp.int32)
  targets = targets.at[0].set(jnp.argmax(logits[0], -1))  # A row of certain hits.
  weights = jnp.ones((4, 6))
  sums = losses.cross_entropy(logits, targets, weights, label_smoothing=0.2, z_loss=1e-3)
  hits = jnp.sum(jnp.argmax(logits, -1) == targets)
  assert int(sums["correct"]) == int(hits) >= 6
  nll = -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
  np.testing.assert_allclose(sums["nll"], nll, rtol=1e-5)
  assert sums["weight_sum"] == 24
