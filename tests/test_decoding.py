"""The KV-cached sampler: equal to naive decoding, per-request seeds and guidance, prefixes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import example_batch, forward, init_params, tiny_config

from parti.modeling.model import unstack_layers
from parti.sampling import decoding

CONFIG = tiny_config(image_grid=(3, 4), cfg_dropout_rate=0.1)


@pytest.fixture(scope="module")
def params_and_text():
  return init_params(CONFIG), jnp.asarray(example_batch(CONFIG, 4)["encoder_input_tokens"])


@functools.cache
def _sampler(**options):
  return jax.jit(functools.partial(decoding.sample, CONFIG, **options))


def sample(params, text, rng, **options):
  prefix = options.pop("prefix", None)
  scale = options.pop("guidance_scale", 1.0)
  if isinstance(scale, float):
    options["guidance_scale"] = scale
    return _sampler(**options)(params, text, rng, prefix=prefix)
  return _sampler(**options)(params, text, rng, prefix=prefix, guidance_scale=scale)


def test_greedy_cached_decoding_equals_naive_decoding(params_and_text):
  params, text = params_and_text
  tokens, _ = sample(params, text, jax.random.key(0), temperature=0.0)
  # Naive: rerun the full forward over everything decoded so far, for every position.
  naive = jnp.zeros((4, CONFIG.image_length), jnp.int32)
  for position in range(CONFIG.image_length):
    decoder_input = jnp.concatenate([jnp.full((4, 1), CONFIG.bos_id), naive[:, :-1]], axis=1)
    logits = forward(CONFIG, params, text, decoder_input)
    naive = naive.at[:, position].set(jnp.argmax(logits[:, position], -1))
  np.testing.assert_array_equal(tokens, naive)


def test_two_tokens_per_patch_sample_like_naive_decoding_each_in_its_group():
  # Greedy, with guidance: the cached sampler (which feeds one token per step, the
  # model holding it back until its patch is done) against rerunning the full
  # forward for every position; every token among its own group's codes.
  config = tiny_config(image_grid=(3, 4), cfg_dropout_rate=0.1, tokens_per_patch=2)
  params = init_params(config)
  text = jnp.asarray(example_batch(config, 4)["encoder_input_tokens"])
  tokens, _ = jax.jit(
    functools.partial(decoding.sample, config, temperature=0.0, guidance_scale=2.0)
  )(params, text, jax.random.key(0))
  null = jnp.zeros_like(text).at[:, 0].set(1)  # The empty prompt: EOS, then padding.
  naive = jnp.zeros((4, config.image_length), jnp.int32)
  for position in range(config.image_length):
    decoder_input = jnp.concatenate([jnp.full((4, 1), config.bos_id), naive[:, :-1]], axis=1)
    cond = forward(config, params, text, decoder_input)[:, position]
    uncond = forward(config, params, null, decoder_input)[:, position]
    naive = naive.at[:, position].set(jnp.argmax(uncond + 2.0 * (cond - uncond), -1))
  np.testing.assert_array_equal(tokens, naive)
  tokens = np.asarray(tokens)
  assert (tokens[:, 0::2] < 32).all() and (tokens[:, 1::2] >= 32).all()


def test_a_request_draws_the_same_image_alone_or_in_any_batch(params_and_text):
  params, text = params_and_text
  keys = jax.vmap(jax.random.key)(jnp.arange(4))
  together, _ = sample(params, text, keys, top_k=8)
  for row in (0, 3):
    alone, _ = sample(params, text[row : row + 1], keys[row : row + 1], top_k=8)
    np.testing.assert_array_equal(alone[0], together[row])
  reversed_batch, _ = sample(params, text[::-1], keys[::-1], top_k=8)
  np.testing.assert_array_equal(reversed_batch[::-1], together)
  other_seed, _ = sample(params, text, jax.vmap(jax.random.key)(jnp.arange(4) + 10), top_k=8)
  assert (other_seed != together).any()


def test_guidance_scale_per_request_equals_each_scale_alone(params_and_text):
  params, text = params_and_text
  text = text[:2]
  per_request, _ = sample(
    params, text, jax.random.key(0), temperature=0.0, guidance_scale=jnp.array([1.0, 3.0])
  )
  unguided, _ = sample(params, text[:1], jax.random.key(0), temperature=0.0, guidance_scale=1.0)
  guided, _ = sample(params, text[1:], jax.random.key(0), temperature=0.0, guidance_scale=3.0)
  np.testing.assert_array_equal(per_request[0], unguided[0])
  np.testing.assert_array_equal(per_request[1], guided[0])


def test_prefix_is_kept_and_continued_like_the_full_forward(params_and_text):
  params, text = params_and_text
  rows = 4  # The first row of the 3x4 grid is given.
  prefix = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.image_vocab_size, (4, rows)))
  tokens, log_probs = sample(params, text, jax.random.key(0), temperature=0.0, prefix=prefix)
  np.testing.assert_array_equal(tokens[:, :rows], prefix)
  decoder_input = jnp.concatenate([jnp.full((4, 1), CONFIG.bos_id), tokens[:, :-1]], axis=1)
  logits = forward(CONFIG, params, text, decoder_input)
  np.testing.assert_array_equal(jnp.argmax(logits, -1)[:, rows:], tokens[:, rows:])
  expected = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(log_probs, expected, atol=1e-5)
  with pytest.raises(ValueError, match="leaves nothing"):
    decoding.sample(CONFIG, params, text, jax.random.key(0), prefix=jnp.zeros((4, 12), jnp.int32))


def test_keys_must_be_one_or_one_per_example():
  assert decoding.example_keys(jax.random.key(0), 3).shape == (3,)
  with pytest.raises(ValueError, match="one key or 3 keys"):
    decoding.example_keys(jax.vmap(jax.random.key)(jnp.arange(2)), 3)


def test_unstacked_layers_compute_what_the_scanned_ones_do(params_and_text):
  params, text = params_and_text
  assert CONFIG.scan_layers
  unrolled, unrolled_config = unstack_layers(params, CONFIG)
  assert not unrolled_config.scan_layers and "layers_1" in unrolled["decoder"]
  image = jnp.asarray(example_batch(CONFIG, 4)["decoder_input_tokens"])
  np.testing.assert_allclose(
    forward(unrolled_config, unrolled, text, image),
    forward(CONFIG, params, text, image),
    rtol=1e-5,
    atol=1e-5,
  )


def test_kth_largest_equals_lax_top_k_with_ties_infinities_and_negatives():
  rng = np.random.default_rng(0)
  for trial in range(16):  # Each (n, k) compiles anew.
    n = int(rng.choice([2, 37, 512]))
    k = int(rng.integers(1, n + 1))
    x = rng.normal(size=(3, n)).astype(np.float32) * rng.choice([1e-3, 1.0, 1e4])
    if trial % 3 == 0:
      x = np.round(x)  # Ties.
    if trial % 4 == 1:
      x[:, : n // 3] = -np.inf  # Masked logits.
    if trial % 5 == 0:
      x = -np.abs(x)  # All negative.
    expected = jax.lax.top_k(jnp.asarray(x), k)[0][..., -1:]
    np.testing.assert_array_equal(decoding.kth_largest(jnp.asarray(x), k), expected)


def test_inverting_the_cdf_draws_each_token_with_its_probability():
  # 200k draws over 6 tokens, two of them masked: each frequency within 4.5 binomial
  # standard errors of its softmax probability, and the masked never drawn.
  logits = jnp.array([[2.0, -jnp.inf, 0.5, 1.0, -jnp.inf, -1.0]])
  draws = 200_000
  uniform = jax.random.uniform(jax.random.key(0), (draws,))
  tokens = decoding.invert_cdf(jnp.broadcast_to(logits, (draws, 6)), uniform)
  counts = np.bincount(np.asarray(tokens), minlength=6)
  expected = np.asarray(jax.nn.softmax(logits[0])) * draws
  assert counts[1] == counts[4] == 0
  tolerance = 4.5 * np.sqrt(expected * (1 - expected / draws)) + 1
  np.testing.assert_array_less(np.abs(counts - expected), tolerance)
  # The ends of [0, 1) land on the first and last token that can be drawn.
  edges = decoding.invert_cdf(jnp.concatenate([logits, logits]), jnp.array([0.0, 1 - 1e-7]))
  np.testing.assert_array_equal(edges, [0, 5])


def test_filter_logits_keeps_the_top_k_and_the_top_p_mass():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  top2 = decoding.filter_logits(logits, top_k=2)
  assert np.isfinite(top2).sum() == 2 and np.isfinite(top2[0, :2]).all()
  nucleus = decoding.filter_logits(logits, top_p=0.8)  # 0.5 + 0.2 < 0.8 <= + 0.15.
  np.testing.assert_array_equal(np.isfinite(nucleus[0]), [True, True, True, False, False])


@pytest.mark.parametrize(("known", "length"), [(0, 12), (4, 12), (0, 256), (17, 1024), (0, 2)])
def test_cache_windows_cover_every_step_with_the_entries_it_reads(known, length):
  windows = decoding.cache_windows(known, length)
  assert len(windows) <= decoding.MAX_CACHE_WINDOWS
  steps = [p for begin, end, _ in windows for p in range(begin, end)]
  assert steps == list(range(known, length - 1))
  for begin, end, window in windows:
    # A step at position p writes cache entry p + 1 and reads entries 0 .. p + 1.
    assert end + 1 == window <= length and begin < end
  assert [w for *_, w in windows] == sorted(w for *_, w in windows)


def test_windowed_cache_decodes_exactly_what_one_full_window_does(params_and_text, monkeypatch):
  params, text = params_and_text
  prefix = jnp.asarray(np.random.default_rng(1).integers(0, CONFIG.image_vocab_size, (4, 3)))

  def run(config=CONFIG, **options):
    return jax.jit(functools.partial(decoding.sample, config, **options))(
      params, text, jax.random.key(5), prefix=prefix
    )

  # Sampled with top-k and guidance: a token drawn from logits that a wrong window
  # changed at all would differ somewhere in the image.
  monkeypatch.setattr(decoding, "MAX_CACHE_WINDOWS", 1)
  full_tokens, full_log_probs = run(top_k=8, guidance_scale=2.0)
  monkeypatch.setattr(decoding, "MAX_CACHE_WINDOWS", 8)
  monkeypatch.setattr(decoding, "MIN_WINDOW_POSITIONS", 2)
  assert len(decoding.cache_windows(3, CONFIG.image_length)) == 4
  # The key caches as [batch, heads, head_dim, length] (what the Jacobi sampler uses)
  # are cut and written back along their own length axis.
  for config in (CONFIG, CONFIG.replace(transposed_key_cache=True)):
    tokens, log_probs = run(config, top_k=8, guidance_scale=2.0)
    np.testing.assert_array_equal(tokens, full_tokens)
    np.testing.assert_allclose(log_probs, full_log_probs, atol=1e-5)


def test_plausibility_keeps_the_codes_near_the_conditional_models_top_code():
  cond = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  uncond = jnp.log(jnp.array([[0.9, 0.09, 0.0099, 0.0001]]))
  doubled = jnp.concatenate([cond, uncond]) + 7.0  # Unnormalized logits work the same.
  guidance = decoding.Guidance(3.0, 1, plausibility=0.4)  # 0.3 / 0.5 kept, 0.15 / 0.5 not.
  plausible = guidance.plausible(doubled)
  np.testing.assert_array_equal(plausible, [[True, True, False, False]])
  guided = guidance.guide(doubled)
  # Guidance alone favours the code the conditional model finds least likely (its
  # ratio to the null condition is the largest); the constraint rules it out.
  assert int(jnp.argmax(guided)) == 3
  constrained = decoding.constrain(guided, plausible)
  np.testing.assert_array_equal(constrained[:, :2], guided[:, :2])
  assert np.all(np.isneginf(constrained[:, 2:]))
  assert decoding.Guidance(3.0, 1).plausible(doubled) is None
  for bad in (-0.1, 1.0):
    with pytest.raises(ValueError, match="plausibility"):
      decoding.Guidance(3.0, 1, plausibility=bad)


def test_plausibility_near_one_samples_the_conditional_models_greedy_tokens(params_and_text):
  params, text = params_and_text
  conditional_greedy, _ = sample(params, text, jax.random.key(0), temperature=0.0)
  guided_greedy, _ = sample(params, text, jax.random.key(0), temperature=0.0, guidance_scale=3.0)
  assert (guided_greedy != conditional_greedy).any()  # Guidance moves the argmax here...
  # ... but with only the conditional top code plausible, guided sampling draws it.
  tokens, _ = sample(params, text, jax.random.key(1), guidance_scale=3.0, plausibility=0.9999)
  np.testing.assert_array_equal(tokens, conditional_greedy)


def test_plausibility_filters_sampling_but_not_the_returned_log_probs(params_and_text):
  params, text = params_and_text
  # At λ = 1 the greedy code is always plausible: the tokens cannot change, and the
  # log-probs stay those of the unconstrained model (as with top-k), not renormalized.
  plain = sample(params, text, jax.random.key(0), temperature=0.0)
  filtered = sample(params, text, jax.random.key(0), temperature=0.0, plausibility=0.5)
  np.testing.assert_array_equal(filtered[0], plain[0])
  np.testing.assert_allclose(filtered[1], plain[1], rtol=1e-6)
  # A prefix the constraint would rule out still scores finitely.
  prefix = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.image_vocab_size, (4, 4)))
  _, log_probs = sample(params, text, jax.random.key(0), plausibility=0.9, prefix=prefix)
  assert np.all(np.isfinite(log_probs))
