"""seqio preprocessors for image-text records: decode, fix up or skip, crop, clean captions.

Every source yields `{"key", "image" (encoded bytes), "caption"}`; one Python path
(`parti.tasks.records`) then decodes every image format and cleans every caption,
so TFDS datasets, folders, TFRecords and tar shards all follow the same rules for
bad input. Skipped records are logged by key and counted in `records.SKIPPED`.
"""

from __future__ import annotations

import functools

import numpy as np
import seqio
import tensorflow as tf

from parti.tasks import records


@seqio.map_over_dataset(num_seeds=1)
def add_crop_seed(example: dict, seed: tf.Tensor) -> dict:
  """Gives each example its own stateless seed (for random crops), from seqio's seed."""
  return {**example, "crop_seed": seed}


def _prepare(key, image, caption, seed, *, image_size, random_crop, min_side, need_caption):
  name = key.decode("utf-8", errors="replace")
  try:
    text = records.clean_caption(caption, name) if need_caption else ""
    pixels = records.decode_image(image, min_side=min_side)
    rng = np.random.default_rng(seed.astype(np.uint32)) if random_crop else None
    pixels = records.resize_and_crop(pixels, image_size, rng)
    return pixels, text.encode("utf-8"), True
  except records.BadRecord as error:
    records.SKIPPED.skip(name, str(error))
    return np.zeros((image_size, image_size, 3), np.uint8), b"", False


def decode_image_text(
  dataset: tf.data.Dataset,
  *,
  image_size: int,
  random_crop: bool = False,
  min_side: int = 16,
  need_caption: bool = True,
) -> tf.data.Dataset:
  """Decodes and crops images to `image_size`, cleans captions, drops bad records.

  Output examples: {"key": string, "image": uint8 [image_size, image_size, 3], "caption": string}.
  """
  prepare = functools.partial(
    _prepare,
    image_size=image_size,
    random_crop=random_crop,
    min_side=min_side,
    need_caption=need_caption,
  )

  def convert(example):
    seed = example.get("crop_seed", tf.zeros([2], tf.int32))
    image, caption, ok = tf.numpy_function(
      prepare,
      [example["key"], example["image"], example["caption"], seed],
      (tf.uint8, tf.string, tf.bool),
      stateful=False,
    )
    image.set_shape([image_size, image_size, 3])
    caption.set_shape([])
    ok.set_shape([])
    return {"key": example["key"], "image": image, "caption": caption}, ok

  return (
    dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    .filter(lambda example, ok: ok)
    .map(lambda example, ok: example)
  )


def scale_to_unit(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """uint8 images -> float32 in [0, 1], the range the tokenizer reads."""
  return dataset.map(lambda ex: {**ex, "image": tf.cast(ex["image"], tf.float32) / 255.0})


def caption_to_inputs(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Renames `caption` to `inputs`, the feature seqio tokenizes for the encoder."""
  return dataset.map(lambda ex: {"inputs": ex["caption"], "image": ex["image"]})


def image_only(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Keeps only `image`, for tokenizer training."""
  return dataset.map(lambda ex: {"image": ex["image"]})
