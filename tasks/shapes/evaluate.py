"""The shapes evaluator: does an image show what its prompt says?

This is the project's objective text-image faithfulness metric. Given an image
and the scene its prompt describes, it

1. finds the background (the palette background nearest the border pixels);
2. segments the image by nearest palette color, keeping only pixels close to a
   palette color (anti-aliased edges blend two colors and are ignored);
3. splits each color mask into connected components and drops specks;
4. recovers each object's anti-aliased coverage (how much of its color each
   pixel holds), and from it the sub-pixel bounding box, hence size (against
   spec.SIZE_THRESHOLD), grid cell and center, and the shape (the renderer's
   own drawing of each candidate at that geometry, nearest in L1);
5. matches detected objects to the prompt's objects and checks each attribute
   the prompt states.

It needs no TensorFlow and runs on numpy arrays.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Iterable, Mapping

import numpy as np
from scipy import ndimage

from parti.tasks.shapes import render, spec

# A pixel belongs to a color only if it lies this close (RGB distance) to it;
# half the smallest palette distance (yellow-orange, ~73) keeps classes apart.
_MAX_COLOR_DISTANCE = 36.0
# Components smaller than this fraction of the smallest object's area are specks.
_MIN_AREA_FRACTION = 0.25
# Coverage below this share of the color-background contrast counts as background,
# and above 1 minus it as full color, linearly between. Rendered images need no floor,
# but decoded ones err both ways: a tokenizer's faint halo around a small object (8 of
# 255 levels) made its sub-pixel extent a pixel wider on each side, and a small square
# measured that way is nearer the circle drawn at the wider size; a floor too high cuts
# off a small star's blurred points, and the star reads as a diamond. On the demo's
# tokenizer (500 test scenes kept) and the long demo's Parti (500 test prompts, λ 1),
# floors 0 / 0.1 / 0.15 / 0.2 / 0.25 read 94.4 / 94.8 / 97.4 / 96.2 / 96.2% and
# 94.2 / 97.1 / 98.7 / 98.2 / 98.0% (bench/README.md). 0.5 stays 0.5, so areas are
# unchanged, and an anti-aliased edge pixel below the floor moves an extent by at most
# 0.15 pixel.
_COVERAGE_NOISE_FLOOR = 0.15
# Centers must differ by this fraction of the image side for "left of" / "above".
_RELATION_MARGIN = 0.08

ATTRIBUTES = ("count", "color", "shape", "size", "position", "relation", "background", "all")


@dataclasses.dataclass(frozen=True)
class DetectedObject(spec.SceneObject):
  """An object found in an image, and how many pixels it covers."""

  area: int = 0


def detect_background(image: np.ndarray) -> str:
  """The background whose color is nearest the median border pixel."""
  border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
  median = np.median(border, axis=0)
  return min(spec.BACKGROUNDS, key=lambda n: np.linalg.norm(median - spec.BACKGROUNDS[n]))


def detect(image: np.ndarray, background: str | None = None) -> list[DetectedObject]:
  """Finds the objects in a uint8 [S, S, 3] image, largest first."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
    raise ValueError(f"Expected a square RGB image [S, S, 3], got shape {image.shape}.")
  size = image.shape[0]
  background = background or detect_background(image)
  names = [n for n in spec.COLORS if spec.CLASHES.get(n) != background]
  palette = np.array([spec.COLORS[n] for n in names] + [spec.BACKGROUNDS[background]], np.float32)
  squared = ((image.astype(np.float32)[:, :, None, :] - palette) ** 2).sum(-1)
  nearest = squared.argmin(-1)
  # Pixels near a palette color, labelled by it; the last label is the background.
  classes = np.where(squared.min(-1) <= _MAX_COLOR_DISTANCE**2, nearest, len(names))
  smallest_side = spec.SIZE_RANGES["small"][0] * size
  min_area = max(2, int(_MIN_AREA_FRACTION * smallest_side**2 * 0.4))  # A star fills ~40%.
  found = []
  present, counts = np.unique(classes, return_counts=True)
  for index in present[(present < len(names)) & (counts >= min_area)]:
    name = names[index]
    labels, _ = ndimage.label(classes == index, structure=np.ones((3, 3)))
    coverage = None
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
      seed = labels == label
      if seed[box].sum() < min_area:
        continue
      if coverage is None:
        coverage = _coverage(image, spec.COLORS[name], spec.BACKGROUNDS[background])
      # The object is every pixel near its pure core that is at least half its color.
      near = ndimage.binary_dilation(seed, iterations=2)
      found.append(_describe(name, np.where(near, coverage, 0.0), size))
  return sorted(found, key=lambda o: -o.area)


def _coverage(image: np.ndarray, color, background) -> np.ndarray:
  """Per pixel, the fraction of `color` blended over `background` (0..1).

  An anti-aliased edge pixel is `a * color + (1 - a) * background`; projecting it
  onto the color-background line recovers `a`, so thresholding at 0.5 redraws the
  object as the renderer's supersampled polygon did. Values within the noise floor
  of either end are snapped to it (see _COVERAGE_NOISE_FLOOR).
  """
  direction = np.asarray(color, np.float32) - np.asarray(background, np.float32)
  offset = image.astype(np.float32) - np.asarray(background, np.float32)
  fraction = offset @ direction / float(direction @ direction)
  floor = _COVERAGE_NOISE_FLOOR
  return np.clip((fraction - floor) / (1.0 - 2.0 * floor), 0.0, 1.0)


def _extent(profile: np.ndarray) -> tuple[float, float]:
  """Sub-pixel (start, stop) of a coverage profile along one axis."""
  (cells,) = np.nonzero(profile > 0.05)
  first, last = cells[0], cells[-1]
  return first + 1 - profile[first], last + profile[last]


def _describe(color: str, coverage: np.ndarray, size: int) -> DetectedObject:
  """Reads one object's geometry and shape from its coverage map."""
  y0, y1 = _extent(coverage.max(axis=1))
  x0, x1 = _extent(coverage.max(axis=0))
  side = max(y1 - y0, x1 - x0)
  center = ((y0 + y1) / 2, (x0 + x1) / 2)
  row = min(int(center[0] / size * 3), 2)
  col = min(int(center[1] / size * 3), 2)
  return DetectedObject(
    color=color,
    shape=classify_shape(coverage, center, side),
    size="large" if side / size > spec.SIZE_THRESHOLD else "small",
    position=row * 3 + col,
    center=(center[0] / size, center[1] / size),
    side=side / size,
    area=int((coverage > 0.5).sum()),
  )


def classify_shape(coverage: np.ndarray, center: tuple[float, float], side: float) -> str:
  """The shape whose rendering at (`center`, `side`) best matches `coverage`.

  Analysis by synthesis: each candidate is drawn with the dataset's own renderer
  at the measured sub-pixel geometry, so even 5-pixel objects are compared
  like with like rather than after a lossy resize.
  """
  pad = 2
  ys = slice(max(0, int(center[0] - side / 2) - pad), int(center[0] + side / 2) + pad + 1)
  xs = slice(max(0, int(center[1] - side / 2) - pad), int(center[1] + side / 2) + pad + 1)
  window = coverage[ys, xs]
  offset = (center[0] - ys.start, center[1] - xs.start)

  def distance(shape: str) -> float:
    template = render.coverage_map(shape, window.shape, offset, side)
    return float(np.abs(template - window).sum())

  return min(spec.SHAPES, key=distance)


def score(image: np.ndarray, scene: spec.Scene) -> dict[str, bool]:
  """Checks each attribute `scene`'s prompt states; the unstated ones are absent.

  Returns:
    attribute -> correct, for "count", "color", "shape", "all", and whichever of
    "size", "position", "relation" and "background" the prompt states.
  """
  background = detect_background(image)
  detected = detect(image, background)
  wanted = scene.objects
  result = {"count": len(detected) == len(wanted)}
  best = _best_assignment(wanted, detected, scene)
  result["color"] = all(
    d is not None and d.color == w.color for w, d in zip(wanted, best, strict=True)
  )
  result["shape"] = all(
    d is not None and (d.color, d.shape) == (w.color, w.shape)
    for w, d in zip(wanted, best, strict=True)
  )
  if scene.mentions_size:
    result["size"] = all(
      d is not None and d.size == w.size for w, d in zip(wanted, best, strict=True)
    )
  if scene.mentions_position:
    result["position"] = all(
      d is not None and d.position == w.position for w, d in zip(wanted, best, strict=True)
    )
  if scene.relation is not None:
    result["relation"] = _relation_holds(scene.relation, best)
  if scene.mentions_background:
    result["background"] = background == scene.background
  result["all"] = all(result.values())
  return result


def _agreement(wanted: spec.SceneObject, found: DetectedObject | None, scene: spec.Scene) -> int:
  if found is None:
    return 0
  points = 4 * (found.color == wanted.color) + 2 * (found.shape == wanted.shape)
  points += scene.mentions_size and found.size == wanted.size
  points += scene.mentions_position and found.position == wanted.position
  return points


def _best_assignment(wanted, detected, scene) -> tuple[DetectedObject | None, ...]:
  """The one-to-one match of prompt objects to detections that agrees most.

  Prompts have at most four objects and we try at most two more detections than
  that, so trying every assignment is cheap (at most 360) and exact.
  """
  # The largest detections are the real objects; two spares absorb a split or a speck.
  candidates = list(detected[: len(wanted) + 2])
  slots = candidates + [None] * max(0, len(wanted) - len(candidates))
  best, best_points = (None,) * len(wanted), -1
  for chosen in itertools.permutations(range(len(slots)), len(wanted)):
    match = tuple(slots[i] for i in chosen)
    points = sum(_agreement(w, d, scene) for w, d in zip(wanted, match, strict=True))
    if scene.relation is not None and _relation_holds(scene.relation, match):
      points += 1
    if points > best_points:
      best, best_points = match, points
  return best


def _relation_holds(relation: spec.Relation, match) -> bool:
  subject, reference = match[relation.subject], match[relation.reference]
  if subject is None or reference is None:
    return False
  (sy, sx), (ry, rx) = subject.center, reference.center
  return {
    "to the left of": sx < rx - _RELATION_MARGIN,
    "to the right of": sx > rx + _RELATION_MARGIN,
    "above": sy < ry - _RELATION_MARGIN,
    "below": sy > ry + _RELATION_MARGIN,
  }[relation.relation]


def aggregate(results: Iterable[tuple[str, Mapping[str, bool]]]) -> dict[str, dict[str, float]]:
  """Accuracy per prompt kind and attribute, plus an "overall" row.

  Args:
    results: (kind, score(...)) pairs.

  Returns:
    kind -> attribute -> fraction correct (attributes a kind never states are
    left out), with "count" -> number of prompts in each row.
  """
  sums: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for kind, scores in results:
    for row in (kind, "overall"):
      for attribute, correct in scores.items():
        sums[row][attribute] += bool(correct)
        totals[row][attribute] += 1
      totals[row]["_prompts"] += 1
  table = {}
  for row in [*spec.KINDS, "overall"]:
    if row not in totals:
      continue
    table[row] = {a: sums[row][a] / totals[row][a] for a in ATTRIBUTES if totals[row][a]}
    table[row]["prompts"] = totals[row]["_prompts"]
  return table


def format_table(table: Mapping[str, Mapping[str, float]]) -> str:
  """The aggregate as a fixed-width text table (percentages)."""
  columns = [a for a in ATTRIBUTES if any(a in row for row in table.values())]
  lines = [f"{'kind':<12}{'prompts':>8}" + "".join(f"{c:>11}" for c in columns)]
  for kind, row in table.items():
    cells = "".join(f"{100 * row[c]:>10.1f}%" if c in row else f"{'-':>11}" for c in columns)
    lines.append(f"{kind:<12}{int(row['prompts']):>8}{cells}")
  return "\n".join(lines)
