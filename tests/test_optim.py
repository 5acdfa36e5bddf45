"""Parti's optimizer: the learning-rate schedule, int8 momentum, clipping and decay masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from parti.runtime.errors import ConfigError
from parti.training import optim

PARTI = optim.AdafactorConfig()  # The paper's recipe is the default.


def test_schedule_warms_up_holds_then_decays_to_the_final_ratio():
  schedule = optim.warmup_exponential(PARTI)
  peak = PARTI.learning_rate
  assert float(schedule(0)) == 0.0
  assert float(schedule(2500)) == pytest.approx(peak / 2, rel=1e-6)
  assert float(schedule(5000)) == pytest.approx(peak, rel=1e-6)
  assert float(schedule(85_000)) == pytest.approx(peak, rel=1e-6)
  middle = float(schedule((85_000 + 450_000) // 2))
  assert middle == pytest.approx(peak * PARTI.final_ratio**0.5, rel=1e-3)  # Exponential.
  assert float(schedule(450_000)) == pytest.approx(peak * PARTI.final_ratio, rel=1e-5)
  assert float(schedule(900_000)) == pytest.approx(peak * PARTI.final_ratio, rel=1e-5)


def test_int8_momentum_tracks_float_momentum():
  params = {"w": jnp.zeros((16, 32)), "b": jnp.zeros((32,)), "s": jnp.zeros(())}
  quantized, exact = optim.quantized_trace(0.9), optax.trace(0.9)
  q_state, e_state = quantized.init(params), exact.init(params)
  assert q_state.values["w"].dtype == jnp.int8 and q_state.scales["w"].shape == (16, 1)
  rng = np.random.default_rng(0)
  for _ in range(20):
    grads = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params
    )
    q_out, q_state = quantized.update(grads, q_state)
    e_out, e_state = exact.update(grads, e_state)
  for name in params:
    error = np.abs(np.asarray(q_out[name]) - np.asarray(e_out[name])).max()
    # Each step rounds to 1/254 of a row's absmax; errors decay geometrically.
    assert error < 0.05 * np.abs(np.asarray(e_out[name])).max(), name


def test_int8_momentum_starts_at_zero_like_quantized_zeros():
  params = {"w": jnp.ones((3, 5)), "s": jnp.ones(())}
  state = optim.quantized_trace(0.9).init(params)
  for name, p in params.items():
    values, scale = optim._quantize(jnp.zeros_like(p))
    np.testing.assert_array_equal(state.values[name], values)
    np.testing.assert_array_equal(state.scales[name], scale)


def test_weight_decay_shrinks_matrices_but_not_vectors():
  config = optim.AdafactorConfig(
    learning_rate=0.1, warmup_steps=0, decay_start=0, decay_end=0, b1=None, weight_decay=0.5
  )
  optimizer = optim.adafactor(config)
  params = {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}
  zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
  # With no gradient, only decoupled weight decay moves a parameter: -lr * wd * p.
  np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((4, 4)), rtol=1e-6)
  np.testing.assert_array_equal(updates["bias"], np.zeros(4))


@pytest.mark.parametrize(
  ("fields", "message"),
  [
    (dict(warmup_steps=10, decay_start=5), "warmup_steps <= decay_start"),
    (dict(final_ratio=0.0), "final_ratio"),
    (dict(learning_rate=-1.0), "learning_rate"),
  ],
)
def test_bad_optimizer_configs_are_refused(fields, message):
  with pytest.raises(ConfigError, match=message):
    optim.AdafactorConfig(**fields)
