"""The Parti transformer: sizes, KV-cached decoding, guidance dropout, sharding, precision."""

from __future__ import annotations

import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import MESH_LAYOUTS, REPO_ROOT, example_batch, forward, init_params, tiny_config

from parti import partitioning
from parti.modeling import flops, layers
from parti.modeling.config import PartiConfig
from parti.modeling.model import (
  Parti,
  embeddings_from_codebook,
  relative_position_bucket,
  with_image_embeddings,
)
from parti.runtime import gin_utils
from parti.runtime.errors import ConfigError
from parti.training import optim
from parti.training.trainer import PartiTrainer

# Compiling dominates these tests on CPU, so jitted functions and parameters are
# cached per (hashable, frozen) config and shared between tests.


# --- Configuration ----------------------------------------------------------------------------

MODEL_FILES = sorted((REPO_ROOT / "gin" / "models").glob("parti_*.gin"))
PAPER_FILES = [p for p in MODEL_FILES if re.fullmatch(r"parti_\d+[mb]", p.stem)]


def _config_from_gin(path) -> PartiConfig:
  import parti.train  # noqa: F401  (registers parti.PartiConfig)

  gin.clear_config()
  try:
    gin_utils.parse([str(path)], [])
    return gin.query_parameter("%MODEL").scoped_configurable_fn()
  finally:
    gin.clear_config()


def _parameter_count(config: PartiConfig) -> int:
  batch = {
    "tokens": jax.ShapeDtypeStruct((1, config.text_length), jnp.int32),
    "image": jax.ShapeDtypeStruct((1, config.image_length), jnp.int32),
  }
  shapes = jax.eval_shape(
    lambda: Parti(config).init(jax.random.key(0), jnp.zeros(batch["tokens"].shape, jnp.int32),
                               jnp.zeros(batch["image"].shape, jnp.int32))
  )  # fmt: skip
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes)))


def test_every_paper_size_has_a_gin_file():
  assert {p.stem for p in PAPER_FILES} == {"parti_350m", "parti_750m", "parti_3b", "parti_20b"}


@pytest.mark.parametrize("path", PAPER_FILES, ids=lambda p: p.stem)
def test_paper_sizes_have_the_parameters_their_names_promise(path):
  config = _config_from_gin(path)
  nominal = float(path.stem.split("_")[1][:-1]) * (1e6 if path.stem.endswith("m") else 1e9)
  count = _parameter_count(config)
  assert abs(count - nominal) / nominal < 0.10, f"{path.stem}: {count / 1e6:.0f}M parameters"
  assert config.text_vocab_size == 16384 and config.image_vocab_size == 8192
  assert config.image_length == 1024 and config.text_length == 128


def test_gated_mlp_makes_350m_much_larger():
  config = _config_from_gin(REPO_ROOT / "gin/models/parti_350m.gin")
  plain, gated = _parameter_count(config), _parameter_count(config.replace(gated_mlp=True))
  # The plain MLP reproduces the paper's count; a gated one would make "350M" ~480M.
  assert abs(plain - 350e6) / 350e6 < 0.10
  assert abs(gated - 480e6) / 480e6 < 0.05


@pytest.mark.parametrize(
  ("field", "value", "message"),
  [
    ("norm", "batchnorm", "norm"),
    ("embed_dim", 30, "not divisible by num_heads"),
    ("cfg_dropout_rate", 1.5, "cfg_dropout_rate"),
    ("image_grid", (0, 4), "image_grid"),
    ("remat_policy", "some", "remat_policy"),
    ("tokens_per_patch", 3, "must divide the image grid's columns 4"),
    ("num_kv_heads", 3, "positive divisor of num_heads 4"),
    ("num_kv_heads", 0, "positive divisor of num_heads 4"),
  ],
)
def test_bad_configs_are_refused(field, value, message):
  with pytest.raises(ConfigError, match=message):
    tiny_config(**{field: value})


# --- Forward and decoding ---------------------------------------------------------------------


def test_forward_shapes_and_float32_logits():
  config = tiny_config(dtype="bfloat16")
  batch = example_batch(config, 2)
  params = init_params(config)
  logits = forward(config, params, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  assert logits.shape == (2, config.image_length, config.image_vocab_size)
  assert logits.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))


def _logits_before_and_after_changing_input(config, index: int):
  """Teacher-forced logits [1, N, V] of one example, and again with its decoder input
  at `index` (the token fed there, token index - 1) changed."""
  batch = example_batch(config, 1)
  params = init_params(config)
  changed = batch["decoder_input_tokens"].copy()
  changed[0, index] = (changed[0, index] + 1) % config.image_vocab_size
  a = forward(config, params, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  return np.asarray(a), np.asarray(forward(config, params, batch["encoder_input_tokens"], changed))


def test_decoder_is_causal():
  a, b = _logits_before_and_after_changing_input(tiny_config(), 7)
  np.testing.assert_allclose(a[0, :7], b[0, :7], atol=1e-6)
  assert not np.allclose(a[0, 7:], b[0, 7:])


def test_a_patchs_tokens_are_drawn_without_seeing_each_other():
  # Two tokens per patch: positions 6 and 7 are one patch. Token 6 (fed at position
  # 7, as callers feed token t - 1 at t) must not reach position 7, only the next
  # patch's positions; each position's logits cover its own group's 32 codes only.
  config = tiny_config(tokens_per_patch=2)
  a, b = _logits_before_and_after_changing_input(config, 7)
  np.testing.assert_allclose(a[0, :8], b[0, :8], atol=1e-6)
  assert not np.allclose(a[0, 8:], b[0, 8:])
  assert (a[0, 0::2, 32:] < -1e8).all() and (a[0, 0::2, :32] > -1e8).all()
  assert (a[0, 1::2, :32] < -1e8).all() and (a[0, 1::2, 32:] > -1e8).all()
  # Token 7 ends patch 3: the next patch's first position (8) reads it, whole.
  a, c = _logits_before_and_after_changing_input(config, 8)
  np.testing.assert_allclose(a[0, :8], c[0, :8], atol=1e-6)
  assert not np.allclose(a[0, 8], c[0, 8])


@pytest.mark.parametrize("text_positions", ["relative", "learned"])
def test_text_padding_changes_nothing(text_positions):
  config = tiny_config(text_positions=text_positions)
  batch = example_batch(config, 1)
  params = init_params(config)
  text = np.array([[5, 17, 1, 0, 0, 0, 0, 0]], np.int32)
  padded = forward(config, params, text, batch["decoder_input_tokens"])
  unpadded = forward(config, params, text[:, :3], batch["decoder_input_tokens"])
  np.testing.assert_allclose(padded, unpadded, atol=1e-5)
  other = text.copy()
  other[0, 1] = 18
  assert not np.allclose(forward(config, params, other, batch["decoder_input_tokens"]), padded)


def _decode_in_steps(config, params, text, tokens, prefill):
  """Logits from an encode, a prefill of `prefill` tokens, then one token per call."""
  model = Parti(config)
  encode = jax.jit(lambda p, t: model.apply({"params": p}, t, method=Parti.encode))

  @jax.jit
  def prefill_fn(p, t, encoded, mask):
    return model.apply(
      {"params": p}, t, encoded, mask, use_cache=True, method=Parti.decode, mutable=["cache"]
    )

  @jax.jit
  def step_fn(p, cache, t, mask):
    return model.apply(
      {"params": p, "cache": cache}, t, None, mask, use_cache=True, method=Parti.decode,
      mutable=["cache"],
    )  # fmt: skip

  encoded, mask = encode(params, text)
  logits, variables = prefill_fn(params, tokens[:, :prefill], encoded, mask)
  steps = [logits]
  for i in range(prefill, tokens.shape[1]):
    logits, variables = step_fn(params, variables["cache"], tokens[:, i : i + 1], mask)
    steps.append(logits)
  return jnp.concatenate(steps, axis=1)


@pytest.mark.parametrize(
  ("overrides", "prefill"),
  [
    ({}, 1),
    ({}, 5),
    ({"scan_layers": False}, 1),
    ({"text_positions": "learned", "remat_policy": "full"}, 1),
    ({"null_condition": "learned", "gated_mlp": True, "norm": "rmsnorm"}, 2),
    ({"tokens_per_patch": 2}, 1),
    ({"tokens_per_patch": 2, "scan_layers": False}, 4),
    ({"tokens_per_patch": 2}, 3),
    ({"num_kv_heads": 1}, 1),
    ({"num_kv_heads": 2, "scan_layers": False, "transposed_key_cache": True}, 3),
  ],
  ids=[
    "scan",
    "scan_prefill5",
    "loop",
    "learned_positions_remat",
    "learned_null_gated_rms",
    "two_tokens_per_patch",
    "two_tokens_per_patch_prefill4",
    "two_tokens_per_patch_prefill3",
    "multi_query",
    "grouped_query_transposed_keys_prefill3",
  ],
)
def test_cached_decoding_matches_the_full_forward(overrides, prefill):
  config = tiny_config(**overrides)
  batch = example_batch(config, 2)
  params = init_params(config)
  text, tokens = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
  full = forward(config, params, text, tokens)
  stepped = _decode_in_steps(config, params, text, tokens, prefill)
  np.testing.assert_allclose(stepped, full, atol=2e-5, rtol=1e-5)


def test_decoding_past_the_cache_is_an_error():
  config = tiny_config()
  batch = example_batch(config, 1)
  params = init_params(config)
  model = Parti(config)
  encoded = jnp.zeros((1, config.text_length, config.embed_dim))
  mask = jnp.ones((1, 1, 1, config.text_length), bool)
  too_long = jnp.zeros((1, config.image_length + 1), jnp.int32)
  with pytest.raises(ValueError, match="cache"):
    jax.eval_shape(
      lambda: model.apply(
        {"params": params}, too_long, encoded, mask, use_cache=True, method=Parti.decode,
        mutable=["cache"],
      )
    )  # fmt: skip
  del batch


def test_relative_buckets_are_symmetric_and_saturate():
  distances = jnp.arange(-300, 301)
  buckets = np.asarray(relative_position_bucket(distances, 32, 128))
  assert buckets.min() == 0 and buckets.max() == 31
  assert buckets[300] == 0  # Distance 0.
  assert len(set(buckets[:300]) & set(buckets[301:])) == 0  # Directions differ.
  assert buckets[0] == buckets[50]  # Both beyond max_distance to the left.


# --- Classifier-free guidance training ---------------------------------------------------------


@pytest.mark.parametrize("null_condition", ["empty", "learned"])
def test_condition_dropout_rate_and_what_it_drops(null_condition):
  config = tiny_config(cfg_dropout_rate=0.1, null_condition=null_condition)
  params = init_params(config)
  model = Parti(config)
  batch = 20_000
  drops = model.apply(
    {"params": params}, batch, method=Parti.condition_dropout, rngs={"dropout": jax.random.key(3)}
  )
  rate = float(np.mean(drops))
  assert abs(rate - 0.1) < 4 * np.sqrt(0.1 * 0.9 / batch), rate

  encode = jax.jit(
    lambda t, null: model.apply({"params": params}, t, null=null, method=Parti.encode)
  )
  text = example_batch(config, 4)["encoder_input_tokens"]
  null = jnp.array([True, False, True, False])
  encoded, mask = encode(text, null)
  unconditional, u_mask = encode(np.zeros_like(text) + 7, jnp.ones(4, bool))
  conditional, c_mask = encode(text, jnp.zeros(4, bool))
  # Dropped rows equal the null encoding whatever the text; kept rows are untouched.
  np.testing.assert_allclose(encoded[0], unconditional[0], atol=1e-6)
  np.testing.assert_allclose(encoded[2], unconditional[2], atol=1e-6)
  np.testing.assert_allclose(encoded[1], conditional[1], atol=1e-6)
  np.testing.assert_array_equal(mask[0], u_mask[0])
  np.testing.assert_array_equal(mask[3], c_mask[3])
  assert not np.allclose(conditional[0], unconditional[0])


def test_training_forward_drops_conditions_and_eval_does_not():
  config = tiny_config(cfg_dropout_rate=0.1, null_condition="empty")
  batch = example_batch(config, 64)
  params = init_params(config)
  model = Parti(config)
  text, tokens = batch["encoder_input_tokens"], batch["decoder_input_tokens"]

  @jax.jit
  def train_logits(rng):
    return model.apply({"params": params}, text, tokens, enable_dropout=True, rngs={"dropout": rng})

  evaluation = forward(config, params, text, tokens)
  dropped = model.apply(
    {"params": params}, 64, method=Parti.condition_dropout, rngs={"dropout": jax.random.key(5)}
  )
  trained = train_logits(jax.random.key(5))
  differs = np.asarray(jnp.any(jnp.abs(trained - evaluation) > 1e-5, axis=(1, 2)))
  np.testing.assert_array_equal(differs, np.asarray(dropped))
  assert 0 < differs.sum() < 32


# --- Sharding ---------------------------------------------------------------------------------


def _single_device_gradients(config):
  trainer = PartiTrainer(config, optim.adafactor(optim.AdafactorConfig()), z_loss=1e-4)
  batch = example_batch(config, 8)
  params = jax.jit(lambda: nn.meta.unbox(trainer.init_params(jax.random.key(0))))()
  grads, sums = jax.jit(trainer.gradients)(params, batch, jax.random.key(1))
  return config, batch, params, grads, sums


@pytest.fixture(scope="module")
def single_device_gradients():
  return _single_device_gradients(
    tiny_config(num_heads=8, embed_dim=64, mlp_dim=128, num_encoder_layers=1)
  )


@pytest.mark.parametrize("layout", sorted(MESH_LAYOUTS))
def test_sharded_loss_and_gradients_equal_single_device(layout, single_device_gradients):
  _check_sharded_gradients(MESH_LAYOUTS[layout], *single_device_gradients)


def test_grouped_query_attention_sharded_over_more_devices_than_key_heads():
  # Two key and value heads on a model axis of 4: the query heads are split over
  # it, the key and value heads replicated (`kv_heads`), and the gradients agree.
  config = tiny_config(num_heads=8, num_kv_heads=2, embed_dim=64, mlp_dim=128, num_encoder_layers=1)
  _check_sharded_gradients(MESH_LAYOUTS["2x4"], *_single_device_gradients(config))


def _check_sharded_gradients(mesh_config, config, batch, params, expected_grads, expected_sums):
  mesh = partitioning.create_mesh(mesh_config)
  rules = partitioning.rules_for(mesh_config)
  trainer = PartiTrainer(config, optim.adafactor(optim.AdafactorConfig()), z_loss=1e-4)
  abstract = jax.eval_shape(lambda: trainer.init_params(jax.random.key(0)))
  shardings = partitioning.tree_shardings(mesh, abstract, rules)
  sharded_params = jax.device_put(params, shardings)
  batch_sharding = partitioning.logical_sharding(mesh, ("batch", None), rules)
  sharded_batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
  with partitioning.activate(mesh, rules):
    grads, sums = jax.jit(trainer.gradients, out_shardings=(shardings, None))(
      sharded_params, sharded_batch, jax.random.key(1)
    )
  # The layout really is sharded (not everything replicated) where the rules say so.
  kernel = grads["decoder"]["layers"]["mlp"]["wi"]["kernel"]
  if mesh_config.model > 1:
    assert not kernel.sharding.is_fully_replicated
  np.testing.assert_allclose(sums["loss"], expected_sums["loss"], rtol=1e-5)
  for (path, got), want in zip(
    jax.tree_util.tree_leaves_with_path(grads),
    jax.tree_util.tree_leaves(expected_grads),
    strict=True,
  ):
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-4, err_msg=jax.tree_util.keystr(path))


def test_microbatches_give_the_same_gradients(single_device_gradients):
  config, batch, params, expected_grads, expected_sums = single_device_gradients
  four = PartiTrainer(config, optim.adafactor(optim.AdafactorConfig()), z_loss=1e-4, microbatches=4)
  grads, sums = jax.jit(four.gradients)(params, batch, jax.random.key(1))
  for key in ("loss", "weight_sum", "correct"):
    np.testing.assert_allclose(sums[key], expected_sums[key], rtol=1e-5)
  for a, b in zip(
    jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected_grads), strict=True
  ):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_optimizer_state_is_sharded_like_its_parameters(mesh_4x2):
  config = tiny_config(embed_dim=256, mlp_dim=512, num_heads=8)  # Big enough to factor.
  trainer = PartiTrainer(config, optim.adafactor(optim.AdafactorConfig()))
  rules = partitioning.RULE_SETS["model_parallel"]
  state, _shardings = partitioning.init_sharded(lambda: trainer.init(0), mesh_4x2, rules)
  momentum = [
    x for x in jax.tree_util.tree_leaves(state.opt_state) if x.dtype == jnp.int8 and x.ndim == 4
  ]
  assert momentum, "int8 momentum of the stacked layers"
  assert any(not x.sharding.is_fully_replicated for x in momentum)


# --- Model FLOPs ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [None, 1])
def test_model_flops_agree_with_xla_cost_analysis(num_kv_heads):
  # Unscanned: XLA's cost analysis counts a scanned body once, not once per layer.
  config = tiny_config(
    embed_dim=128, mlp_dim=512, num_heads=4, text_length=16, image_grid=(8, 8), scan_layers=False,
    num_kv_heads=num_kv_heads,
  )  # fmt: skip
  batch = example_batch(config, 4)
  params = init_params(config)
  model = Parti(config)
  compiled = (
    jax.jit(lambda p, t, d: model.apply({"params": p}, t, d))
    .lower(params, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
    .compile()
  )
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  expected = 4 * flops.parti_forward_flops(config)
  assert 0.9 < analysis["flops"] / expected < 1.25, analysis["flops"] / expected


@pytest.mark.parametrize(
  ("kv_heads_major", "keys_transposed"), [(False, False), (True, False), (True, True)]
)
def test_grouped_query_attention_is_each_key_head_repeated_for_its_query_heads(
  kv_heads_major, keys_transposed
):
  # 6 query heads over 2 key and value heads: heads 0-2 read key head 0, 3-5 head 1.
  q, k, v, bias = (
    jax.random.normal(jax.random.key(i), shape)
    for i, shape in enumerate([(2, 5, 6, 8), (2, 7, 2, 8), (2, 7, 2, 8), (1, 6, 5, 7)])
  )
  mask = jax.random.bernoulli(jax.random.key(9), 0.7, (2, 1, 5, 7)).at[..., 0].set(True)

  def attend(key, value):
    if kv_heads_major:
      key, value = jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2)
    if keys_transposed:
      key = jnp.swapaxes(key, 2, 3)
    return layers.dot_product_attention(
      q, key, value, mask, bias, 0.0, True, None, kv_heads_major, keys_transposed
    )

  repeated = attend(jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2))
  np.testing.assert_allclose(attend(k, v), repeated, atol=1e-5)
  # And it is not what the heads would give reading the other key head.
  swapped = attend(jnp.repeat(k[:, :, ::-1], 3, axis=2), jnp.repeat(v[:, :, ::-1], 3, axis=2))
  assert not np.allclose(attend(k, v), swapped, atol=1e-3)


def test_multi_query_attention_shares_one_key_and_value_head():
  # One key and one value head per attention layer: each projection shrinks from
  # [embed, heads, head_dim] to [embed, 1, head_dim], and so do the FLOPs counted.
  full, shared = tiny_config(), tiny_config(num_kv_heads=1)
  attention = init_params(shared)["decoder"]["layers"]["self_attention"]
  assert attention["key"]["kernel"].shape[-2:] == (1, shared.per_head_dim)
  assert attention["query"]["kernel"].shape[-2:] == (4, shared.per_head_dim)
  layers = full.num_encoder_layers + 2 * full.num_decoder_layers  # Self and cross.
  saved = layers * 2 * full.embed_dim * 3 * full.per_head_dim  # 3 of 4 key and value heads.
  assert _parameter_count(full) - _parameter_count(shared) == saved
  assert flops.parti_forward_flops(shared) < flops.parti_forward_flops(full)


def test_embeddings_from_the_codebook_keep_its_geometry():
  codebook = jax.random.normal(jax.random.key(0), (64, 8)) * 3.0
  embeddings = embeddings_from_codebook(codebook, embed_dim=32, seed=1)
  assert embeddings.shape == (64, 32)
  # At the model's embedding scale, and with the codes' cosine similarities.
  np.testing.assert_allclose(jnp.linalg.norm(embeddings, axis=-1), np.sqrt(32), rtol=1e-5)
  unit = codebook / jnp.linalg.norm(codebook, axis=-1, keepdims=True)
  np.testing.assert_allclose(embeddings @ embeddings.T, 32 * unit @ unit.T, atol=1e-3)
  # A codebook wider than the model is cut to its width rather than refused.
  assert embeddings_from_codebook(codebook, embed_dim=4).shape == (64, 4)


def test_image_embeddings_replace_only_the_codes_rows(mesh_4x2):
  config = PartiConfig(
    text_vocab_size=64, text_length=8, image_vocab_size=16, image_grid=(2, 2), embed_dim=16,
    mlp_dim=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, dtype="float32",
  )  # fmt: skip
  trainer = PartiTrainer(config, optim.adafactor(optim.AdafactorConfig()))
  rules = partitioning.rules_for(MESH_LAYOUTS["4x2"])
  state, shardings = partitioning.init_sharded(lambda: trainer.init(0), mesh_4x2, rules)
  embeddings = jnp.arange(16 * 16, dtype=jnp.float32).reshape(16, 16)
  params = with_image_embeddings(state.params, embeddings)
  table = params["decoder"]["token_embedding"]["embedding"]
  before = state.params["decoder"]["token_embedding"]["embedding"]
  np.testing.assert_array_equal(table[:16], embeddings)
  np.testing.assert_array_equal(table[16:], before[16:])  # BOS and padding rows.
  assert table.sharding == shardings.params["decoder"]["token_embedding"]["embedding"]
  assert params["encoder"] is state.params["encoder"]
