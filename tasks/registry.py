"""Registers Parti's seqio tasks; import this module (or `import parti.tasks.registry` in gin).

Tasks, for each `parti_shapes` config C (32, 64, 128, 256, 64_10k, 48_20k, 48_20k_centered,
48_20k_factored, ...):

  parti_shapes_C           caption tokens + raw image (tokenized in the train step)
  parti_shapes_C_images    images only, for tokenizer training
  parti_shapes_C_pairs     `image` and `image_low`, the scene rendered at both sizes
                           (configs with a low resolution, such as 256_from_64: the
                           upsampler's exact pairs)
  parti_shapes_C_views     `image`, `image_recolored` and `image_reshaped` (configs with
                           views, such as 48_20k_factored: the palette tokenizer's data)

and `coco_captions_256` / `coco_captions_256_images` over a prepared TFDS
`coco_captions/2014`. Your own data and pre-encoded folders are registered with
`register_image_text_task` and `register_pre_encoded_task` (see README).
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable, Sequence

import seqio
import tensorflow as tf

from parti.tasks import preprocessors, sources, token_records, vocabularies
from parti.tasks.shapes import builder as shapes_builder

# Parti's text length in tokens: the default TASK_FEATURE_LENGTHS["inputs"] of the jobs.
TEXT_LENGTH = 128


def image_feature() -> seqio.Feature:
  return seqio.Feature(
    seqio.PassThroughVocabulary(size=0), add_eos=False, required=True, dtype=tf.float32, rank=3
  )


def text_feature(vocabulary: seqio.Vocabulary) -> seqio.Feature:
  return seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)


def register_image_text_task(
  name: str,
  source: seqio.DataSource,
  *,
  image_size: int,
  text_vocabulary: seqio.Vocabulary | None = None,
  random_crop: bool = False,
  min_side: int = 16,
  image_only: bool = False,
) -> seqio.Task:
  """Registers a task over standardized image-text records (see `parti.tasks.sources`).

  Args:
    name: the task name.
    source: a data source yielding {"key", "image" (bytes), "caption"}.
    image_size: side of the square images the task yields.
    text_vocabulary: the caption vocabulary (default: the shapes vocabulary).
    random_crop: crop at random (training) instead of at the center.
    min_side: images with a shorter side are skipped and counted.
    image_only: yield only images (tokenizer training); captions are not required.

  Returns:
    The registered task.
  """
  decode = functools.partial(
    preprocessors.decode_image_text,
    image_size=image_size,
    random_crop=random_crop,
    min_side=min_side,
    need_caption=not image_only,
  )
  steps: list[Callable] = [preprocessors.add_crop_seed] if random_crop else []
  steps += [decode, preprocessors.scale_to_unit]
  if image_only:
    steps.append(preprocessors.image_only)
    features = {"image": image_feature()}
  else:
    vocabulary = text_vocabulary or vocabularies.text_vocabulary()
    steps += [
      preprocessors.caption_to_inputs,
      seqio.preprocessors.tokenize,
      seqio.preprocessors.append_eos_after_trim,
    ]
    features = {"inputs": text_feature(vocabulary), "image": image_feature()}
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, source=source, preprocessors=steps, output_features=features)


def register_pre_encoded_task(
  name: str, data_dir: str, text_vocabulary: seqio.Vocabulary | None = None
) -> seqio.Task:
  """Registers a task over a pre-encoded folder (see `parti.tasks.token_records`).

  The image vocabulary's size comes from the folder's provenance.json, so the
  task always matches the tokenizer that encoded it.
  """
  provenance = token_records.read_provenance(data_dir)
  description = token_records.feature_description(provenance)
  splits = sorted({p.name.split("-")[0] for p in pathlib.Path(data_dir).glob("*.tfrecord")})
  if not splits:
    raise FileNotFoundError(f"Pre-encoded folder {data_dir} has no *.tfrecord shards.")
  source = seqio.TFExampleDataSource(
    {split: f"{data_dir}/{split}-*.tfrecord" for split in splits}, feature_description=description
  )

  def to_features(dataset):
    return dataset.map(
      lambda ex: {"inputs": ex["caption"], "targets": tf.cast(ex["image_tokens"], tf.int32)}
    )

  return register_text_to_tokens_task(
    name, source, to_features, provenance.codebook_size, text_vocabulary
  )


def register_text_to_tokens_task(
  name: str,
  source: seqio.DataSource,
  to_features: Callable,
  codebook_size: int,
  text_vocabulary: seqio.Vocabulary | None = None,
  metric_fns: Sequence[Callable] = (),
) -> seqio.Task:
  """Registers a task of caption tokens in and image tokens out.

  `to_features` maps the source's records to {"inputs": caption string, "targets":
  int32 image tokens}; the caption is then tokenized and ends in EOS, and the targets'
  vocabulary is the `codebook_size` image codes.
  """
  vocabulary = text_vocabulary or vocabularies.text_vocabulary()
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
    name,
    source=source,
    preprocessors=[
      to_features,
      seqio.preprocessors.tokenize,
      seqio.preprocessors.append_eos_after_trim,
    ],
    output_features={
      "inputs": text_feature(vocabulary),
      "targets": seqio.Feature(
        vocabularies.ImageVocabulary(codebook_size), add_eos=False, dtype=tf.int32
      ),
    },
    metric_fns=list(metric_fns),
  )


# --- The shapes dataset -----------------------------------------------------------------------


def _standardize_shapes(example: dict) -> dict:
  standard = {
    "key": tf.strings.join(["parti_shapes#", tf.strings.as_string(example["index"])]),
    "image": example["image"],
    "caption": example["caption"],
  }
  for name in ("image_low", *shapes_builder.VIEW_FEATURES.values()):
    if name in example:
      standard[name] = example[name]
  return standard


def _register_shapes(config: shapes_builder.PartiShapesConfig, data_dir: str | None = None) -> None:
  source = sources.TfdsSource(
    f"parti_shapes/{config.name}:{shapes_builder.PartiShapes.VERSION}",
    _standardize_shapes,
    data_dir=data_dir,
    splits=("train", "validation", "test", "compositional"),
    prepare_hint=(
      "Prepare it with `python -m parti.tasks.prepare_shapes "
      f"--gin_file=gin/data/prepare_shapes.gin --gin.DATA_DIR=DIR --gin.prepare_shapes.config='{config.name}'`."
    ),
  )
  for image_only in (False, True):
    register_image_text_task(
      f"parti_shapes_{config.name}" + ("_images" if image_only else ""),
      source,
      image_size=config.image_size,
      image_only=image_only,
    )
  if config.low_resolution is not None:
    sizes = {"image": config.image_size, "image_low": config.low_resolution}
    _register_image_set(f"parti_shapes_{config.name}_pairs", source, sizes)
  if config.views:
    sizes = {"image": config.image_size}
    sizes.update({name: config.image_size for name in shapes_builder.VIEW_FEATURES.values()})
    _register_image_set(f"parti_shapes_{config.name}_views", source, sizes)


def _register_image_set(name: str, source, sizes: dict[str, int]) -> None:
  """A task of several images of each scene, float32 [side, side, 3] in [0, 1] by `sizes`
  (feature name -> side), from the shapes records: `image` is left encoded by the source
  and decoded here, the others TFDS decodes. `_pairs`: `image` and `image_low`, the scene
  at two sizes; `_views`: `image` and its recolored and reshaped views."""

  def to_images(dataset):
    def convert(example):
      images = {key: example[key] for key in sizes}
      images["image"] = tf.io.decode_png(example["image"], channels=3)
      for key, side in sizes.items():
        images[key] = tf.ensure_shape(tf.cast(images[key], tf.float32) / 255.0, [side, side, 3])
      return images

    return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
    name,
    source=source,
    preprocessors=[to_images],
    output_features={key: image_feature() for key in sizes},
  )


# --- COCO captions (TFDS, prepared beforehand) -------------------------------------------------

COCO_TFDS_NAME = "coco_captions/2014:1.1.0"


def _standardize_coco(example: dict) -> dict:
  # One of the ~5 captions, chosen by the image id: deterministic across runs.
  captions = example["captions"]["text"]
  image_id = tf.cast(example["image/id"], tf.int32)
  pick = tf.random.stateless_uniform(
    [], seed=[image_id, 0], maxval=tf.shape(captions)[0], dtype=tf.int32
  )
  return {
    "key": tf.strings.join(["coco#", tf.strings.as_string(example["image/id"])]),
    "image": example["image"],
    "caption": captions[pick],
  }


def register_coco_captions(image_size: int = 256, data_dir: str | None = None) -> None:
  """Registers coco_captions_{image_size} and its _images twin over prepared TFDS data."""
  source = sources.TfdsSource(
    COCO_TFDS_NAME,
    _standardize_coco,
    data_dir=data_dir,
    splits=("train", "val", "test", "restval"),
    prepare_hint=(
      "Download COCO 2014 (train2014, val2014, annotations) and run "
      "`tfds build coco_captions --data_dir=DIR --manual_dir=...`, then pass DIR."
    ),
  )
  for image_only in (False, True):
    register_image_text_task(
      f"coco_captions_{image_size}" + ("_images" if image_only else ""),
      source,
      image_size=image_size,
      random_crop=False,
      image_only=image_only,
    )


for _config in shapes_builder.PartiShapes.BUILDER_CONFIGS:
  _register_shapes(_config)
register_coco_captions(256)

# Shapes and COCO together, for training on both (equal rates; COCO must be prepared).
seqio.MixtureRegistry.remove("parti_shapes_coco_256")
seqio.MixtureRegistry.add(
  "parti_shapes_coco_256", [("parti_shapes_256", 1.0), ("coco_captions_256", 1.0)]
)
