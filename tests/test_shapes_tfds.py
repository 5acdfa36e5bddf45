"""The `parti_shapes` TFDS builder prepares every split and stores the scene with the image."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from parti.runtime.errors import ConfigError
from parti.tasks import prepare_shapes
from parti.tasks.shapes import builder, evaluate, render, scenes, spec


@pytest.fixture
def prepared(shapes_tfds):
  return shapes_tfds[0]


def test_every_split_is_prepared(prepared):
  splits = prepared.info.splits
  assert {name: splits[name].num_examples for name in spec.SPLITS} == {
    "train": 40, "validation": 8, "test": 8, "compositional": 8,
  }  # fmt: skip


def test_examples_hold_the_scene_they_render(prepared):
  for example in tfds.as_numpy(prepared.as_dataset(split="compositional")):
    scene = scenes.make_scene(0, "compositional", int(example["index"]))
    assert scenes.from_example(example).caption == scene.caption
    np.testing.assert_array_equal(example["image"], render.render(scene, 32))
    assert example["caption"].decode() == scene.caption


def test_named_configs():
  names = {c.name: c.image_size for c in builder.PartiShapes.BUILDER_CONFIGS}
  assert names == {
    "32": 32, "64": 64, "128": 128, "256": 256, "64_10k": 64, "48_20k": 48,
    "48_20k_centered": 48, "48_100k_centered": 48, "48_20k_factored": 48,
    "48_100k_factored": 48, "256_from_64": 256, "192_from_48": 192,
  }  # fmt: skip
  placements = {c.name: c.placement for c in builder.PartiShapes.BUILDER_CONFIGS}
  demo_configs = ("48_20k_centered", "48_100k_centered", "48_20k_factored", "48_100k_factored")
  assert {placements.pop(name) for name in demo_configs} == {"centered"}
  assert set(placements.values()) == {"jittered"}
  views = {c.name for c in builder.PartiShapes.BUILDER_CONFIGS if c.views}
  assert views == {"48_20k_factored", "48_100k_factored"}
  # The long demo's config is the demo's with more training scenes: since example i of a
  # split depends only on (seed, split, i), the demo's scenes are its first ones.
  configs = {c.name: c for c in builder.PartiShapes.BUILDER_CONFIGS}
  demo, long = configs["48_20k_factored"], configs["48_100k_factored"]
  for same in ("48_20k_centered", "48_100k_centered"):
    # The factored configs draw the centered ones' scenes (and their views beside them).
    assert (configs[same].seed, configs[same].held_out) == (demo.seed, demo.held_out)
  assert configs["48_20k_centered"].split_sizes == demo.split_sizes
  assert (long.seed, long.held_out) == (demo.seed, demo.held_out)
  assert {s: n for s, n in long.split_sizes.items() if s != "train"} == {
    s: n for s, n in demo.split_sizes.items() if s != "train"
  }
  assert long.split_sizes["train"] == 5 * demo.split_sizes["train"]
  lows = {c.name: c.low_resolution for c in builder.PartiShapes.BUILDER_CONFIGS if c.low_resolution}
  assert lows == {"256_from_64": 64, "192_from_48": 48}
  assert builder.PartiShapes.DEFAULT_CONFIG_NAME == "64"
  demo = next(c for c in builder.PartiShapes.BUILDER_CONFIGS if c.name == "48_20k")
  assert demo.split_sizes == {
    "train": 20_000, "validation": 500, "test": 500, "compositional": 500
  }  # fmt: skip


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    (dict(image_size=8), "at least 16"),
    (dict(held_out=[("teal", "circle")]), "unknown color"),
    (dict(image_size=64, low_resolution=64), "low_resolution must lie in"),
    (dict(image_size=64, low_resolution=8), "low_resolution must lie in"),
    (dict(placement="random"), "Unknown placement 'random'"),
  ],
)
def test_bad_config(kwargs, message):
  with pytest.raises(ValueError, match=message):
    builder.PartiShapesConfig(name="bad", **kwargs)


def test_evaluator_reads_prepared_examples(prepared):
  results = [
    (scene.kind, evaluate.score(example["image"], scene))
    for example in tfds.as_numpy(prepared.as_dataset(split="test"))
    for scene in [scenes.from_example(example)]
  ]
  assert len(results) == 8
  assert all(r["count"] and r["color"] for _, r in results)


def test_a_custom_centered_config_is_prepared_with_centered_objects(tmp_path):
  shapes = prepare_shapes.prepare_shapes(
    data_dir=str(tmp_path), config="tiny_centered", image_size=48, num_train=6, num_eval=3,
    placement="centered",
  )  # fmt: skip
  for example in tfds.as_numpy(shapes.as_dataset(split="test")):
    scene = scenes.from_example(example)
    expected = scenes.make_scene(0, "test", int(example["index"]), placement="centered")
    assert scene.caption == expected.caption
    np.testing.assert_array_equal(example["image"], render.render(expected, 48))
    for obj in scene.objects:
      row, col = divmod(obj.position, 3)
      np.testing.assert_allclose(obj.center, ((row + 0.5) / 3, (col + 0.5) / 3), atol=1e-6)
  with pytest.raises(ConfigError, match="needs a new name"):
    prepare_shapes.prepare_shapes(data_dir=str(tmp_path), config="48_20k", placement="centered")


def test_a_views_config_renders_each_scene_recolored_and_reshaped(tmp_path):
  import seqio

  from parti.tasks import registry

  shapes = prepare_shapes.prepare_shapes(
    data_dir=str(tmp_path), config="tiny_views", image_size=48, num_train=6, num_eval=3,
    placement="centered", views=True,
  )  # fmt: skip
  config = shapes.builder_config
  for example in tfds.as_numpy(shapes.as_dataset(split="train")):
    index = int(example["index"])
    scene = scenes.make_scene(0, "train", index, placement="centered")
    # The scenes are those of the same config without views.
    np.testing.assert_array_equal(example["image"], render.render(scene, 48))
    rng = np.random.default_rng([0, spec.SPLITS.index("train"), index, builder._VIEW_STREAM])
    for factor, name in builder.VIEW_FEATURES.items():
      viewed = scenes.view(scene, factor, rng, config.held_out)
      np.testing.assert_array_equal(example[name], render.render(viewed, 48))
  seqio.set_tfds_data_dir_override(str(tmp_path))
  registry._register_shapes(config)
  batch = next(
    seqio.get_mixture_or_task("parti_shapes_tiny_views_views")
    .get_dataset(None, split="train", shuffle=False)
    .as_numpy_iterator()
  )
  assert set(batch) == {"image", "image_recolored", "image_reshaped"}
  for image in batch.values():
    assert image.shape == (48, 48, 3) and image.dtype == np.float32 and image.max() <= 1.0
