"""The ViT-VQGAN model, quantizer and losses."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import module_params, tiny_tokenizer_config

from parti import partitioning
from parti.runtime.errors import ConfigError
from parti.tokenizer import discriminator, losses, model
from parti.tokenizer.config import TokenizerConfig


def _images(batch=4, size=32, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3))


@pytest.fixture(scope="module")
def tiny():
  config = tiny_tokenizer_config()
  vqgan = model.VitVQGAN(config)
  params = module_params(vqgan, _images())
  return config, vqgan, params


def test_shapes_and_dtypes(tiny):
  _config, vqgan, params = tiny
  apply = jax.jit(vqgan.apply, static_argnames="method")  # Eager linen compiles op by op.
  raw, ids, vq = apply({"params": params}, _images())
  assert raw.shape == (4, 32, 32, 3)
  assert raw.dtype == jnp.float32
  assert ids.shape == (4, 4, 4)
  assert ids.dtype == jnp.int32
  assert set(vq) == {"codebook", "commitment"}
  encoded = apply({"params": params}, _images(), method=model.VitVQGAN.encode)
  np.testing.assert_array_equal(encoded, ids)
  decoded = apply({"params": params}, encoded, method=model.VitVQGAN.decode)
  assert decoded.shape == (4, 32, 32, 3)
  assert float(decoded.min()) >= 0.0
  assert float(decoded.max()) <= 1.0


@pytest.mark.parametrize("background", [0.0, 0.5, 1.0])
def test_the_patch_size_codes_a_flat_image_with_one_code(background):
  # Without attention blocks nothing reads a position embedding; adding one made each
  # background patch's code say where it was (the demo spent half its codes on that).
  config = tiny_tokenizer_config(encoder="patch", decoder="patch")
  vqgan = model.VitVQGAN(config)
  params = nn.meta.unbox(vqgan.init(jax.random.key(2), _images())["params"])
  flat = jnp.full((1, 32, 32, 3), background)
  ids = np.asarray(vqgan.apply({"params": params}, flat, method=model.VitVQGAN.encode))
  assert np.unique(ids).size == 1
  decoded = vqgan.apply({"params": params}, ids, method=model.VitVQGAN.decode)
  patches = np.asarray(model.patchify(decoded, config.patch_size))
  np.testing.assert_allclose(patches, np.broadcast_to(patches[:, :1], patches.shape), atol=1e-6)


def test_vits_with_attention_blocks_keep_their_position_embeddings():
  config = tiny_tokenizer_config()
  vqgan = model.VitVQGAN(config)
  params = nn.meta.unbox(vqgan.init(jax.random.key(2), _images())["params"])
  flat = jnp.full((1, 32, 32, 3), 0.5)
  encoded = vqgan.apply({"params": params}, flat, method=lambda m, x: m.encoder(x))
  # Attention must tell patches apart, so identical patches still encode differently.
  assert float(jnp.abs(encoded - encoded[:, :1]).max()) > 1e-3


def test_the_patch_size_codes_every_patch_on_its_own():
  config = tiny_tokenizer_config(encoder="patch", decoder="patch")
  vqgan = model.VitVQGAN(config)
  images = _images()
  params = nn.meta.unbox(vqgan.init(jax.random.key(1), images)["params"])
  raw, ids, _ = vqgan.apply({"params": params}, images)
  changed = images.at[:, :8, :8].set(1.0 - images[:, :8, :8])  # The top-left patch only.
  raw2, ids2, _ = vqgan.apply({"params": params}, changed)
  np.testing.assert_array_equal(ids2[:, 1:], ids[:, 1:])
  np.testing.assert_array_equal(ids2[:, 0, 1:], ids[:, 0, 1:])
  if (ids2[:, 0, 0] == ids[:, 0, 0]).all():
    np.testing.assert_array_equal(raw2, raw)
  np.testing.assert_allclose(raw2[:, 8:], raw[:, 8:], atol=1e-6)
  np.testing.assert_allclose(raw2[:, :, 8:], raw[:, :, 8:], atol=1e-6)


def test_the_patch_mlp_size_codes_each_patch_alone_and_a_flat_image_with_one_code():
  # One MLP block per patch, no attention: still nothing reads a position, so a flat image
  # is one code, and changing one patch changes only its code.
  config = tiny_tokenizer_config(encoder="patch_mlp", decoder="patch")
  vqgan = model.VitVQGAN(config)
  params = module_params(vqgan, _images())
  assert "block_0" in params["encoder"]["vit"]
  encode = jax.jit(lambda x: vqgan.apply({"params": params}, x, method=model.VitVQGAN.encode))
  assert np.unique(np.asarray(encode(jnp.full((1, 32, 32, 3), 0.3)))).size == 1
  images = _images()
  changed = images.at[:, :8, :8].set(1.0 - images[:, :8, :8])
  latents = jax.jit(lambda x: vqgan.apply({"params": params}, x, method=lambda m, x: m.encoder(x)))
  before, after = np.asarray(latents(images)), np.asarray(latents(changed))
  np.testing.assert_allclose(after[:, 1:], before[:, 1:], atol=1e-6)
  assert np.abs(after[:, 0] - before[:, 0]).max() > 1e-3


def _palette_tokenizer():
  config = tiny_tokenizer_config(
    encoder="patch_mlp", decoder="patch", codebook_size=64, codebook_groups=2,
    group_layout="stacked", group_order=(1, 0), decoder_head="palette",
  )  # fmt: skip
  vqgan = model.VitVQGAN(config)
  return config, vqgan, module_params(vqgan, _images())


def test_the_palette_head_takes_colors_from_group_0_and_their_places_from_group_1():
  config, vqgan, params = _palette_tokenizer()
  # Every patch of the grid takes the same pair of codes: (palette p, layout l).
  per_group = config.codebook_size // 2
  pairs = [(p, per_group + layout) for p in (0, 5, 17) for layout in (0, 9, 30)]
  ids = np.stack([np.tile(np.asarray(pair, np.int32), (16, 1)) for pair in pairs])
  decode = jax.jit(
    lambda i: vqgan.apply(
      {"params": params}, i, method=lambda m, i: m.decoder(m.quantizer.embed(i))
    )
  )
  patches = np.asarray(model.patchify(decode(jnp.asarray(ids)), 8))[:, 0]  # [pairs, 64 * 3]
  patches = patches.reshape(3, 3, 64, 3)  # [palette, layout, pixel, rgb]
  codebook = np.asarray(params["quantizer"]["codebook"])[[0, 5, 17]]
  codes = codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)
  palette = model.Palette(config)
  colors = jax.jit(lambda c: palette.apply({"params": params["decoder"]["palette"]}, c))(codes)
  colors = np.asarray(colors)
  for p in range(3):
    first, second = colors[p]
    # Each pixel is a mix of its palette code's two colors, whatever the layout code ...
    weight = (patches[p] - first) @ (second - first) / np.sum((second - first) ** 2)
    mixed = first + weight[..., None] * (second - first)
    np.testing.assert_allclose(patches[p], mixed, atol=1e-4)
    assert (weight > -1e-4).all() and (weight < 1 + 1e-4).all()
    if p == 0:
      weights = weight
    else:
      # ... and how much of each is the layout code's alone, whatever the palette code.
      np.testing.assert_allclose(weight, weights, atol=1e-3)
  assert np.abs(weights[0] - weights[1]).max() > 1e-3  # Layout codes differ in arrangement.


def test_product_codes_sit_side_by_side_on_the_token_grid():
  # Two groups of 32 codes: each 8 px patch takes one code from each, and its two
  # tokens sit next to each other, so the 4x4 patches make a 4x8 token grid.
  config = tiny_tokenizer_config(encoder="patch", decoder="patch", codebook_groups=2)
  assert config.patch_grid == (4, 4) and config.grid == (4, 8)
  vqgan = model.VitVQGAN(config)
  images = _images()
  params = nn.meta.unbox(vqgan.init(jax.random.key(1), images)["params"])
  raw, ids, _ = vqgan.apply({"params": params}, images)
  assert ids.shape == (4, 4, 8)
  ids = np.asarray(ids)
  assert (ids[..., 0::2] < 32).all() and (ids[..., 1::2] >= 32).all()  # Group 0, then 1.
  encoded = vqgan.apply({"params": params}, images, method=model.VitVQGAN.encode)
  np.testing.assert_array_equal(encoded, ids)
  decoded = vqgan.apply({"params": params}, encoded, method=model.VitVQGAN.decode)
  # Two programs computing the same pixels round differently (1.1e-6 seen).
  np.testing.assert_allclose(decoded, model.to_image(raw, config), atol=1e-5)
  # Changing the top-left patch can change its two tokens and no others.
  changed = images.at[:, :8, :8].set(1.0 - images[:, :8, :8])
  ids2 = np.asarray(vqgan.apply({"params": params}, changed, method=model.VitVQGAN.encode))
  np.testing.assert_array_equal(ids2[:, 1:], ids[:, 1:])
  np.testing.assert_array_equal(ids2[:, 0, 2:], ids[:, 0, 2:])
  assert (ids2[:, 0, :2] != ids[:, 0, :2]).any()
  # A patch decodes from its own pair of codes: swapping one pair's group-1 code
  # changes that patch's pixels only.
  swapped = ids.copy()
  swapped[:, 3, 7] = 32 + (swapped[:, 3, 7] - 31) % 32
  redecoded = np.asarray(vqgan.apply({"params": params}, swapped, method=model.VitVQGAN.decode))
  np.testing.assert_allclose(redecoded[:, :24], np.asarray(decoded)[:, :24], atol=1e-6)
  assert np.abs(redecoded[:, 24:, 24:] - np.asarray(decoded)[:, 24:, 24:]).max() > 1e-4


def test_stacked_product_codes_write_each_group_as_a_whole_grid(tmp_path):
  # The same parameters and images as side by side, with each group's 4x4 grid in turn
  # (group 1 first): the same codes, moved, and the same pixels decoded.
  side = tiny_tokenizer_config(encoder="patch", decoder="patch", codebook_groups=2)
  stacked = dataclasses.replace(side, group_layout="stacked", group_order=(1, 0))
  assert stacked.patch_grid == (4, 4) and stacked.grid == (8, 4)
  images = _images()
  params = module_params(model.VitVQGAN(side), images, seed=1)

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def apply(config, method, x):
    return model.VitVQGAN(config).apply({"params": params}, x, method=method)

  by_patch = np.asarray(apply(side, "encode", images))
  by_group = np.asarray(apply(stacked, "encode", images))
  assert by_group.shape == (4, 8, 4)
  np.testing.assert_array_equal(by_group[:, :4], by_patch[..., 1::2])  # Group 1's grid first,
  np.testing.assert_array_equal(by_group[:, 4:], by_patch[..., 0::2])  # then group 0's.
  np.testing.assert_array_equal(stacked.from_grid(by_group), side.from_grid(by_patch))
  np.testing.assert_allclose(
    apply(stacked, "decode", by_group), apply(side, "decode", by_patch), atol=1e-6
  )
  # Redrawing the top-right patch redraws its token in each group's grid.
  patches = np.zeros((4, 4), bool)
  patches[0, 3] = True
  assert np.flatnonzero(stacked.token_mask(patches)).tolist() == [3, 19]
  assert np.flatnonzero(side.token_mask(patches)).tolist() == [6, 7]
  # The layout is saved with the config, so a trained tokenizer decodes as it encoded.
  stacked.save(tmp_path / "tokenizer_config.json")
  assert TokenizerConfig.load(tmp_path / "tokenizer_config.json") == stacked


def test_patchify_round_trip():
  x = _images(2, 16)
  np.testing.assert_array_equal(model.unpatchify(model.patchify(x, 4), 4, (4, 4)), x)


def test_codes_and_quantized_vectors_are_unit_length(tiny):
  _, _, params = tiny
  quantizer = model.FactorizedQuantizer(64, 8, l2_normalize=True)
  z = jax.random.normal(jax.random.key(1), (2, 5, 8)) * 3.0
  codes = quantizer.apply({"params": params["quantizer"]}, method=model.FactorizedQuantizer.codes)
  np.testing.assert_allclose(jnp.linalg.norm(codes, axis=-1), 1.0, rtol=1e-5)
  quantized, _, _ = quantizer.apply({"params": params["quantizer"]}, z)
  np.testing.assert_allclose(jnp.linalg.norm(quantized, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("normalize", [True, False])
def test_lookup_matches_brute_force_numpy(normalize, groups):
  quantizer = model.FactorizedQuantizer(48, 6, l2_normalize=normalize, groups=groups)
  z = jax.random.normal(jax.random.key(2), (40, groups * 6))
  variables = quantizer.init(jax.random.key(3), z)
  codebook = np.asarray(nn.meta.unbox(variables)["params"]["codebook"], np.float64)
  ids = np.asarray(quantizer.apply(variables, z, method=model.FactorizedQuantizer.lookup))
  assert ids.shape == (40, groups)
  zz = np.asarray(z, np.float64).reshape(40, groups, 6)
  if normalize:
    codebook /= np.linalg.norm(codebook, axis=1, keepdims=True)
    zz /= np.linalg.norm(zz, axis=-1, keepdims=True)
  per_group = 48 // groups
  for g in range(groups):
    own = codebook[g * per_group : (g + 1) * per_group]
    distances = ((zz[:, g, None, :] - own[None]) ** 2).sum(-1)
    # Ids are global: group g's codes come after the earlier groups' codes.
    np.testing.assert_array_equal(ids[:, g], distances.argmin(1) + g * per_group)
  # embed gives back each group's code vector, side by side.
  vectors = np.asarray(quantizer.apply(variables, ids, method=model.FactorizedQuantizer.embed))
  np.testing.assert_allclose(vectors.reshape(40, groups, 6), codebook[ids], rtol=1e-5, atol=1e-6)


def test_straight_through_gradient_passes_unchanged():
  quantizer = model.FactorizedQuantizer(16, 4, l2_normalize=False)
  z = jax.random.normal(jax.random.key(4), (3, 4))
  variables = quantizer.init(jax.random.key(5), z)
  weights = jax.random.normal(jax.random.key(6), (3, 4))
  grad = jax.grad(lambda z: jnp.sum(quantizer.apply(variables, z)[0] * weights))(z)
  np.testing.assert_allclose(grad, weights, rtol=1e-6)  # d(st(z))/dz is the identity.


def test_vq_losses_train_the_right_side():
  quantizer = model.FactorizedQuantizer(16, 4, l2_normalize=False)
  z = jax.random.normal(jax.random.key(7), (8, 4))
  variables = quantizer.init(jax.random.key(8), z)

  def loss(name):
    return lambda params, z: quantizer.apply({"params": params}, z)[2][name]

  params = variables["params"]
  codebook_grad_z = jax.grad(loss("codebook"), argnums=1)(params, z)
  commitment_grad_codes = jax.grad(loss("commitment"))(params, z)
  assert float(jnp.abs(codebook_grad_z).sum()) == 0.0  # The codebook loss does not move z...
  assert (
    float(jnp.abs(nn.meta.unbox(commitment_grad_codes)["codebook"]).sum()) == 0.0
  )  # ...nor commitment codes.


def test_sharded_forward_equals_unsharded(tiny, mesh_4x2):
  _config, vqgan, params = tiny
  images = _images(8)
  expected = jax.jit(lambda p, x: vqgan.apply({"params": p}, x)[0])(params, images)
  rules = partitioning.RULE_SETS["model_parallel"]

  def init():
    return vqgan.init(jax.random.key(0), images)["params"]

  _, shardings = partitioning.init_sharded(init, mesh_4x2, rules)
  sharded_params = jax.device_put(params, shardings)
  batch = partitioning.logical_sharding(mesh_4x2, ("batch", None, None, None), rules)
  with partitioning.activate(mesh_4x2, rules):
    got = jax.jit(lambda p, x: vqgan.apply({"params": p}, x)[0], in_shardings=(shardings, batch))(
      sharded_params, jax.device_put(images, batch)
    )
  assert any(
    len(s.device_set) > 1 and not s.is_fully_replicated
    for s in jax.tree_util.tree_leaves(shardings)
  )
  np.testing.assert_allclose(got, expected, atol=2e-5)


def test_decode_of_encode_is_deterministic(tiny):
  _, vqgan, params = tiny
  images = _images(3)
  round_trip = jax.jit(
    lambda x: vqgan.apply(
      {"params": params}, vqgan.apply({"params": params}, x, method=model.VitVQGAN.encode),
      method=model.VitVQGAN.decode,
    )
  )  # fmt: skip
  np.testing.assert_array_equal(round_trip(images), round_trip(images))


def test_logit_laplace_head_and_loss():
  config = tiny_tokenizer_config(logit_laplace=True)
  vqgan = model.VitVQGAN(config)
  variables = vqgan.init(jax.random.key(0), _images())
  raw = vqgan.apply(variables, _images())[0]
  assert raw.shape[-1] == 6
  target = _images(1)
  near = jnp.concatenate(
    [jnp.log(target * 0.8 + 0.1) - jnp.log1p(-(target * 0.8 + 0.1)), jnp.full_like(target, -3.0)],
    -1,
  )
  far = near.at[..., :3].add(2.0)
  assert float(losses.logit_laplace_nll(near, target)) < float(
    losses.logit_laplace_nll(far, target)
  )


def test_discriminator_losses_and_r1():
  disc = discriminator.Discriminator(base_channels=8)
  images = _images(4)
  variables = jax.jit(disc.init)(jax.random.key(0), images)
  logits = jax.jit(disc.apply)(variables, images)
  assert logits.shape == (4,)
  for kind in ("non_saturating", "hinge"):
    good = losses.discriminator_loss(jnp.full(4, 5.0), jnp.full(4, -5.0), kind)
    bad = losses.discriminator_loss(jnp.full(4, -5.0), jnp.full(4, 5.0), kind)
    assert float(good) < float(bad)
    assert float(losses.generator_adversarial(jnp.full(4, 5.0), kind)) < float(
      losses.generator_adversarial(jnp.full(4, -5.0), kind)
    )
  penalty = jax.jit(lambda v, x: losses.r1_penalty(lambda y: disc.apply(v, y), x))(
    variables, images
  )
  assert float(penalty) > 0.0


def test_codebook_stats():
  stats = losses.codebook_stats(jnp.array([[0, 0, 1, 1]]), 4)
  assert float(stats["usage"]) == 0.5
  np.testing.assert_allclose(float(stats["perplexity"]), 2.0, rtol=1e-6)


@pytest.mark.parametrize(
  ("fields", "message"),
  [
    (dict(image_size=30), "not a multiple of patch_size"),
    (dict(encoder="huge"), "not one of"),
    (dict(dtype="float16"), "float32 or bfloat16"),
    (dict(codebook_size=10, codebook_groups=3), "does not split into codebook_groups 3"),
    (dict(codebook_groups=0), "codebook_groups must be positive"),
    (dict(group_layout="diagonal"), "group_layout 'diagonal' is not one of"),
    (dict(codebook_size=512, codebook_groups=2, group_order=(0, 0)), "is not an order of"),
    (dict(group_order=(1,)), "is not an order of"),
    (dict(decoder_head="mosaic"), "decoder_head 'mosaic' is not one of"),
    (dict(decoder_head="palette"), "needs codebook_groups = 2, not 1"),
    (
      dict(decoder_head="palette", codebook_size=64, codebook_groups=2, logit_laplace=True),
      "set logit_laplace to False",
    ),
    (
      dict(decoder_head="palette", codebook_size=64, codebook_groups=2, palette_colors=1),
      "palette_colors must be at least 2",
    ),
  ],
)
def test_bad_configs(fields, message):
  with pytest.raises(ConfigError, match=message):
    TokenizerConfig(**{"encoder": "tiny", "decoder": "tiny", **fields})


@pytest.mark.parametrize(
  ("encoder", "decoder", "millions"),
  [("small", "small", 2 * 25.2), ("small", "large", 25.2 + 630.0)],
)
def test_paper_sizes_have_the_expected_parameter_counts(encoder, decoder, millions):
  config = TokenizerConfig(image_size=256, encoder=encoder, decoder=decoder)
  shapes = jax.eval_shape(
    lambda: model.VitVQGAN(config).init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
  )
  count = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes)))
  assert abs(count / 1e6 - millions) / millions < 0.1, count
