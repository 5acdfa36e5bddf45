"""Autoregressive sampling of image tokens with the KV cache, and classifier-free guidance.

    tokens = decoding.sample(config, params, text_tokens, rng, guidance_scale=3.0, top_k=...)

One encoder pass; a one-token prefill (BOS) that fills the cross-attention cache;
then a `lax.scan` of single-token decoder steps, each reading and extending the
cache. With guidance, the conditional and unconditional (null-condition) halves
run as one doubled batch and their logits are combined before sampling:
`uncond + scale * (cond - uncond)` (scale 1 is plain conditional sampling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from parti.config import PartiConfig
from parti.model import Parti


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Masks all but the top-k logits and the smallest set whose mass exceeds top_p."""
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep tokens until (and including) the first that pushes the mass past top_p.
    cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def sample(
  config: PartiConfig,
  params,
  encoder_input_tokens: jax.Array,
  rng: jax.Array,
  *,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  guidance_scale: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """Samples image tokens [B, image_length] and their log-probabilities under the model.

  Jittable (all options are static Python values). temperature 0 decodes greedily.
  The returned log-probabilities are of the sampled tokens under the guided,
  temperature-free distribution.
  """
  model = Parti(config)
  batch = encoder_input_tokens.shape[0]
  guided = guidance_scale != 1.0
  null = jnp.arange(2 * batch) >= batch if guided else None
  tokens = (
    jnp.concatenate([encoder_input_tokens, encoder_input_tokens])
    if guided
    else encoder_input_tokens
  )
  encoded, mask = model.apply({"params": params}, tokens, null=null, method=Parti.encode)
  bos = jnp.full((tokens.shape[0], 1), config.bos_id, jnp.int32)
  logits, variables = model.apply(
    {"params": params}, bos, encoded, mask, decode=True, method=Parti.decode, mutable=["cache"]
  )

  def guide(logits):
    logits = logits[:, -1].astype(jnp.float32)
    if guided:
      cond, uncond = logits[:batch], logits[batch:]
      logits = uncond + guidance_scale * (cond - uncond)
    return logits

  def choose(logits, key):
    if temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits / temperature, top_k, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

  def step(carry, key):
    cache, logits = carry
    guided_logits = guide(logits)
    token = choose(guided_logits, key)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(guided_logits), token[:, None], -1)[:, 0]
    feed = jnp.concatenate([token, token]) if guided else token
    logits, updated = model.apply(
      {"params": params, "cache": cache}, feed[:, None], None, mask, decode=True,
      method=Parti.decode, mutable=["cache"],
    )  # fmt: skip
    return (updated["cache"], logits), (token, log_prob)

  keys = jax.random.split(rng, config.image_length)
  # BOS plus image_length - 1 fed tokens fill the cache; the last token is only chosen.
  (_, last_logits), (tokens_out, log_probs) = jax.lax.scan(
    step, (variables["cache"], logits), keys[:-1]
  )
  final_logits = guide(last_logits)
  final = choose(final_logits, keys[-1])
  final_log_prob = jnp.take_along_axis(jax.nn.log_softmax(final_logits), final[:, None], -1)[:, 0]
  tokens_out = jnp.concatenate([tokens_out.T, final[:, None]], axis=1)
  log_probs = jnp.concatenate([log_probs.T, final_log_prob[:, None]], axis=1)
  return tokens_out, log_probs
