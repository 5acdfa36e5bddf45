"""Shapes scenes as palette grids: a text-to-token seqio task that needs nothing prepared.

Each example is a shapes caption and its scene drawn at `grid` x `grid` pixels, each
pixel written as the index of its nearest palette color (the 8 object colors, then
the 3 backgrounds: 11 "codes"). It stands in for a pre-encoded task where no
tokenizer has run yet: the t5x guide (docs/t5x.md) trains and samples on it, and a
model that learns it draws the caption's colors in the caption's places.

Scenes come from `parti.tasks.shapes.scenes.make_scene`, so a split is the same
sequence of scenes as the TFDS builder's; no TFDS data is read or written.

Tasks: `parti_shapes_palette_G` for G in PALETTE_GRIDS (G * G target tokens).
"""

from __future__ import annotations

import pathlib

import numpy as np
import seqio
import tensorflow as tf

from parti.tasks import registry, token_records
from parti.tasks.shapes import render, scenes, spec

# Object colors first, then backgrounds: index i is code i.
PALETTE: tuple[tuple[int, int, int], ...] = tuple(spec.COLORS.values()) + tuple(
  spec.BACKGROUNDS.values()
)
PALETTE_GRIDS = (8, 16)
SPLIT_SIZES = {"train": 20_000, "validation": 512, "test": 512, "compositional": 512}
SEED = 0


def palette_codes(image: np.ndarray) -> np.ndarray:
  """Each pixel of an RGB uint8 image as the index of its nearest PALETTE color, int32 [H*W]."""
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"Expected an RGB image [H, W, 3], got shape {image.shape}.")
  palette = np.asarray(PALETTE, np.int32)
  distances = np.sum((image.reshape(-1, 1, 3).astype(np.int32) - palette) ** 2, axis=-1)
  return np.argmin(distances, axis=-1).astype(np.int32)


def palette_image(codes: np.ndarray, grid: int) -> np.ndarray:
  """The inverse of `palette_codes`: [grid*grid] codes as a uint8 [grid, grid, 3] image."""
  codes = np.asarray(codes)
  if codes.shape != (grid * grid,):
    raise ValueError(f"Expected {grid * grid} codes, got shape {codes.shape}.")
  if codes.min() < 0 or codes.max() >= len(PALETTE):
    raise ValueError(f"Codes must lie in [0, {len(PALETTE)}), got {codes.min()}..{codes.max()}.")
  return np.asarray(PALETTE, np.uint8)[codes].reshape(grid, grid, 3)


def example(split: str, index: int, grid: int) -> dict[str, object]:
  """{"caption", "targets"} for scene `index` of `split`."""
  scene = scenes.make_scene(SEED, split, index)
  return {"caption": scene.caption, "targets": palette_codes(render.render(scene, grid))}


def palette_metrics(targets, predictions) -> dict[str, float]:
  """seqio metrics of sampled grids against the scenes' own (lists of codes each).

  cell_accuracy: the fraction of cells with the right code. object_cell_accuracy:
  the same over the cells the scene's objects cover (codes below the backgrounds'),
  which a model that paints only background scores 0 on.
  """
  targets = np.asarray([list(t) for t in targets], np.int32)
  predictions = np.asarray([list(p) for p in predictions], np.int32)
  if targets.shape != predictions.shape:
    raise ValueError(f"Targets {targets.shape} and predictions {predictions.shape} differ.")
  right = targets == predictions
  objects = targets < len(spec.COLORS)
  return {
    "cell_accuracy": 100.0 * float(right.mean()),
    "object_cell_accuracy": 100.0 * float(right[objects].mean()) if objects.any() else 0.0,
  }


def _source(grid: int) -> seqio.FunctionDataSource:
  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # One generator per split; seqio's shuffle buffer shuffles.

    def generate():
      for index in range(SPLIT_SIZES[split]):
        yield example(split, index, grid)

    return tf.data.Dataset.from_generator(
      generate,
      output_signature={
        "caption": tf.TensorSpec([], tf.string),
        "targets": tf.TensorSpec([grid * grid], tf.int32),
      },
    )

  return seqio.FunctionDataSource(
    dataset_fn, splits=tuple(SPLIT_SIZES), num_input_examples=SPLIT_SIZES
  )


def register_palette_task(grid: int) -> seqio.Task:
  """Registers `parti_shapes_palette_{grid}`: caption tokens in, grid*grid palette codes out."""
  name = f"parti_shapes_palette_{grid}"

  def to_features(dataset):
    return dataset.map(lambda ex: {"inputs": ex["caption"], "targets": ex["targets"]})

  return registry.register_text_to_tokens_task(
    name, _source(grid), to_features, len(PALETTE), metric_fns=[palette_metrics]
  )


def write_token_folder(folder: str, grid: int, examples: dict[str, int]) -> None:
  """Writes the palette task as a pre-encoded folder (`parti.tasks.token_records`), so
  that `parti.train` trains on it as on a tokenizer's output: `examples` per split."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  token_records.write_provenance(
    folder, token_records.Provenance("palette", len(PALETTE), (grid, grid), grid, f"palette_{grid}")
  )
  for split, count in examples.items():
    records = (
      token_records.serialize(f"{split}{i}", ex["caption"], ex["targets"])
      for i, ex in enumerate(example(split, i, grid) for i in range(count))
    )
    token_records.write_shard(folder / token_records.shard_name(split, 0, 0), records)


for _grid in PALETTE_GRIDS:
  register_palette_task(_grid)
