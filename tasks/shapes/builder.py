"""`parti_shapes`: the procedural shapes dataset as a TFDS builder.

Importing this module registers the builder with TFDS; then, for example,
`tfds.load("parti_shapes/64", split="test", data_dir=...)` prepares and reads it.

Configs `32`, `64` (default), `128` and `256` name the image side and hold 100k
training examples; `64_10k`, `48_20k`, `48_20k_centered` (the demo's: objects centered in
their cells) and `48_100k_centered` (the long demo's) are other cuts. A custom size, count
or placement is a `PartiShapesConfig` passed as `config=`. Example i of split s is a pure
function of (seed, s, i), so every machine prepares the same bytes.

A config with `low_resolution` also renders each scene at that side, as
`image_low`: exact pairs for the upsampler (`256_from_64`: 64 -> 256 px; `192_from_48`: the
long demo's 48 -> 192 px).

A config with `views` also renders each scene twice more, its colors (the background too)
drawn again (`image_recolored`) and its shapes drawn again (`image_reshaped`), never as a
held-out pair (`scenes.view`): what the palette tokenizer trains its groups apart on
(`48_20k_factored`, the demo's; `48_100k_factored`, the long demo's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from parti.tasks.shapes import render, scenes, spec

# The feature holding each view, by the factor it draws again (`scenes.VIEW_FACTORS`).
VIEW_FEATURES = {"color": "image_recolored", "shape": "image_reshaped"}
_VIEW_STREAM = 1


class PartiShapesConfig(tfds.core.BuilderConfig):
  """Image side, split sizes, held-out compositions and seed of one preparation."""

  def __init__(
    self,
    *,
    image_size: int = 64,
    num_train: int = 100_000,
    num_validation: int = 2_000,
    num_test: int = 2_000,
    num_compositional: int = 2_000,
    held_out: Sequence[tuple[str, str]] = spec.DEFAULT_HELD_OUT,
    seed: int = 0,
    low_resolution: int | None = None,
    placement: str = "jittered",
    views: bool = False,
    **kwargs,
  ):
    kwargs.setdefault("name", str(image_size))
    kwargs.setdefault(
      "description",
      f"{image_size}x{image_size} images; {num_train} train, {num_validation} validation, "
      f"{num_test} test and {num_compositional} compositional examples; seed {seed}; "
      f"{placement} objects" + (", with recolored and reshaped views." if views else "."),
    )
    super().__init__(**kwargs)
    for pair in held_out:
      if pair[0] not in spec.COLORS or pair[1] not in spec.SHAPES:
        raise ValueError(f"Held-out pair {pair} names an unknown color or shape.")
    if image_size < 16:
      raise ValueError(f"image_size must be at least 16 pixels, got {image_size}.")
    if low_resolution is not None and not 16 <= low_resolution < image_size:
      raise ValueError(
        f"low_resolution must lie in [16, image_size={image_size}), got {low_resolution}."
      )
    spec.check_placement(placement)
    self.image_size = image_size
    self.placement = placement
    self.low_resolution = low_resolution
    self.views = views
    self.split_sizes = {
      "train": num_train,
      "validation": num_validation,
      "test": num_test,
      "compositional": num_compositional,
    }
    self.held_out = tuple(tuple(pair) for pair in held_out)
    self.seed = seed


class PartiShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural compositional shapes with captions and structured scenes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
  BUILDER_CONFIGS: ClassVar[list[PartiShapesConfig]] = [
    PartiShapesConfig(image_size=64),
    PartiShapesConfig(image_size=32),
    PartiShapesConfig(image_size=128),
    PartiShapesConfig(image_size=256),
    PartiShapesConfig(name="64_10k", image_size=64, num_train=10_000, num_validation=500,
                      num_test=500, num_compositional=500),
    # 48 px puts each cell of the 3x3 layout on a 16 px patch (the demo's until 2026-12-01).
    PartiShapesConfig(name="48_20k", image_size=48, num_train=20_000, num_validation=500,
                      num_test=500, num_compositional=500),
    # The demo's: the same with each object centered in its cell, one side per size, so
    # every object is one of a few drawings and one code per cell can keep every scene.
    PartiShapesConfig(name="48_20k_centered", image_size=48, num_train=20_000,
                      num_validation=500, num_test=500, num_compositional=500,
                      placement="centered"),
    # The long demo's: the same scenes and more of them (its first 20k training examples
    # are the demo's), so that 20000 steps of 64 do not repeat each scene 64 times.
    PartiShapesConfig(name="48_100k_centered", image_size=48, num_train=100_000,
                      num_validation=500, num_test=500, num_compositional=500,
                      placement="centered"),
    # The demo's and the long demo's since 2026-12-07: the same scenes as the two above,
    # each also drawn recolored and reshaped, for the palette tokenizer.
    PartiShapesConfig(name="48_20k_factored", image_size=48, num_train=20_000,
                      num_validation=500, num_test=500, num_compositional=500,
                      placement="centered", views=True),
    PartiShapesConfig(name="48_100k_factored", image_size=48, num_train=100_000,
                      num_validation=500, num_test=500, num_compositional=500,
                      placement="centered", views=True),
    # The upsampler's: each scene rendered at 256 px and at 64 px; and the long demo's,
    # at 192 px and at the demo tokenizer's 48 px.
    PartiShapesConfig(name="256_from_64", image_size=256, low_resolution=64, num_train=8_000,
                      num_validation=200, num_test=500, num_compositional=200),
    PartiShapesConfig(name="192_from_48", image_size=192, low_resolution=48, num_train=8_000,
                      num_validation=200, num_test=500, num_compositional=200),
  ]  # fmt: skip
  DEFAULT_CONFIG_NAME = "64"

  @classmethod
  def _get_pkg_dir_path(cls):
    # TFDS guesses a builder's folder from its module name; ours is installed
    # as parti.tasks but lives in tasks/, so name the real folder.
    return epath.Path(__file__).parent

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    low = self.builder_config.low_resolution
    label = tfds.features.ClassLabel
    images = {"image": tfds.features.Image(shape=(size, size, 3))}
    if low is not None:
      images["image_low"] = tfds.features.Image(shape=(low, low, 3))
    if self.builder_config.views:
      for name in VIEW_FEATURES.values():
        images[name] = tfds.features.Image(shape=(size, size, 3))
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          **images,
          "caption": tfds.features.Text(),
          "kind": label(names=spec.KINDS),
          "background": label(names=list(spec.BACKGROUNDS)),
          "objects": tfds.features.Sequence(
            {
              "color": label(names=list(spec.COLORS)),
              "shape": label(names=spec.SHAPES),
              "size": label(names=spec.SIZES),
              "position": label(names=spec.POSITIONS),
              "center": tfds.features.Tensor(shape=(2,), dtype=np.float32),
              "side": tfds.features.Scalar(dtype=np.float32),
            }
          ),
          "mentions_size": tfds.features.Scalar(dtype=np.bool_),
          "mentions_position": tfds.features.Scalar(dtype=np.bool_),
          "mentions_background": tfds.features.Scalar(dtype=np.bool_),
          "relation": label(names=(scenes.NO_RELATION, *spec.RELATIONS)),
          "relation_subject": tfds.features.Scalar(dtype=np.int32),
          "relation_reference": tfds.features.Scalar(dtype=np.int32),
          "index": tfds.features.Scalar(dtype=np.int64),
        }
      ),
      supervised_keys=("caption", "image"),
      homepage="https://github.com/parti-jax/parti",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is generated; nothing is downloaded.
    return {split: self._generate_examples(split) for split in spec.SPLITS}

  def _generate_examples(self, split: str):
    config = self.builder_config
    for index in range(config.split_sizes[split]):
      scene = scenes.make_scene(config.seed, split, index, config.held_out, config.placement)
      example = scenes.to_example(scene)
      example["image"] = render.render(scene, config.image_size)
      if config.low_resolution is not None:
        example["image_low"] = render.render(scene, config.low_resolution)
      if config.views:
        # Its own stream, so that the scenes are those of the same config without views.
        rng = np.random.default_rng([config.seed, spec.SPLITS.index(split), index, _VIEW_STREAM])
        for factor, name in VIEW_FEATURES.items():
          viewed = scenes.view(scene, factor, rng, config.held_out)
          example[name] = render.render(viewed, config.image_size)
      example["index"] = index
      yield index, example
