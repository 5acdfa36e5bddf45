"""The upsampler on held-out shapes: PSNR against bicubic, and what the shapes evaluator
still sees after upsampling, and how sharp the edges are.

    python bench/upsampler_quality.py --model_dir=runs/upsampler [--examples=500]
      [--figure=docs/images/upsampler_crop.png]

Renders the test split's first --examples scenes at the upsampler's input and output
sizes (the pairs `parti_shapes_256_from_64` stores: each scene drawn at both), then
upsamples the small ones three ways: the trained upsampler, bicubic interpolation
(PIL's, as image tools do it) and nearest neighbour. Prints PSNR against the large
rendering, edge sharpness (the mean squared step between neighbouring pixels, relative
to the ground truth's) and the shapes evaluator's all-attributes accuracy of every
version, including the small originals and the large ground truth, and writes a crop
side by side: input (nearest), bicubic, ours, ground truth.
"""

from __future__ import annotations

import pathlib
import time

import numpy as np
from absl import app, flags
from PIL import Image

from parti.tasks.shapes import evaluate, render, scenes
from parti.upsampling.api import Upsampler

_MODEL_DIR = flags.DEFINE_string("model_dir", "runs/upsampler", "A parti.train_upsampler run.")
_EXAMPLES = flags.DEFINE_integer("examples", 500, "Test scenes upsampled.")
_SPLIT = flags.DEFINE_string("split", "test", "The shapes split the scenes come from.")
_SEED = flags.DEFINE_integer("seed", 0, "The shapes dataset seed (the prepared configs' is 0).")
_FIGURE = flags.DEFINE_string("figure", "", "Where to write the side-by-side crop (PNG).")
_BATCH = flags.DEFINE_integer("batch_size", 25, "Images per upsampler call.")


def psnr(images: np.ndarray, target: np.ndarray) -> float:
  """Mean PSNR in dB of float images in [0, 1]."""
  mse = np.mean((images - target) ** 2, axis=(1, 2, 3))
  return float(np.mean(-10 * np.log10(np.maximum(mse, 1e-10))))


def edge_energy(images: np.ndarray) -> float:
  """Mean squared difference between neighbouring pixels: blur spreads an edge's step
  over several pixels and lowers it, so a sharper image scores higher."""
  dy = np.diff(images, axis=1) ** 2
  dx = np.diff(images, axis=2) ** 2
  return float(dy.mean() + dx.mean())


def resized(images: np.ndarray, size: int, method) -> np.ndarray:
  """uint8 images through PIL's resize, as float in [0, 1]."""
  return np.stack(
    [np.asarray(Image.fromarray(x).resize((size, size), method), np.float32) / 255 for x in images]
  )


def accuracy(images: np.ndarray, examples) -> float:
  """Share of scenes whose every stated attribute the evaluator finds (uint8 images)."""
  return float(np.mean([evaluate.score(image, scene)["all"] for image, scene in
                        zip(images, examples, strict=True)]))  # fmt: skip


def to_uint8(images: np.ndarray) -> np.ndarray:
  return np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)


def crop_figure(path: pathlib.Path, versions: dict[str, np.ndarray], index: int, box) -> None:
  """One crop of each version, side by side with a label row, enlarged 2x (nearest)."""
  from PIL import ImageDraw

  top, left, side = box
  tiles = [Image.fromarray(to_uint8(v[index, top : top + side, left : left + side]))
           for v in versions.values()]  # fmt: skip
  tiles = [t.resize((side * 2, side * 2), Image.Resampling.NEAREST) for t in tiles]
  width = side * 2
  canvas = Image.new("RGB", (width * len(tiles) + 8 * (len(tiles) - 1), width + 18), "white")
  draw = ImageDraw.Draw(canvas)
  for k, (name, tile) in enumerate(zip(versions, tiles, strict=True)):
    canvas.paste(tile, (k * (width + 8), 18))
    draw.text((k * (width + 8) + 2, 3), name, fill="black")
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path)


def main(argv):
  del argv
  upsampler = Upsampler.from_checkpoint(_MODEL_DIR.value)
  cfg = upsampler.config
  examples = [scenes.make_scene(_SEED.value, _SPLIT.value, i) for i in range(_EXAMPLES.value)]
  small = np.stack([render.render(s, cfg.input_size) for s in examples])
  large = np.stack([render.render(s, cfg.output_size) for s in examples])
  truth = large.astype(np.float32) / 255
  start = time.perf_counter()
  ours = np.concatenate(
    [upsampler.upsample(small[i : i + _BATCH.value]) for i in range(0, len(small), _BATCH.value)]
  )
  seconds = time.perf_counter() - start
  versions = {
    "input (nearest)": resized(small, cfg.output_size, Image.Resampling.NEAREST),
    "bicubic": resized(small, cfg.output_size, Image.Resampling.BICUBIC),
    "ours": ours,
    "ground truth": truth,
  }
  print(f"upsampler {pathlib.Path(_MODEL_DIR.value).absolute()} step {upsampler.step}: "
        f"{cfg.input_size} -> {cfg.output_size}, {len(examples)} {_SPLIT.value} scenes, "
        f"{len(examples) / seconds:.1f} images/s (including the first call's compilation)")  # fmt: skip
  sharpest = edge_energy(truth)
  print(
    "| version | PSNR vs ground truth | edge sharpness (ground truth = 1) | shapes evaluator, "
    f"all attributes ({len(examples)} scenes) |"
  )
  print("|---|---|---|---|")
  print(f"| the {cfg.input_size} px originals | - | - | {accuracy(small, examples):.1%} |")
  for name, images in versions.items():
    shown = "-" if name == "ground truth" else f"{psnr(images, truth):.2f} dB"
    sharp = edge_energy(images) / sharpest
    print(f"| {name} | {shown} | {sharp:.2f} | {accuracy(to_uint8(images), examples):.1%} |")
  gain = psnr(ours, truth) - psnr(versions["bicubic"], truth)
  print(f"gain over bicubic: {gain:+.2f} dB")
  if _FIGURE.value:
    # The scene with the most objects, cropped around its first one.
    index = max(range(len(examples)), key=lambda i: len(examples[i].objects))
    y, x = examples[index].objects[0].center
    side = cfg.output_size // 3
    top = int(np.clip(y * cfg.output_size - side / 2, 0, cfg.output_size - side))
    left = int(np.clip(x * cfg.output_size - side / 2, 0, cfg.output_size - side))
    crop_figure(pathlib.Path(_FIGURE.value), versions, index, (top, left, side))
    print(f"wrote {_FIGURE.value}")


if __name__ == "__main__":
  app.run(main)
