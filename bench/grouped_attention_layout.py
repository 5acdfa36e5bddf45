"""Grouped-query attention's logits layout: forward and backward of one attention core at
the matched shape (batch 16, 256 positions, 4 query heads sharing 1 key and value head of
64, causal), the variants interleaved in one process, each the best of its rounds.

    python bench/grouped_attention_layout.py [--rounds=6]

  query_major  logits [batch, kv_heads, group, q, k]: the query transposed to put each
               group's heads before its positions (the first version)
  ours         logits [batch, kv_heads, q, group, k] (`layers.dot_product_attention`):
               with one key head the query and the output are only reshaped
  repeated     the key and value heads repeated to every query head (plain multi-head)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import timing
from absl import app, flags

from parti.modeling import layers

_ROUNDS = flags.DEFINE_integer("rounds", 6, "Interleaved rounds; each variant's best is kept.")

BATCH, LENGTH, HEADS, KV_HEADS, DEPTH = 16, 256, 4, 1, 64


def query_major(query, key, value, mask):
  group = HEADS // KV_HEADS
  grouped = query.reshape(BATCH, LENGTH, KV_HEADS, group, DEPTH)
  logits = jnp.einsum("bqgrd,bkgd->bgrqk", grouped, key) / np.sqrt(DEPTH)
  logits = logits.reshape(BATCH, HEADS, LENGTH, LENGTH)
  weights = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
  weights = weights.reshape(BATCH, KV_HEADS, group, LENGTH, LENGTH)
  return jnp.einsum("bgrqk,bkgd->bqgrd", weights, value).reshape(BATCH, LENGTH, HEADS, DEPTH)


def ours(query, key, value, mask):
  return layers.dot_product_attention(query, key, value, mask, None, 0.0, True, None)


def repeated(query, key, value, mask):
  group = HEADS // KV_HEADS
  key, value = jnp.repeat(key, group, 2), jnp.repeat(value, group, 2)
  return layers.dot_product_attention(query, key, value, mask, None, 0.0, True, None)


def main(argv):
  del argv
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (BATCH, LENGTH, HEADS, DEPTH))
  k, v = (jax.random.normal(x, (BATCH, LENGTH, KV_HEADS, DEPTH)) for x in keys[1:])
  mask = jnp.tril(jnp.ones((LENGTH, LENGTH), bool))[None, None]
  variants = {"query_major": query_major, "ours": ours, "repeated": repeated}
  reference = jax.jit(ours)(q, k, v, mask)
  steps = {}
  for name, attend in variants.items():
    np.testing.assert_allclose(jax.jit(attend)(q, k, v, mask), reference, atol=1e-4)
    loss = lambda q, k, v, attend=attend: jnp.sum(attend(q, k, v, mask) ** 2)  # noqa: E731
    steps[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  best = dict.fromkeys(variants, float("inf"))
  for _ in range(_ROUNDS.value):
    for name, step in steps.items():
      best[name] = min(best[name], timing.best_time(step, q, k, v, repeats=5))
  print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}")
  for name, seconds in best.items():
    print(f"{name:12s} {seconds * 1e3:7.1f} ms forward + backward")


if __name__ == "__main__":
  app.run(main)
