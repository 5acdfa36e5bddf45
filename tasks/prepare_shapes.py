"""Prepares the `parti_shapes` TFDS dataset: the first stage of the demo.

    python -m parti.tasks.prepare_shapes --gin_file=gin/data/prepare_shapes.gin \
      --gin.DATA_DIR=runs/tfds

Writes DATA_DIR/parti_shapes/CONFIG/1.0.0, and a contact sheet of 16 test
examples with their captions, DATA_DIR/parti_shapes_CONFIG_preview.png. Preparing
is skipped when that
version is already complete; TFDS writes into an `incomplete.*` folder and
renames it at the end, so a killed run leaves no half-prepared dataset.
"""

from __future__ import annotations

import pathlib
import time

import gin

from parti.evaluation import contact_sheet
from parti.runtime import files, gin_utils
from parti.runtime.errors import ConfigError
from parti.tasks.shapes import builder, render, scenes


def prepare_shapes(
  *,
  data_dir: str,
  config: str = "64",
  image_size: int | None = None,
  num_train: int | None = None,
  num_eval: int | None = None,
  seed: int = 0,
  placement: str | None = None,
  views: bool | None = None,
) -> builder.PartiShapes:
  """Prepares a named config, or a custom one when sizes or counts are given.

  Args:
    data_dir: the TFDS data dir.
    config: a named config (32, 64, 128, 256, 64_10k, 48_20k, 48_20k_centered,
      48_100k_centered, 48_20k_factored, 48_100k_factored, 256_from_64, 192_from_48), or
      the name of a custom one.
    image_size: for a custom config, the image side.
    num_train: for a custom config, training examples.
    num_eval: for a custom config, examples in each of validation, test and compositional.
    seed: for a custom config, the dataset seed.
    placement: for a custom config, "jittered" (the default) or "centered" objects.
    views: for a custom config, also render each scene recolored and reshaped.

  Returns:
    The prepared builder.
  """
  named = {c.name: c for c in builder.PartiShapes.BUILDER_CONFIGS}
  custom = any(v is not None for v in (image_size, num_train, num_eval, placement, views))
  if custom:
    if config in named:
      raise ConfigError(
        f"A custom shapes config needs a new name, not the named config {config!r}."
      )
    shapes_config = builder.PartiShapesConfig(
      name=config,
      image_size=image_size or 64,
      num_train=num_train or 10_000,
      num_validation=num_eval or 500,
      num_test=num_eval or 500,
      num_compositional=num_eval or 500,
      seed=seed,
      placement=placement or "jittered",
      views=bool(views),
    )
  elif config in named:
    shapes_config = named[config]
  else:
    raise ConfigError(f"Unknown shapes config {config!r}; named ones: {sorted(named)}.")
  shapes = builder.PartiShapes(config=shapes_config, data_dir=data_dir)
  if shapes.is_prepared():
    print(f"parti_shapes/{config} is already prepared in {shapes.data_dir}")
  else:
    start = time.perf_counter()
    shapes.download_and_prepare()
    total = sum(split.num_examples for split in shapes.info.splits.values())
    seconds = time.perf_counter() - start
    print(f"Prepared {total} examples of parti_shapes/{config} in {seconds:.0f}s "
          f"({total / seconds:.0f} examples/s) at {shapes.data_dir}")  # fmt: skip
  _write_preview(shapes, pathlib.Path(data_dir) / f"parti_shapes_{config}_preview.png")
  return shapes


def _write_preview(shapes: builder.PartiShapes, path: pathlib.Path, count: int = 16) -> None:
  config = shapes.builder_config
  count = min(count, config.split_sizes["test"])
  if count == 0:
    return
  chosen = [
    scenes.make_scene(config.seed, "test", i, config.held_out, config.placement)
    for i in range(count)
  ]
  images = [render.render(scene, config.image_size) for scene in chosen]
  files.atomic_write_bytes(path, contact_sheet.contact_sheet(images, [s.caption for s in chosen]))
  print(f"Wrote a preview of the test split to {path}")


configured_prepare_shapes = gin.external_configurable(prepare_shapes)

if __name__ == "__main__":
  gin_utils.run(configured_prepare_shapes)
