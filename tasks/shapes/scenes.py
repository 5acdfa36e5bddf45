"""Samples shapes scenes and their captions; example i of split s is a pure function of (seed, s, i).

Each prompt kind is named after a PartiPrompts challenge aspect:

  basic        "a red circle"
  detail       "a small blue square in the top left corner"
  positioning  "a red circle to the left of a blue square"
  quantity     "three yellow triangles"
  complex      "a red circle, a blue square and a green star"
  linguistic   "a circle that is red", "to the left of a blue square there is a red circle"

Objects sit in distinct cells of a 3x3 grid, each inside its cell, so they never
overlap and never leave the canvas. Placement "jittered" (the default) moves each object
off its cell's center and draws its side from its size's range; "centered" puts it at
the center with the middle of that range, so that an object is one of a few drawings
(the demo's choice: a tokenizer with one code per cell can then keep every scene).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from parti.tasks.shapes import spec

_CELL = 1 / 3
# Fraction of a cell's slack (cell side minus object side) an object may move
# off the cell center; below 1 so neighbours keep a visible gap.
_JITTER = 0.5
# Probability of the default gray background; the rest split white / black.
_GRAY_PROBABILITY = 0.8

HeldOut = Sequence[tuple[str, str]]


@dataclasses.dataclass(frozen=True)
class _Style:
  """The (color, shape) choices open to a scene."""

  background: str
  held_out: frozenset[tuple[str, str]]
  centered: bool = False

  def allowed(self, color: str, shape: str) -> bool:
    return (color, shape) not in self.held_out and spec.CLASHES.get(color) != self.background


def make_scene(
  seed: int,
  split: str,
  index: int,
  held_out: HeldOut = spec.DEFAULT_HELD_OUT,
  placement: str = "jittered",
) -> spec.Scene:
  """Example `index` of `split`: the same arguments always give the same scene.

  Args:
    seed: the dataset seed.
    split: one of spec.SPLITS. The compositional split holds the `held_out`
      (color, shape) pairs, which the other splits never show.
    index: example index within the split.
    held_out: the held-out (color, shape) pairs.
    placement: one of spec.PLACEMENTS: "jittered" objects move within their cells
      and vary in side; "centered" ones sit at their cells' centers, one side per size.

  Returns:
    The scene, with its caption.
  """
  if split not in spec.SPLITS:
    raise ValueError(f"Unknown split {split!r}; known: {spec.SPLITS}.")
  spec.check_placement(placement)
  centered = placement == "centered"
  rng = np.random.default_rng([seed, spec.SPLITS.index(split), index])
  kind = spec.KINDS[rng.integers(len(spec.KINDS))]
  if rng.random() < _GRAY_PROBABILITY:
    background = spec.DEFAULT_BACKGROUND
  else:
    background = ("white", "black")[rng.integers(2)]
  style = _Style(background, frozenset(map(tuple, held_out)), centered)
  forced = None
  if split == "compositional":
    candidates = [pair for pair in held_out if spec.CLASHES.get(pair[0]) != background]
    forced = tuple(candidates[rng.integers(len(candidates))])
    style = _Style(background, frozenset(), centered)
  scene = _BUILDERS[kind](rng, style, forced)
  if background != spec.DEFAULT_BACKGROUND:
    scene = dataclasses.replace(
      scene,
      caption=f"{scene.caption} on a {background} background",
      mentions_background=True,
    )
  return dataclasses.replace(scene, background=background)


# --- Sampling helpers --------------------------------------------------------------


def _pick_pair(rng, style: _Style, exclude=(), distinct_from=()) -> tuple[str, str]:
  """A (color, shape) pair open to `style`, avoiding `exclude` pairs and the colors
  and shapes listed in `distinct_from`."""
  taken_colors = {c for c, _ in distinct_from}
  taken_shapes = {s for _, s in distinct_from}
  pairs = [
    (color, shape)
    for color in spec.COLORS
    for shape in spec.SHAPES
    if style.allowed(color, shape)
    and (color, shape) not in exclude
    and color not in taken_colors
    and shape not in taken_shapes
  ]
  return pairs[rng.integers(len(pairs))]


def _place(rng, style: _Style, pair: tuple[str, str], cell: int, size: str) -> spec.SceneObject:
  """An object of `size` whose bounding box lies inside grid `cell`."""
  low, high = spec.SIZE_RANGES[size]
  row, col = divmod(cell, 3)
  # Drawn for centered objects too, so that both placements draw the same scenes.
  side = float(rng.uniform(low, high))
  slack = (_CELL - side) / 2 * _JITTER
  y = (row + 0.5) * _CELL + float(rng.uniform(-slack, slack))
  x = (col + 0.5) * _CELL + float(rng.uniform(-slack, slack))
  if style.centered:
    y, x, side = (row + 0.5) * _CELL, (col + 0.5) * _CELL, (low + high) / 2
  return spec.SceneObject(pair[0], pair[1], size, cell, (y, x), side)


def _random_size(rng) -> str:
  return spec.SIZES[rng.integers(len(spec.SIZES))]


def _cells(rng, count: int) -> list[int]:
  return [int(c) for c in rng.choice(9, size=count, replace=False)]


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _noun(obj: spec.SceneObject, size: bool = False) -> str:
  """ "a red circle", or with `size` "a small red circle"."""
  words = [obj.size, obj.color, obj.shape] if size else [obj.color, obj.shape]
  return f"{_article(words[0])} {' '.join(words)}"


# --- One builder per prompt kind ------------------------------------------------------


def _basic(rng, style, forced):
  pair = forced or _pick_pair(rng, style)
  obj = _place(rng, style, pair, _cells(rng, 1)[0], _random_size(rng))
  return spec.Scene(_noun(obj), "basic", style.background, (obj,))


def _detail(rng, style, forced):
  pair = forced or _pick_pair(rng, style)
  obj = _place(rng, style, pair, _cells(rng, 1)[0], _random_size(rng))
  where = spec.POSITION_PHRASES[spec.POSITIONS[obj.position]]
  return spec.Scene(
    f"{_noun(obj, size=True)} {where}",
    "detail",
    style.background,
    (obj,),
    mentions_size=True,
    mentions_position=True,
  )


def _positioned_pair(rng, style, forced):
  """Two distinguishable objects in one row or column, and the relation between them."""
  relation = spec.RELATIONS[rng.integers(len(spec.RELATIONS))]
  first = forced or _pick_pair(rng, style)
  second = _pick_pair(rng, style, exclude=[first])
  line = int(rng.integers(3))
  a, b = sorted(int(v) for v in rng.choice(3, size=2, replace=False))
  horizontal = relation in ("to the left of", "to the right of")
  cells = (line * 3 + a, line * 3 + b) if horizontal else (a * 3 + line, b * 3 + line)
  # The subject comes first in reading order for "left of" and "above".
  if relation in ("to the right of", "below"):
    cells = cells[::-1]
  subject = _place(rng, style, first, cells[0], _random_size(rng))
  reference = _place(rng, style, second, cells[1], _random_size(rng))
  return (subject, reference), relation


def _positioning(rng, style, forced):
  (subject, reference), relation = _positioned_pair(rng, style, forced)
  return spec.Scene(
    f"{_noun(subject)} {relation} {_noun(reference)}",
    "positioning",
    style.background,
    (subject, reference),
    relation=spec.Relation(0, relation, 1),
  )


def _quantity(rng, style, forced):
  count = int(rng.integers(2, 5))
  pair = forced or _pick_pair(rng, style)
  size = _random_size(rng)
  objects = tuple(_place(rng, style, pair, cell, size) for cell in _cells(rng, count))
  caption = f"{spec.NUMBER_WORDS[count]} {pair[0]} {spec.PLURALS[pair[1]]}"
  return spec.Scene(caption, "quantity", style.background, objects)


def _complex(rng, style, forced):
  pairs = [forced or _pick_pair(rng, style)]
  while len(pairs) < 3:
    pairs.append(_pick_pair(rng, style, distinct_from=pairs))
  objects = tuple(
    _place(rng, style, pair, cell, _random_size(rng))
    for pair, cell in zip(pairs, _cells(rng, 3), strict=True)
  )
  caption = f"{_noun(objects[0])}, {_noun(objects[1])} and {_noun(objects[2])}"
  return spec.Scene(caption, "complex", style.background, objects)


def _linguistic(rng, style, forced):
  """A paraphrase of a basic, detail or positioning prompt."""
  form = int(rng.integers(4))
  if form == 0:  # "a circle that is red"
    scene = _basic(rng, style, forced)
    obj = scene.objects[0]
    caption = f"a {obj.shape} that is {obj.color}"
  elif form == 1:  # "a red colored circle" reads unnaturally; "a circle in red" does not.
    scene = _basic(rng, style, forced)
    obj = scene.objects[0]
    caption = f"a {obj.shape} in {obj.color}"
  elif form == 2:  # "in the top left corner there is a small blue square"
    scene = _detail(rng, style, forced)
    obj = scene.objects[0]
    caption = (
      f"{spec.POSITION_PHRASES[spec.POSITIONS[obj.position]]} there is {_noun(obj, size=True)}"
    )
  else:  # "to the left of a blue square there is a red circle"
    scene = _positioning(rng, style, forced)
    subject, reference = scene.objects
    caption = f"{scene.relation.relation} {_noun(reference)} there is {_noun(subject)}"
  return dataclasses.replace(scene, caption=caption, kind="linguistic")


_BUILDERS = {
  "basic": _basic,
  "detail": _detail,
  "positioning": _positioning,
  "quantity": _quantity,
  "complex": _complex,
  "linguistic": _linguistic,
}
assert set(_BUILDERS) == set(spec.KINDS)


# --- Views: the same scene with one factor drawn again ---------------------------------

# What a view draws again (`view`): the colors, background included, or the shapes.
VIEW_FACTORS = ("color", "shape")


def view(
  scene: spec.Scene,
  factor: str,
  rng: np.random.Generator,
  held_out: HeldOut = spec.DEFAULT_HELD_OUT,
) -> spec.Scene:
  """`scene` with its colors ("color": the background and every object's color) or every
  object's shape ("shape") drawn again, uniformly among the values that make neither a
  `held_out` pair nor an object of its background's color (a value may be drawn again).
  Cells, sizes and sides are kept; the caption is the scene's own.

  A tokenizer trained to code an image and its views alike in the groups that should
  not see `factor` learns codes that leave it out (`parti.tokenizer.trainer`). Views never
  show a held-out pair, so a tokenizer trained on them has seen no more of the
  compositional split than Parti has.
  """
  if factor not in VIEW_FACTORS:
    raise ValueError(f"Unknown view factor {factor!r}; known: {VIEW_FACTORS}.")
  background = scene.background
  if factor == "color":
    backgrounds = list(spec.BACKGROUNDS)
    background = backgrounds[rng.integers(len(backgrounds))]
  style = _Style(background, frozenset(map(tuple, held_out)))
  objects = []
  for obj in scene.objects:
    if factor == "color":
      options = [c for c in spec.COLORS if style.allowed(c, obj.shape)]
      obj = dataclasses.replace(obj, color=options[rng.integers(len(options))])
    else:
      options = [s for s in spec.SHAPES if style.allowed(obj.color, s)]
      # A held_out list may leave a color no shape at all: the object then keeps its own.
      if options:
        obj = dataclasses.replace(obj, shape=options[rng.integers(len(options))])
    objects.append(obj)
  return dataclasses.replace(scene, background=background, objects=tuple(objects))


# --- Scenes as flat examples (the TFDS features) and back ------------------------------

NO_RELATION = "none"


def to_example(scene: spec.Scene) -> dict:
  """The scene as the TFDS builder's features (without the image)."""
  relation = scene.relation
  return {
    "caption": scene.caption,
    "kind": scene.kind,
    "background": scene.background,
    "objects": {
      "color": [o.color for o in scene.objects],
      "shape": [o.shape for o in scene.objects],
      "size": [o.size for o in scene.objects],
      "position": [spec.POSITIONS[o.position] for o in scene.objects],
      "center": np.array([o.center for o in scene.objects], np.float32).reshape(-1, 2),
      "side": np.array([o.side for o in scene.objects], np.float32),
    },
    "mentions_size": scene.mentions_size,
    "mentions_position": scene.mentions_position,
    "mentions_background": scene.mentions_background,
    "relation": relation.relation if relation else NO_RELATION,
    "relation_subject": relation.subject if relation else -1,
    "relation_reference": relation.reference if relation else -1,
  }


def _name(value, names: Sequence[str]) -> str:
  """A ClassLabel value (int, or bytes/str name) as its name."""
  if isinstance(value, bytes):
    return value.decode()
  if isinstance(value, str):
    return value
  return names[int(value)]


def from_example(example: dict) -> spec.Scene:
  """The scene of a TFDS example (numpy values, as `tfds.as_numpy` yields them)."""
  objects = example["objects"]
  relation_name = _name(example["relation"], (NO_RELATION, *spec.RELATIONS))
  relation = None
  if relation_name != NO_RELATION:
    relation = spec.Relation(
      int(example["relation_subject"]), relation_name, int(example["relation_reference"])
    )
  caption = example["caption"]
  return spec.Scene(
    caption=caption.decode() if isinstance(caption, bytes) else str(caption),
    kind=_name(example["kind"], spec.KINDS),
    background=_name(example["background"], tuple(spec.BACKGROUNDS)),
    objects=tuple(
      spec.SceneObject(
        color=_name(objects["color"][i], tuple(spec.COLORS)),
        shape=_name(objects["shape"][i], spec.SHAPES),
        size=_name(objects["size"][i], spec.SIZES),
        position=spec.POSITIONS.index(_name(objects["position"][i], spec.POSITIONS)),
        center=(float(objects["center"][i][0]), float(objects["center"][i][1])),
        side=float(objects["side"][i]),
      )
      for i in range(len(objects["color"]))
    ),
    mentions_size=bool(example["mentions_size"]),
    mentions_position=bool(example["mentions_position"]),
    mentions_background=bool(example["mentions_background"]),
    relation=relation,
  )
