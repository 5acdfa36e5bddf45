"""Which shapes drawings a trained tokenizer's codebook can draw at all: each code decoded
on its own, and the shapes evaluator's reading of it.

    python bench/tokenizer_codebook_coverage.py --model_dir=runs/demo/tokenizer

With one token per grid cell (the demo's 48 px images in 16 px patches) and a per-patch
decoder (`decoder = "patch"`, no attention), every image the decoder can produce is a
tiling of its codes' patches. So the (color, shape, size) drawings that some code
decodes to are every object any Parti sampling this tokenizer can draw. A held-out
(color, shape) pair of the compositional split that no code draws bounds that split's
faithfulness at 0% for any text-to-image model on this tokenizer, whatever it learns.
With an attention decoder the reading is of each code among copies of itself, which is
an approximation (the script says so). A product codebook (`codebook_groups` > 1) is
read the same way over every combination of one code from each group.
"""

import collections

import numpy as np
from absl import app, flags

from parti.tasks.shapes import evaluate, spec
from parti.tokenizer import api

_MODEL_DIR = flags.DEFINE_string("model_dir", "runs/demo/tokenizer", "A trained tokenizer.")


def code_combinations(config) -> np.ndarray:
  """int32 [n, groups]: every combination of one code from each group's codebook."""
  per_group = config.codebook_size // config.codebook_groups
  grids = np.meshgrid(*[np.arange(per_group)] * config.codebook_groups, indexing="ij")
  local = np.stack([g.reshape(-1) for g in grids], axis=-1)
  return (local + per_group * np.arange(config.codebook_groups)).astype(np.int32)


def code_patches(tokenizer: api.ImageTokenizer) -> np.ndarray:
  """uint8 [n, patch, patch, 3]: each combination of codes (one per group; with one
  group, each code) decoded in the center cell of a grid of it."""
  rows, cols = tokenizer.config.patch_grid
  combinations = code_combinations(tokenizer.config)
  patch = tokenizer.config.patch_size
  patches = []
  for start in range(0, len(combinations), 64):
    chunk = combinations[start : start + 64]
    ids = np.broadcast_to(chunk[:, None, None, :], (len(chunk), rows, cols, chunk.shape[1]))
    images = tokenizer.decode(ids.reshape(len(chunk), *tokenizer.grid))
    y, x = (rows // 2) * patch, (cols // 2) * patch
    patches.append(images[:, y : y + patch, x : x + patch])
  return (np.clip(np.concatenate(patches), 0, 1) * 255 + 0.5).astype(np.uint8)


def read_drawing(patch: np.ndarray, image_size: int) -> tuple[str, str, str] | None:
  """(color, shape, size) of the one object in `patch`, set alone at the image's center on
  its own background; None when the evaluator finds no object or several."""
  border = np.concatenate([patch[0], patch[-1], patch[:, 0], patch[:, -1]])
  canvas = np.empty((image_size, image_size, 3), np.uint8)
  canvas[:] = np.median(border, axis=0).astype(np.uint8)
  offset = (image_size - patch.shape[0]) // 2
  canvas[offset : offset + patch.shape[0], offset : offset + patch.shape[1]] = patch
  found = evaluate.detect(canvas)
  if len(found) != 1:
    return None
  return found[0].color, found[0].shape, found[0].size


def main(argv):
  del argv
  tokenizer = api.ImageTokenizer.from_checkpoint(_MODEL_DIR.value)
  config = tokenizer.config
  if config.decoder != "patch":
    print(f"decoder {config.decoder!r} attends across patches: readings are approximate")
  drawings = [read_drawing(p, config.image_size) for p in code_patches(tokenizer)]
  objects = collections.Counter(d for d in drawings if d is not None)
  pairs = collections.Counter((color, shape) for color, shape, _ in objects.elements())
  groups = config.codebook_groups
  print(
    f"model_dir {_MODEL_DIR.value} (step {tokenizer.step}), {tokenizer.codebook_size} codes"
    + (f" in {groups} groups: {len(drawings)} combinations decoded" if groups > 1 else "")
  )
  codes = "combinations" if groups > 1 else "codes"
  print(f"{codes} that draw no object (background) or several: {drawings.count(None)}")
  print(f"{codes} that draw one object: {sum(objects.values())}")
  print(f"distinct (color, shape, size) drawings: {len(objects)}")
  print(f"distinct (color, shape) pairs: {len(pairs)} of {len(spec.COLORS) * len(spec.SHAPES)}")
  print(f"\nheld-out pair (compositional split)   {codes} that draw it")
  for color, shape in spec.DEFAULT_HELD_OUT:
    print(f"  {color:>8} {shape:<10}                      {pairs[(color, shape)]}")
  seen = [n for pair, n in pairs.items() if pair not in spec.DEFAULT_HELD_OUT]
  if seen:
    print(
      f"seen pairs: {len(seen)}, {codes} per pair: {min(seen)} to {max(seen)}, median {np.median(seen):.0f}"
    )


if __name__ == "__main__":
  app.run(main)
