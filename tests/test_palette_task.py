"""The palette task: shapes scenes as palette-code grids, for t5x's jobs (docs/t5x.md)."""

from __future__ import annotations

import numpy as np
import pytest
import seqio

from parti.tasks import palette
from parti.tasks.shapes import render, scenes, spec


def test_codes_name_each_pixels_palette_color_and_invert():
  scene = scenes.make_scene(palette.SEED, "validation", 1)
  image = render.render(scene, 8)
  codes = palette.palette_codes(image)
  assert codes.shape == (64,) and codes.dtype == np.int32
  background = palette.PALETTE.index(spec.BACKGROUNDS[scene.background])
  assert (codes == background).mean() > 0.5  # Mostly background...
  drawn = {palette.PALETTE.index(spec.COLORS[obj.color]) for obj in scene.objects}
  assert set(np.unique(codes)) - {background} <= drawn  # ...and only the scene's colors.
  np.testing.assert_array_equal(palette.palette_codes(palette.palette_image(codes, 8)), codes)


def test_bad_codes_and_images_are_refused():
  with pytest.raises(ValueError, match="RGB image"):
    palette.palette_codes(np.zeros((8, 8), np.uint8))
  with pytest.raises(ValueError, match="Expected 64 codes"):
    palette.palette_image(np.zeros(63, np.int32), 8)
  with pytest.raises(ValueError, match="Codes must lie in"):
    palette.palette_image(np.full(64, len(palette.PALETTE)), 8)


def test_task_yields_tokenized_captions_and_the_grid():
  task = seqio.get_mixture_or_task("parti_shapes_palette_8")
  dataset = task.get_dataset({"inputs": 32, "targets": 64}, split="test", shuffle=False)
  examples = list(dataset.take(3).as_numpy_iterator())
  vocabulary = task.output_features["inputs"].vocabulary
  for index, example in enumerate(examples):
    expected = palette.example("test", index, 8)
    assert vocabulary.decode(example["inputs"].tolist()) == expected["caption"]
    np.testing.assert_array_equal(example["targets"], expected["targets"])
  assert task.output_features["targets"].vocabulary.vocab_size == len(palette.PALETTE)


def test_metrics_count_cells_and_object_cells():
  background = len(spec.COLORS)  # The first background code.
  target = [0, 0, background, background]
  metrics = palette.palette_metrics([target, target], [[0, 1, background, background], target])
  assert metrics == {"cell_accuracy": 87.5, "object_cell_accuracy": 75.0}
  only_background = palette.palette_metrics([target], [[background] * 4])
  assert only_background == {"cell_accuracy": 50.0, "object_cell_accuracy": 0.0}
  with pytest.raises(ValueError, match="differ"):
    palette.palette_metrics([target], [[0, 0]])


def test_token_folder_trains_like_a_tokenizers_output(tmp_path):
  from parti.tasks import registry, token_records

  palette.write_token_folder(str(tmp_path), 8, {"train": 3, "validation": 2})
  provenance = token_records.read_provenance(tmp_path)
  assert provenance.codebook_size == len(palette.PALETTE) and tuple(provenance.grid) == (8, 8)
  task = registry.register_pre_encoded_task("palette_test_tokens", str(tmp_path))
  dataset = task.get_dataset({"inputs": 32, "targets": 64}, split="validation", shuffle=False)
  examples = list(dataset.as_numpy_iterator())
  assert len(examples) == 2
  for index, got in enumerate(examples):
    np.testing.assert_array_equal(
      got["targets"], palette.example("validation", index, 8)["targets"]
    )
