"""The fixed specification of the procedural shapes dataset: palette, shapes, sizes, grid.

Generators, renderers and the evaluator all read these tables, so an evaluation
can rely on exactly what the dataset draws. Nothing here needs TensorFlow.
"""

from __future__ import annotations

import dataclasses

# Object colors (RGB). The evaluator segments by nearest palette color.
COLORS: dict[str, tuple[int, int, int]] = {
  "red": (220, 40, 40),
  "green": (40, 170, 70),
  "blue": (50, 90, 220),
  "yellow": (240, 210, 50),
  "purple": (150, 60, 190),
  "orange": (245, 140, 30),
  "white": (245, 245, 245),
  "black": (20, 20, 20),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
  "gray": (128, 128, 128),
  "white": (255, 255, 255),
  "black": (0, 0, 0),
}
DEFAULT_BACKGROUND = "gray"

# An object may not take the color of its background.
CLASHES: dict[str, str] = {"white": "white", "black": "black"}

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS = {
  "circle": "circles",
  "square": "squares",
  "triangle": "triangles",
  "diamond": "diamonds",
  "star": "stars",
  "cross": "crosses",
}

SIZES = ("small", "large")
# Side of an object's bounding box, as a fraction of the image side S: small is
# about S/6, large about S/3 (kept a little under a grid cell so it fits one).
SIZE_RANGES: dict[str, tuple[float, float]] = {
  "small": (0.9 / 6, 1.1 / 6),
  "large": (0.78 / 3, 0.88 / 3),
}
# How objects sit in their cells (scenes.make_scene): moved and resized at random, or
# at the cell's center with the middle of their size's range.
PLACEMENTS = ("jittered", "centered")


def check_placement(placement: str) -> None:
  """Raises ValueError, naming the known ones, unless `placement` is in PLACEMENTS."""
  if placement not in PLACEMENTS:
    raise ValueError(f"Unknown placement {placement!r}; known: {PLACEMENTS}.")


# Bounding-box sides above this fraction of S read as large.
SIZE_THRESHOLD = 0.22

# The 3x3 grid cells, row-major, with the phrase a caption uses for each.
POSITIONS = (
  "top left corner",
  "top",
  "top right corner",
  "left",
  "center",
  "right",
  "bottom left corner",
  "bottom",
  "bottom right corner",
)
POSITION_PHRASES = {
  "top left corner": "in the top left corner",
  "top": "at the top",
  "top right corner": "in the top right corner",
  "left": "on the left",
  "center": "in the center",
  "right": "on the right",
  "bottom left corner": "in the bottom left corner",
  "bottom": "at the bottom",
  "bottom right corner": "in the bottom right corner",
}

RELATIONS = ("to the left of", "to the right of", "above", "below")

KINDS = ("basic", "detail", "positioning", "quantity", "complex", "linguistic")

NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}

# (color, shape) pairs kept out of train, validation and test: one per shape.
DEFAULT_HELD_OUT: tuple[tuple[str, str], ...] = (
  ("red", "circle"),
  ("blue", "square"),
  ("green", "triangle"),
  ("yellow", "diamond"),
  ("purple", "star"),
  ("orange", "cross"),
)

SPLITS = ("train", "validation", "test", "compositional")


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One drawn object.

  Attributes:
    color: a key of COLORS.
    shape: one of SHAPES.
    size: "small" or "large".
    position: index into POSITIONS (the grid cell holding the object's center).
    center: (y, x) of the bounding-box center, as fractions of the image side.
    side: bounding-box side, as a fraction of the image side.
  """

  color: str
  shape: str
  size: str
  position: int
  center: tuple[float, float]
  side: float

  @property
  def bbox(self) -> tuple[float, float, float, float]:
    """(ymin, xmin, ymax, xmax) as fractions of the image side."""
    y, x = self.center
    half = self.side / 2
    return (y - half, x - half, y + half, x + half)


@dataclasses.dataclass(frozen=True)
class Relation:
  """`objects[subject]` is `relation` `objects[reference]`."""

  subject: int
  relation: str
  reference: int


@dataclasses.dataclass(frozen=True)
class Scene:
  """A scene and what its caption says about it.

  The caption may leave attributes unsaid (a basic prompt names no size or
  position); the `mentions_*` flags and `relation` say which ones an evaluator
  must check.

  Attributes:
    caption: the prompt.
    kind: one of KINDS.
    background: a key of BACKGROUNDS.
    objects: every object in the image.
    mentions_size: the caption names each object's size.
    mentions_position: the caption names each object's grid cell.
    mentions_background: the caption names the background.
    relation: the spatial relation the caption states, if any.
  """

  caption: str
  kind: str
  background: str
  objects: tuple[SceneObject, ...]
  mentions_size: bool = False
  mentions_position: bool = False
  mentions_background: bool = False
  relation: Relation | None = None
