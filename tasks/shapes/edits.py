"""Edit tasks on the shapes: a source scene, the layout cells to redraw, and the target
scene whose caption is the edit's prompt; task i of a kind is a pure function of
(seed, kind, i).

  recolor   one object of the target drawn in another color in the source
  reshape   one object of the target drawn as another shape in the source
  remove    the source has one object more, in a cell the target leaves empty
  add       the source lacks one of the target's objects; its cell is redrawn
  outpaint  the source is the target cropped by one row or column of cells, which the
            edit adds back (the request's `extend`)

Targets are the split's own scenes (`scenes.make_scene`), so prompts are captions of
the kind the model was trained on. The cells to redraw are whole cells of the 3x3
layout; at the demo's 48 px each cell is one token. The shapes evaluator scores the
edited image against the target; `preserved` checks that the target's objects outside
the redrawn cells are found as they were.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from parti.tasks.shapes import evaluate, render, scenes, spec

KINDS = ("recolor", "reshape", "remove", "add", "outpaint")
# Outpainting crops one side by a row or column of cells: (side, its cells).
_SIDES = {
  "top": (0, 1, 2), "bottom": (6, 7, 8), "left": (0, 3, 6), "right": (2, 5, 8),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class EditTask:
  """One edit: redraw `cells` of `source` so that it shows `target`.

  Attributes:
    kind: one of KINDS.
    source: the scene drawn as the edit's input (for outpainting, before the crop).
    target: the scene the edit should reach; its caption is the prompt.
    cells: the layout cells (0-8, row-major) to redraw.
    crop: for outpainting, the side cropped off the source image ("top", ...), else "".
  """

  kind: str
  source: spec.Scene
  target: spec.Scene
  cells: tuple[int, ...]
  crop: str = ""

  def source_image(self, size: int) -> np.ndarray:
    """uint8 [S, S, 3], or for outpainting the image with its cropped side removed."""
    image = render.render(self.source, size)
    third = size // 3
    if self.crop == "top":
      return image[third:]
    if self.crop == "bottom":
      return image[: size - third]
    if self.crop == "left":
      return image[:, third:]
    if self.crop == "right":
      return image[:, : size - third]
    return image

  def extend(self, size: int) -> tuple[int, int, int, int]:
    """Outpainting's pixels to add (top, right, bottom, left) at image side `size`."""
    third = size // 3
    return tuple(third if side == self.crop else 0 for side in ("top", "right", "bottom", "left"))

  def pixel_box(self, size: int) -> np.ndarray:
    """bool [S, S]: the pixels of the cells to redraw."""
    mask = np.zeros((size, size), bool)
    third = size // 3
    for cell in self.cells:
      row, col = divmod(cell, 3)
      mask[row * third : (row + 1) * third, col * third : (col + 1) * third] = True
    return mask


def make_task(
  seed: int, kind: str, index: int, split: str = "test", placement: str = "jittered"
) -> EditTask:
  """Edit task `index` of `kind`: the same arguments always give the same task.

  `placement` is the scenes' (spec.PLACEMENTS): a model trained on centered objects
  (the demo's) is benchmarked on centered scenes, as it was trained.
  """
  if kind not in KINDS:
    raise ValueError(f"Unknown edit kind {kind!r}; known: {KINDS}.")
  spec.check_placement(placement)
  rng = np.random.default_rng([seed, KINDS.index(kind), index])
  # Draw target scenes until one suits the kind (objects to change, room to add one).
  for _attempt in range(100):
    target = scenes.make_scene(seed, split, int(rng.integers(1 << 30)), placement=placement)
    task = _BUILDERS[kind](rng, target)
    if task is not None:
      return task
  raise RuntimeError(f"No {kind} task found in 100 scenes (seed {seed}, index {index}).")


def _allowed(color: str, shape: str, background: str) -> bool:
  return spec.CLASHES.get(color) != background and (color, shape) not in spec.DEFAULT_HELD_OUT


def _changed(rng, target, field: str):
  """The target with one object's color or shape changed: (source, that object's cell)."""
  pick = int(rng.integers(len(target.objects)))
  obj = target.objects[pick]
  options = spec.COLORS if field == "color" else spec.SHAPES
  choices = [
    value for value in options if value != getattr(obj, field)
    and _allowed(value if field == "color" else obj.color,
                 value if field == "shape" else obj.shape, target.background)
  ]  # fmt: skip
  changed = dataclasses.replace(obj, **{field: choices[int(rng.integers(len(choices)))]})
  objects = (*target.objects[:pick], changed, *target.objects[pick + 1 :])
  return dataclasses.replace(target, objects=objects), obj.position


def _recolor(rng, target):
  source, cell = _changed(rng, target, "color")
  return EditTask("recolor", source, target, (cell,))


def _reshape(rng, target):
  source, cell = _changed(rng, target, "shape")
  return EditTask("reshape", source, target, (cell,))


def _remove(rng, target):
  empty = sorted(set(range(9)) - {o.position for o in target.objects})
  if not empty:
    return None
  cell = empty[int(rng.integers(len(empty)))]
  pairs = [(c, s) for c in spec.COLORS for s in spec.SHAPES if _allowed(c, s, target.background)]
  color, shape = pairs[int(rng.integers(len(pairs)))]
  size = spec.SIZES[int(rng.integers(len(spec.SIZES)))]
  low, high = spec.SIZE_RANGES[size]
  row, col = divmod(cell, 3)
  extra = spec.SceneObject(
    color, shape, size, cell, ((row + 0.5) / 3, (col + 0.5) / 3), float((low + high) / 2)
  )
  source = dataclasses.replace(target, objects=(*target.objects, extra))
  return EditTask("remove", source, target, (cell,))


def _add(rng, target):
  pick = int(rng.integers(len(target.objects)))
  objects = target.objects[:pick] + target.objects[pick + 1 :]
  # The source's caption is not used: the prompt is the target's.
  source = dataclasses.replace(target, objects=objects)
  return EditTask("add", source, target, (target.objects[pick].position,))


def _outpaint(rng, target):
  side = list(_SIDES)[int(rng.integers(len(_SIDES)))]
  cells = _SIDES[side]
  if not any(o.position in cells for o in target.objects):
    return None  # Nothing to bring back: the crop would only remove background.
  return EditTask("outpaint", target, target, cells, crop=side)


_BUILDERS = {
  "recolor": _recolor, "reshape": _reshape, "remove": _remove, "add": _add,
  "outpaint": _outpaint,
}  # fmt: skip


def preserved(image: np.ndarray, task: EditTask) -> bool:
  """Whether every target object outside the redrawn cells is found in `image` (uint8)
  with its color, shape and cell, and nothing else appears outside them."""
  found = evaluate.detect(image)
  outside = [o for o in found if o.position not in task.cells]
  wanted = [o for o in task.target.objects if o.position not in task.cells]
  key = lambda o: (o.color, o.shape, o.position)  # noqa: E731
  return sorted(map(key, outside)) == sorted(map(key, wanted))
