"""Feature converters from Parti's task features to t5x's encoder-decoder model features.

Model features (t5x's names): `encoder_input_tokens`, `decoder_input_tokens`,
`decoder_target_tokens`, `decoder_loss_weights`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import seqio
import tensorflow as tf


class ImageTokensFeatureConverter(seqio.EncDecFeatureConverter):
  """Text tokens in, image tokens out: `EncDecFeatureConverter` with two changes.

  * Image token ids are codebook indices, so 0 is a real code, not padding: the
    loss weights cannot come from `targets != 0`, as EncDecFeatureConverter
    computes them. Image sequences always have the grid's full length, so every
    target position is weighted 1.
  * The decoder's BOS id is `bos_id` (the model gives it its own embedding,
    usually id `codebook_size`), not 0, which is again a real code.

  Packing is off: image sequences are never shorter than their feature length.
  """

  def __init__(self, bos_id: int, **kwargs):
    kwargs.setdefault("pack", False)
    if kwargs["pack"]:
      raise ValueError("Image token sequences have a fixed length; packing is not supported.")
    super().__init__(bos_id=bos_id, **kwargs)

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
    converted = dict(super()._convert_example(features))
    converted["decoder_loss_weights"] = tf.ones_like(features["targets"])
    return converted

  def _convert_features(
    self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    def check_length(example):
      tf.debugging.assert_equal(
        tf.shape(example["targets"])[0],
        task_feature_lengths["targets"],
        message="image token sequence length differs from the targets feature length",
      )
      return example

    return super()._convert_features(ds.map(check_length), task_feature_lengths)


class ImageTextFeatureConverter(seqio.FeatureConverter):
  """Text tokens and raw images, for training that tokenizes images in the step.

  Output: `encoder_input_tokens` (padded text) and `images` (float32 in [0, 1]);
  the train step turns `images` into the decoder features with a frozen tokenizer.
  """

  TASK_FEATURES: ClassVar[dict] = {
    "inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    "image": seqio.FeatureConverter.FeatureSpec(dtype=tf.float32, rank=3),
  }
  MODEL_FEATURES: ClassVar[dict] = {
    "encoder_input_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    "images": seqio.FeatureConverter.FeatureSpec(dtype=tf.float32, rank=3),
  }
  PACKING_FEATURE_DTYPES = None

  def __init__(self, **kwargs):
    kwargs.setdefault("pack", False)
    super().__init__(**kwargs)

  def _convert_features(
    self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    lengths = {"inputs": task_feature_lengths["inputs"]}

    def pad(example):
      tokens = example["inputs"][: lengths["inputs"]]
      tokens = tf.pad(tokens, [[0, lengths["inputs"] - tf.shape(tokens)[0]]])
      tokens.set_shape([lengths["inputs"]])
      return {"encoder_input_tokens": tokens, "images": example["image"]}

    return ds.map(pad, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    return {
      "encoder_input_tokens": task_feature_lengths["inputs"],
      "images": task_feature_lengths["image"],
    }
