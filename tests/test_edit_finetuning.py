"""The editing head (GLIDE's fine-tuned inpainting, for tokens): the model reading the
image to edit, the random regions it trains on, and sampling through it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import tiny_run_config

from parti.modeling import model as model_lib
from parti.runtime.errors import ConfigError
from parti.sampling import decoding, editing
from parti.sampling.generation import SamplingOptions
from parti.sampling.prompts import Prompt
from parti.training import edit_masks

CONFIG = tiny_run_config(edit_context=True, num_decoder_layers=1)


@pytest.fixture(scope="module")
def params():
  return jax.jit(lambda: nn.meta.unbox(model_lib.init_params(CONFIG, jax.random.key(0))))()


def _encode(params, context, null=None, config=CONFIG, batch=None):
  text = jnp.tile(jnp.arange(1, 9)[None], (batch or len(context), 1))
  return jax.jit(
    lambda p, c, n: model_lib.Parti(config).apply(
      {"params": p}, text, null=n, edit_context=c, method=model_lib.Parti.encode
    )
  )(params, context, null)


def test_random_masks_are_boxes_borders_or_everything_and_never_empty():
  rows, cols = 4, 5
  masks = np.asarray(
    edit_masks.random_masks(jax.random.key(0), 512, (rows, cols), edit_masks.EditMaskConfig())
  ).reshape(512, rows, cols)
  assert masks.any(axis=(1, 2)).all()

  def is_rectangle(m):
    r, c = np.nonzero(m)
    return m[r.min() : r.max() + 1, c.min() : c.max() + 1].all() and m.sum() == (
      (r.max() - r.min() + 1) * (c.max() - c.min() + 1)
    )

  full = masks.all(axis=(1, 2))
  boxes = np.array([is_rectangle(m) for m in masks]) & ~full
  borders = np.array([m.any() and not m.all() and is_rectangle(~m) for m in masks]) & ~boxes
  assert (full | boxes | borders).all()
  # Each kind about as often as asked (0.5 / 0.3 / 0.2; a border kept rectangle of the
  # whole grid falls back to everything).
  assert 0.4 < boxes.mean() < 0.6 and 0.2 < borders.mean() < 0.4 and 0.1 < full.mean() < 0.3
  only_boxes = edit_masks.EditMaskConfig(box=1.0, border=0.0, everything=0.0)
  boxed = np.asarray(edit_masks.random_masks(jax.random.key(1), 64, (rows, cols), only_boxes))
  assert all(is_rectangle(m.reshape(rows, cols)) for m in boxed)
  with pytest.raises(ConfigError, match="EditMaskConfig"):
    edit_masks.EditMaskConfig(box=0.0, border=0.0, everything=0.0)


def test_stacked_grids_redraw_the_same_patches_in_every_group():
  rows, cols = 3, 4  # One group's patch grid; the token grid holds two of them in turn.
  masks = np.asarray(
    edit_masks.random_masks(
      jax.random.key(2), 256, (2 * rows, cols), edit_masks.EditMaskConfig(), stacked=2
    )
  ).reshape(256, 2, rows * cols)
  np.testing.assert_array_equal(masks[:, 0], masks[:, 1])
  assert masks[:, 0].any(axis=1).all() and not masks[:, 0].all(axis=1).all()


def test_edit_features_mask_the_context_where_the_loss_is():
  targets = jnp.tile(jnp.arange(16)[None], (32, 1))
  batch = {"decoder_target_tokens": targets, "decoder_loss_weights": jnp.ones_like(targets)}
  features = edit_masks.edit_features(batch, jax.random.key(0), CONFIG, edit_masks.EditMaskConfig())
  redrawn = np.asarray(features["decoder_loss_weights"]) == 1
  context = np.asarray(features["edit_context_tokens"])
  assert (context[redrawn] == CONFIG.mask_id).all()
  assert (context[~redrawn] == np.asarray(targets)[~redrawn]).all()
  assert redrawn.any(axis=1).all() and not redrawn.all()


def test_the_head_reads_the_image_and_an_all_masked_image_is_plain_generation(params):
  image = jnp.tile(jnp.arange(16)[None] % CONFIG.image_vocab_size, (2, 1))
  masked = jnp.full_like(image, CONFIG.mask_id)
  none, _ = _encode(params, None, batch=1)
  all_masked, mask = _encode(params, masked[:1])
  np.testing.assert_array_equal(none, all_masked)
  assert mask.shape[-1] == 8 + CONFIG.image_length  # The text's 8, then the image's.
  seen, _ = _encode(params, image[:1])
  assert not np.allclose(seen, all_masked)
  # The null condition drops the text, not the image: guidance weighs the prompt alone.
  null = jnp.array([True, True])
  null_seen, null_mask = _encode(params, image, null)
  null_masked, _ = _encode(params, masked, null)
  assert not np.allclose(null_seen, null_masked)
  assert np.asarray(null_mask)[0, 0, 0, 8:].all()
  with pytest.raises(ValueError, match="without edit_context"):
    _encode(params, image, config=tiny_run_config(num_decoder_layers=1))


@pytest.mark.parametrize("null_condition", ["empty", "learned"])
def test_the_head_starts_as_copies_of_the_decoders_tables(null_condition):
  base_config = tiny_run_config(num_decoder_layers=1, null_condition=null_condition)
  base = jax.jit(lambda: nn.meta.unbox(model_lib.init_params(base_config, jax.random.key(0))))()
  edit_config = base_config.replace(edit_context=True)
  expected = jax.tree_util.tree_structure(nn.meta.unbox(model_lib.abstract_params(edit_config)))
  added = model_lib.with_edit_context(base)
  assert jax.tree_util.tree_structure(added) == expected
  head, decoder = added["encoder"]["image_context"], base["decoder"]
  np.testing.assert_array_equal(
    head["token_embedding"]["embedding"], decoder["token_embedding"]["embedding"]
  )
  np.testing.assert_array_equal(head["row_embedding"], decoder["row_embedding"])
  assert head["col_embedding"] is not decoder["col_embedding"]  # A copy: donation-safe.
  # The learned null condition keeps the image's positions.
  _, mask = _encode(added, jnp.zeros((1, 16), jnp.int32), jnp.array([True]), edit_config)
  assert np.asarray(mask)[0, 0, 0, 0] and np.asarray(mask)[0, 0, 0, 8:].all()


def test_sampling_through_the_head_keeps_the_kept_tokens_and_refines(params):
  image = jnp.tile((jnp.arange(16)[None] * 5) % CONFIG.image_vocab_size, (2, 1))
  keep = jnp.zeros((2, 16), bool).at[:, :6].set(True).at[:, 10:].set(True)
  context = jnp.where(keep, image, CONFIG.mask_id)
  text = jnp.tile(jnp.arange(1, 9)[None], (2, 1))

  @jax.jit
  def edit(p, context):
    tokens, _ = decoding.sample(
      CONFIG, p, text, jax.random.key(3), guidance_scale=2.0, keep=(image, keep),
      edit_context=context,
    )  # fmt: skip
    refined, score = editing.refine(
      CONFIG, p, text, tokens, ~keep, guidance_scale=2.0, top_k=8, context=context
    )
    plain = editing.sequence_log_likelihood(CONFIG, p, text, refined, 2.0)
    return tokens, refined, score, plain

  tokens, refined, score, plain = edit(params, context)
  for out in (tokens, refined):
    np.testing.assert_array_equal(np.asarray(out)[np.asarray(keep)], np.asarray(image)[keep])
  # Scored with the image in view, not as plain generation.
  assert not np.allclose(score, plain)


def test_fine_tuned_edits_of_a_model_without_the_head_are_refused_by_name():
  plain = tiny_run_config()
  request = Prompt("a red circle", source="edits.jsonl:3", image="x.png", box=(0, 0, 4, 4))
  other = Prompt("a blue square", source="edits.jsonl:1")
  with pytest.raises(ConfigError, match=r"edits\.jsonl:3: a fine-tuned edit .* no editing head"):
    editing.check_method("fine_tuned", plain, [other, request])
  editing.check_method("fine_tuned", plain, [other])  # No edit: nothing to refuse.
  editing.check_method("auto", plain, [request])
  assert not editing.fine_tuned("auto", plain) and editing.fine_tuned("auto", CONFIG)
  assert not editing.fine_tuned("zero_shot", CONFIG)
  with pytest.raises(ConfigError, match="edit_method"):
    SamplingOptions(edit_method="finetuned")
