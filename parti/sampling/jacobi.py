"""Speculative Jacobi decoding (SJD; Teng et al. 2024): several image tokens per decoder call.

The standard sampler (`decoding.sample`) calls the decoder once per token. Here each
call feeds a window of W draft tokens after the committed ones and gets the model's
distribution at all W positions at once. The drafts are then verified left to right
with speculative sampling's rule: the draft x at a position, drawn from q, is kept with
probability min(1, p(x) / q(x)), where p is the distribution this call computed there;
at the first rejection a token is drawn from max(p - q, 0), normalized, and the rest of
the window is discarded. Every draft before a kept one was kept, so each p used is the
model's exact conditional, and each committed token is an exact sample of the guided,
filtered model: the same distribution as the standard sampler's. The positions after
the last committed one are drafted again from this call's p (a Jacobi update: p there
was conditioned on the old drafts), so drafts converge as the prefix settles; new
positions at the window's end are drafted from the last position's p. No draft model
is needed, and every call commits at least one token.

The KV cache is overwritten, not copied back: a call writes W entries from the first
uncommitted position, then the cache's write index (and the decoder's position
counter) is set back to just after the committed tokens, so the next call overwrites
the discarded entries before anything reads them. The self-attention caches are
padded by W entries so that a window that runs past the image's last position still
writes where nothing committed lies.

A batch advances together: its examples commit the smallest count any of them
accepted. Cutting an example's accepted run short keeps it exact (the cut tokens are
drafted again and re-verified), but batches commit fewer tokens per call than
single examples do.

With temperature 0 the distributions are one-hot at the argmax, and the rule keeps a
draft exactly when it is the argmax: the tokens equal greedy decoding's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from parti.modeling.config import PartiConfig
from parti.modeling.model import Parti, unstack_layers
from parti.runtime.errors import ConfigError
from parti.sampling import decoding


def sample(
  config: PartiConfig,
  params,
  encoder_input_tokens: jax.Array,
  rng: jax.Array,
  *,
  window: int = 16,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  guidance_scale: float | jax.Array = 1.0,
  plausibility: float = 0.0,
  prefix: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Samples image tokens with speculative Jacobi decoding; `decoding.sample`'s arguments.

  Args:
    config: the model.
    params: its parameters.
    encoder_input_tokens: text tokens [B, T] (0 = padding).
    rng: a key, or one key per example [B].
    window: draft tokens per decoder call (static). 1 is the standard sampler's
      one token per call; longer than the image's free tokens is cut to them.
    temperature: sampling temperature; 0 decodes greedily.
    top_k: sample among the k likeliest codes (0: all).
    top_p: sample among the likeliest codes holding this much mass (1: all).
    guidance_scale: classifier-free guidance, a float or one per example [B].
    plausibility: the plausibility constraint on guided codes (see `decoding.Guidance`).
    prefix: image tokens [B, k] to continue from.

  Returns:
    (tokens [B, image_length], log_probs [B, image_length], calls): as
    `decoding.sample`, and the decoder calls made after the prefill (the standard
    sampler makes image_length - 1 - len(prefix)).
  """
  if window < 1:
    raise ValueError(f"The Jacobi window must be at least 1 token, got {window}.")
  if config.tokens_per_patch > 1:
    # Its calls feed draft windows and then rewind the cache to the accepted ones; the
    # patch-shifted decoder keeps its last fed tokens in the cache too, and rewinding
    # those is not written.
    raise ConfigError(
      f"Jacobi decoding does not support tokens_per_patch {config.tokens_per_patch}: "
      "sample with the standard sampler (decoding.sample)."
    )
  params, config = unstack_layers(params, config)
  # Each call feeds a window of positions, where the transposed key layout is the
  # faster one on XLA:CPU (`layers.dot_product_attention`): on the trained tiny model
  # at batch 1, a call at a window of 4 / 8 went from 0.43 / 0.57 ms to 0.37 / 0.55 ms
  # (both layouts in one process, interleaved).
  config = config.replace(transposed_key_cache=True)
  model = Parti(config)
  batch, length = encoder_input_tokens.shape[0], config.image_length
  guidance = decoding.Guidance(guidance_scale, batch, plausibility)
  known = 0 if prefix is None else prefix.shape[1]
  if known >= length:
    raise ValueError(f"A prefix of {known} tokens leaves nothing of {length}.")
  # A longer window would only draft past the end (the prefill gives the first token).
  window = max(1, min(window, length - known - 1))
  # One key per example for the first drafts, and one folded with each call's count.
  split = jax.vmap(jax.random.split)(decoding.example_keys(rng, batch))
  first_keys, keys = split[:, 0], split[:, 1]

  def distribution(logits, plausible):
    """The sampling distribution of guided logits [..., V]: one-hot at temperature 0."""
    logits = decoding.constrain(logits, plausible)
    if temperature == 0:
      return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(decoding.filter_logits(logits / temperature, top_k, top_p), -1)

  mask, first, prefill, plausible, cache = decoding.prefill_cache(
    model, params, guidance, encoder_input_tokens, prefix
  )
  # The prefill's last position is the exact distribution of the first free token:
  # drawn here, as the standard sampler draws it, it is committed without a call.
  first_probs = distribution(prefill[:, -1], None if plausible is None else plausible[:, -1])
  uniforms = jax.vmap(lambda key: jax.random.uniform(key, (window + 1,)))(first_keys)
  first_token = decoding.draw(first_probs, uniforms[:, 0])
  tokens = jnp.zeros((batch, length + window), jnp.int32)
  log_probs = jnp.zeros((batch, length + window), jnp.float32)
  committed_tokens = jnp.concatenate([first[:, 1:], first_token[:, None]], 1)  # Prefix, first.
  tokens = tokens.at[:, : known + 1].set(committed_tokens)
  log_probs = log_probs.at[:, : known + 1].set(decoding.log_prob(prefill, committed_tokens))
  # The first drafts: no better guess yet than the same distribution, one position on.
  first_draft = jnp.broadcast_to(first_probs[:, None], (batch, window, config.image_vocab_size))
  drafts = decoding.draw(first_draft, uniforms[:, 1:])
  cache = decoding.resize_self_cache(
    cache, length + window, keys_transposed=config.transposed_key_cache
  )

  def iteration(state):
    cache, tokens, log_probs, drafts, draft_probs, committed, calls = state
    previous = jax.lax.dynamic_slice_in_dim(tokens, committed - 1, 1, axis=1)
    inputs = jnp.concatenate([previous, drafts[:, :-1]], axis=1)
    logits, updated = model.apply(
      {"params": params, "cache": cache}, guidance.doubled(inputs), None, mask,
      use_cache=True, method=Parti.decode, mutable=["cache"],
    )  # fmt: skip
    guided = guidance.guide(logits)  # [B, W, V]: the model at positions committed + j.
    probs = distribution(guided, guidance.plausible(logits))
    step_keys = jax.vmap(lambda key: jax.random.fold_in(key, calls))(keys)
    accept_u, resample_u, redraft_u = jnp.moveaxis(
      jax.vmap(lambda key: jax.random.uniform(key, (3, window)))(step_keys), 1, 0
    )
    p_draft = jnp.take_along_axis(probs, drafts[..., None], -1)[..., 0]
    q_draft = jnp.take_along_axis(draft_probs, drafts[..., None], -1)[..., 0]
    kept = accept_u * q_draft < p_draft  # u < p / q, without dividing by a zero q.
    accepted = jnp.sum(jnp.cumprod(kept, axis=1), axis=1)  # Leading kept drafts, [B].
    # The batch commits what its least lucky example can: its kept drafts and one more.
    count = jnp.minimum(jnp.min(jnp.minimum(accepted + 1, window)), length - committed)
    residual = jnp.maximum(probs - draft_probs, 0.0)
    resampled = decoding.draw(residual, resample_u)
    positions = jnp.arange(window)
    new = jnp.where(positions[None] < accepted[:, None], drafts, resampled)
    take = positions < count
    tokens = _write(tokens, new, committed, take)
    log_probs = _write(log_probs, decoding.log_prob(guided, new), committed, take)
    # Redraft the positions after the committed ones from this call's distributions;
    # the window's new tail starts from its last position's.
    shifted = jnp.clip(positions + count, 0, window - 1)
    next_probs = jnp.take_along_axis(probs, shifted[None, :, None], axis=1)
    next_drafts = decoding.draw(next_probs, redraft_u)
    cache = _set_write_position(updated["cache"], committed + count)
    return cache, tokens, log_probs, next_drafts, next_probs, committed + count, calls + 1

  state = (cache, tokens, log_probs, drafts, first_draft, jnp.int32(known + 1), jnp.int32(0))
  *_, tokens, log_probs, _, _, _, calls = jax.lax.while_loop(
    lambda state: state[5] < length, iteration, state
  )
  return tokens[:, :length], log_probs[:, :length], calls


def _write(array: jax.Array, values: jax.Array, start: jax.Array, take: jax.Array) -> jax.Array:
  """`array` [B, N] with values [B, W] written from column `start` where `take` [W]."""
  current = jax.lax.dynamic_slice_in_dim(array, start, values.shape[1], axis=1)
  return jax.lax.dynamic_update_slice_in_dim(
    array, jnp.where(take[None], values, current), start, axis=1
  )


def _set_write_position(cache, position: jax.Array | int):
  """The cache with every write index and position counter set to `position`."""

  def reset(path, leaf):
    name = getattr(path[-1], "key", "")
    if name in ("cache_index", "position"):
      return jnp.asarray(position, leaf.dtype)
    return leaf

  return jax.tree_util.tree_map_with_path(reset, cache)
