"""Draws a shapes scene: solid fills with anti-aliased edges, by 4x supersampling.

PIL draws aliased polygons; drawing at 4x the size and box-filtering down gives
each edge pixel the fraction of its area the shape covers.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from parti.tasks.shapes import spec

SUPERSAMPLE = 4


@functools.cache
def unit_outline(shape: str) -> tuple[tuple[float, float], ...]:
  """The polygon of `shape` in a unit box [-0.5, 0.5]^2, as (x, y) with y down."""
  if shape == "square":
    return ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5))
  if shape == "triangle":  # Apex up.
    return ((0.0, -0.5), (0.5, 0.5), (-0.5, 0.5))
  if shape == "diamond":
    return ((0.0, -0.5), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0))
  if shape == "cross":  # A plus sign with arms a third of the side wide.
    a, b = 1 / 6, 0.5
    return (
      (-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
      (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a),
    )  # fmt: skip
  if shape == "star":  # Five points, scaled so its bounding box fills the unit box.
    inner = math.sin(math.radians(18)) / math.sin(math.radians(126))
    points = []
    for k in range(10):
      radius = 1.0 if k % 2 == 0 else inner
      angle = math.radians(-90 + 36 * k)
      points.append((radius * math.cos(angle), radius * math.sin(angle)))
    xs, ys = zip(*points, strict=True)
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    scale = max(max(xs) - min(xs), max(ys) - min(ys))
    return tuple(((x - cx) / scale, (y - cy) / scale) for x, y in points)
  if shape == "circle":
    return ()  # Drawn as an ellipse.
  raise ValueError(f"Unknown shape {shape!r}; known: {spec.SHAPES}.")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, center_xy, side: float, fill) -> None:
  """Draws `shape` with its bounding box of `side` pixels centered at `center_xy`."""
  cx, cy = center_xy
  if shape == "circle":
    r = side / 2
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
  else:
    draw.polygon([(cx + x * side, cy + y * side) for x, y in unit_outline(shape)], fill=fill)


def render(scene: spec.Scene, image_size: int) -> np.ndarray:
  """The scene as a uint8 [image_size, image_size, 3] RGB image."""
  big = image_size * SUPERSAMPLE
  image = Image.new("RGB", (big, big), spec.BACKGROUNDS[scene.background])
  draw = ImageDraw.Draw(image)
  for obj in scene.objects:
    y, x = obj.center
    draw_shape(draw, obj.shape, (x * big, y * big), obj.side * big, spec.COLORS[obj.color])
  return np.asarray(image.resize((image_size, image_size), Image.Resampling.BOX))


def coverage_map(
  shape: str,
  window: tuple[int, int],
  center_yx: tuple[float, float],
  side: float,
  supersample: int = 8,
) -> np.ndarray:
  """How much of each pixel of a `window` (rows, cols) `shape` covers, in [0, 1].

  The shape's bounding box has `side` pixels and is centered at `center_yx`
  (window coordinates, pixel units); the evaluator compares objects with these.
  """
  rows, cols = window
  image = Image.new("L", (cols * supersample, rows * supersample), 0)
  y, x = center_yx
  draw_shape(
    ImageDraw.Draw(image), shape, (x * supersample, y * supersample), side * supersample, 255
  )
  small = image.resize((cols, rows), Image.Resampling.BOX)
  return np.asarray(small, np.float32) / 255.0
