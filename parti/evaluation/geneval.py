"""GenEval-compatible prompts, image folders and scores (Ghosh et al. 2023).

GenEval scores compositional faithfulness with an object detector over six tasks. Its
prompt file, `evaluation_metadata.jsonl`, holds one JSON object per prompt:

    {"tag": "color_attr", "prompt": "a photo of a purple tennis racket and a black sink",
     "include": [{"class": "tennis racket", "count": 1, "color": "purple"},
                 {"class": "sink", "count": 1, "color": "black"}]}

`include` clauses must all hold (at least `count` objects of `class`, of `color`, at
`position` [relation, index of an earlier clause]); `exclude` clauses must all fail
(fewer than `count` objects of `class`). A generator writes `<index:05d>/metadata.jsonl`
(that line) and `<index:05d>/samples/NNNN.png` per prompt, and GenEval's
`evaluate_images.py` writes `results.jsonl`, one line per image with `filename`, `tag`,
`prompt`, `correct`, `reason` and `metadata`; the score is the mean over tasks of each
task's share of correct images.

Here:
  * `metadata_for_scene` writes the shapes benchmark's prompts in that schema;
  * `read_metadata` reads a metadata file, checked line by line (`parti.infer` takes one
    as its prompt file and `write_layout` then writes GenEval's folders, so GenEval's own
    scorer runs on our images unchanged);
  * `evaluate_image` applies GenEval's clause logic with the shapes evaluator's detector
    in place of GenEval's Mask2Former (classes are our shapes, colors our palette), and
    `summarize` reports GenEval's summary.

How the shapes kinds map onto GenEval's tasks (every shapes prompt names its objects'
colors, so none is a bare `single_object` or `two_object` prompt):
  basic, detail, linguistic (one object)  -> colors      one object of a color
  quantity ("three red circles")          -> counting    exactly N, each of the color
  positioning, linguistic (two objects)   -> position    B <relation> A, both colored
  complex (three colored objects)         -> color_attr  each object of its own color
A detail prompt's size and grid cell have no GenEval clause: GenEval does not score them.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from parti.runtime.errors import ConfigError

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_RELATIONS = ("left of", "right of", "above", "below")
# The shapes captions' relations, as GenEval's.
_RELATIONS = {
  "to the left of": "left of",
  "to the right of": "right of",
  "above": "above",
  "below": "below",
}
# GenEval's `relative_position`: centers' offset, less this share of both boxes' sides.
POSITION_THRESHOLD = 0.1
METADATA_FILE = "metadata.jsonl"
SAMPLES_DIR = "samples"
_SAMPLE_NAME = re.compile(r"\d+\.png")


# --- Prompts out ----------------------------------------------------------------------------


def _clause(obj, count: int = 1) -> dict:
  return {"class": obj.shape, "count": count, "color": obj.color}


def metadata_for_scene(scene) -> dict:
  """A shapes scene's prompt as a GenEval metadata line (see the module docstring)."""
  objects = scene.objects
  if scene.relation is not None:
    subject, reference = objects[scene.relation.subject], objects[scene.relation.reference]
    position = {"position": [_RELATIONS[scene.relation.relation], 0]}
    line = {"tag": "position", "include": [_clause(reference), {**_clause(subject), **position}]}
  elif len(objects) == 1:
    line = {"tag": "colors", "include": [_clause(objects[0])]}
  elif len({(o.color, o.shape) for o in objects}) == 1:
    count = len(objects)
    line = {
      "tag": "counting",
      "include": [_clause(objects[0], count)],
      "exclude": [{"class": objects[0].shape, "count": count + 1}],
    }
  else:
    line = {"tag": "color_attr", "include": [_clause(o) for o in objects]}
  return {**line, "prompt": scene.caption}


# --- Reading and checking metadata ----------------------------------------------------------


def check_line(line: object, where: str) -> dict:
  """A GenEval metadata line, checked; raises ConfigError naming `where` otherwise."""
  if not isinstance(line, dict):
    raise ConfigError(f"{where}: a GenEval metadata line is a JSON object, not {line!r}.")
  if line.get("tag") not in TAGS:
    raise ConfigError(f"{where}: 'tag' is {line.get('tag')!r}; GenEval's tasks are {TAGS}.")
  prompt = line.get("prompt")
  if not isinstance(prompt, str) or not prompt.strip():
    raise ConfigError(f"{where}: 'prompt' must be a non-empty string.")
  for field in ("include", "exclude"):
    clauses = line.get(field, [])
    if not isinstance(clauses, list) or (field == "include" and not clauses):
      raise ConfigError(f"{where}: {field!r} must be a list of clauses (include: not empty).")
    for number, clause in enumerate(clauses):
      _check_clause(clause, f"{where}: {field}[{number}]", number if field == "include" else 0)
  return line


def _check_clause(clause, where: str, earlier: int) -> None:
  if not isinstance(clause, dict) or not isinstance(clause.get("class"), str):
    raise ConfigError(f"{where} must be an object with a 'class' string, not {clause!r}.")
  count = clause.get("count")
  if not isinstance(count, int) or isinstance(count, bool) or count < 1:
    raise ConfigError(f"{where}: 'count' must be a positive integer, not {count!r}.")
  if "color" in clause and not isinstance(clause["color"], str):
    raise ConfigError(f"{where}: 'color' must be a string, not {clause['color']!r}.")
  if "position" in clause:
    position = clause["position"]
    if (
      not isinstance(position, list)
      or len(position) != 2
      or position[0] not in GENEVAL_RELATIONS
      or not isinstance(position[1], int)
      or not 0 <= position[1] < earlier
    ):
      raise ConfigError(
        f"{where}: 'position' must be [relation, index of an earlier include clause] with a "
        f"relation of {GENEVAL_RELATIONS}, not {position!r}."
      )


def is_metadata_line(line: Mapping) -> bool:
  """Whether a JSON request is a GenEval metadata line (it has a tag and clauses)."""
  return "tag" in line or "include" in line


def read_metadata(path: str | pathlib.Path) -> list[dict]:
  """Every line of a GenEval metadata file, checked, in order (GenEval numbers its
  folders by this order). Raises ConfigError naming the file and line."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"GenEval metadata file {path} not found.")
  lines = []
  for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    if not text.strip():
      continue
    try:
      line = json.loads(text)
    except json.JSONDecodeError as error:
      raise ConfigError(f"{path}:{number} is not JSON ({error}): {text[:120]!r}") from None
    lines.append(check_line(line, f"{path}:{number}"))
  if not lines:
    raise ConfigError(f"{path} has no metadata lines.")
  return lines


def is_metadata_file(path: str | pathlib.Path) -> bool:
  """Whether `path` is a .jsonl file whose first line is GenEval metadata."""
  path = pathlib.Path(path)
  if path.suffix != ".jsonl" or not path.is_file():
    return False
  with open(path, encoding="utf-8", errors="replace") as handle:
    for text in handle:
      if text.strip():
        try:
          first = json.loads(text)
        except json.JSONDecodeError:
          return False
        return isinstance(first, dict) and is_metadata_line(first)
  return False


# --- GenEval's folder layout ----------------------------------------------------------------


def write_layout(
  folder: pathlib.Path, lines: Sequence[dict], images: Sequence[Sequence[pathlib.Path]]
) -> int:
  """Writes GenEval's layout: per metadata line i, `<i:05d>/metadata.jsonl` and its
  images as `<i:05d>/samples/NNNN.png` (copied; a line without images gets its metadata
  alone, for a rerun to fill). Returns the number of images written."""
  from parti.runtime import files

  written = 0
  for index, (line, paths) in enumerate(zip(lines, images, strict=True)):
    prompt_dir = folder / f"{index:05d}"
    (prompt_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    files.atomic_write_bytes(prompt_dir / METADATA_FILE, json.dumps(line).encode())
    for number, path in enumerate(paths):
      files.atomic_write_bytes(prompt_dir / SAMPLES_DIR / f"{number:04d}.png", path.read_bytes())
      written += 1
  return written


def read_layout(folder: str | pathlib.Path) -> list[tuple[dict, list[pathlib.Path]]]:
  """(metadata, sample files) per prompt folder, read as GenEval's evaluate_images.py
  reads them: numbered subfolders, each a metadata.jsonl (one JSON object) and
  samples/<digits>.png.

  Raises:
    ConfigError: no such folder, no prompt folder in it, or a malformed metadata file.
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise ConfigError(f"GenEval image folder {folder} not found.")
  prompts = []
  for prompt_dir in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()):
    where = str(prompt_dir / METADATA_FILE)
    try:
      line = json.loads((prompt_dir / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
      raise ConfigError(f"{where} cannot be read as GenEval metadata: {error}") from None
    samples = prompt_dir / SAMPLES_DIR
    names = sorted(p for p in samples.iterdir() if _SAMPLE_NAME.fullmatch(p.name)) if (
      samples.is_dir()
    ) else []  # fmt: skip
    prompts.append((check_line(line, where), names))
  if not prompts:
    raise ConfigError(f"{folder} holds no GenEval prompt folder (00000/, 00001/, ...).")
  return prompts


# --- Scoring with the shapes detector -------------------------------------------------------


def check_shapes_classes(line: dict, where: str) -> None:
  """Refuses a line the shapes detector cannot score (a class or color it does not know)."""
  from parti.tasks.shapes import spec

  for clause in [*line["include"], *line.get("exclude", [])]:
    if clause["class"] not in spec.SHAPES:
      raise ConfigError(
        f"{where}: class {clause['class']!r} is not a shape ({', '.join(spec.SHAPES)}): the "
        "shapes evaluator scores the shapes benchmark's prompts; score others with GenEval's "
        "own detector."
      )
    if "color" in clause and clause["color"] not in spec.COLORS:
      raise ConfigError(f"{where}: color {clause['color']!r} is not in the shapes palette.")


def relative_position(box_a, box_b) -> set[str]:
  """GenEval's relations of box A to box B ([x0, y0, x1, y1] each): the centers' offset,
  shrunk by POSITION_THRESHOLD of both boxes' sides, then its main directions."""
  boxes = np.array([box_a, box_b], np.float64).reshape(2, 2, 2)
  center_a, center_b = boxes.mean(axis=-2)
  dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
  offset = center_a - center_b
  revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
  if np.all(np.abs(revised) < 1e-3):
    return set()
  dx, dy = revised / np.linalg.norm(offset)
  relations = set()
  if dx < -0.5:
    relations.add("left of")
  if dx > 0.5:
    relations.add("right of")
  if dy < -0.5:
    relations.add("above")
  if dy > 0.5:
    relations.add("below")
  return relations


def _box(obj) -> tuple[float, float, float, float]:
  ymin, xmin, ymax, xmax = obj.bbox
  return (xmin, ymin, xmax, ymax)


def evaluate_objects(objects: Mapping[str, list], line: dict) -> tuple[bool, str]:
  """GenEval's `evaluate` over detected objects per class (each with `.color` and
  `.bbox`, most confident first): (correct, reason)."""
  correct, reasons, matched_groups = True, [], []
  for clause in line["include"]:
    name, count = clause["class"], clause["count"]
    found = objects.get(name, [])[:count]
    matched = True
    if len(found) < count:
      correct = matched = False
      reasons.append(f"expected {name}>={count}, found {len(found)}")
    else:
      if "color" in clause:
        colors = [o.color for o in found]
        if colors.count(clause["color"]) < count:
          correct = matched = False
          others = ", ".join(f"{colors.count(c)} {c}" for c in dict.fromkeys(colors))
          reasons.append(
            f"expected {clause['color']} {name}>={count}, found "
            f"{colors.count(clause['color'])} {clause['color']}; and {others}"
          )
      if "position" in clause and matched:
        relation, target = clause["position"]
        if matched_groups[target] is None:
          correct = matched = False
          reasons.append(f"no target for {name} to be {relation}")
        else:
          for obj in found:
            for other in matched_groups[target]:
              found_relations = relative_position(_box(obj), _box(other))
              if relation not in found_relations:
                correct = matched = False
                reasons.append(
                  f"expected {name} {relation} target, found "
                  f"{' and '.join(sorted(found_relations))} target"
                )
                break
            if not matched:
              break
    matched_groups.append(found if matched else None)
  for clause in line.get("exclude", []):
    name = clause["class"]
    if len(objects.get(name, [])) >= clause["count"]:
      correct = False
      reasons.append(f"expected {name}<{clause['count']}, found {len(objects[name])}")
  return correct, "\n".join(reasons)


def evaluate_image(image: np.ndarray, line: dict) -> tuple[bool, str]:
  """(correct, reason) of a uint8 [S, S, 3] image against a GenEval metadata line, with
  the shapes detector: each detection's class is its shape, larger ones first (GenEval
  orders by confidence)."""
  from parti.tasks.shapes import evaluate

  objects: dict[str, list] = {}
  for obj in evaluate.detect(image):  # Largest first.
    objects.setdefault(obj.shape, []).append(obj)
  return evaluate_objects(objects, line)


def summarize(results: Iterable[Mapping]) -> dict:
  """GenEval's summary of results.jsonl rows: images, prompts, the share of correct
  images and of prompts with a correct image, each task's accuracy and count, and the
  overall score (the mean of the task accuracies, in the order tasks first appear)."""
  results = list(results)
  if not results:
    raise ConfigError("No GenEval results to summarize.")
  tasks: dict[str, list[bool]] = {}
  prompts: dict[str, bool] = {}
  for row in results:
    tasks.setdefault(row["tag"], []).append(bool(row["correct"]))
    prompts[row["metadata"]] = prompts.get(row["metadata"], False) or bool(row["correct"])
  task_scores = {tag: float(np.mean(values)) for tag, values in tasks.items()}
  return {
    "images": len(results),
    "prompts": len(prompts),
    "correct_images": float(np.mean([bool(r["correct"]) for r in results])),
    "correct_prompts": float(np.mean(list(prompts.values()))),
    "tasks": {tag: {"accuracy": task_scores[tag], "images": len(v)} for tag, v in tasks.items()},
    "overall": float(np.mean(list(task_scores.values()))),
  }


def format_summary(summary: Mapping) -> str:
  """The summary as GenEval's summary_scores.py prints it, in Markdown."""
  rows = [
    f"Images: {summary['images']}; prompts: {summary['prompts']}; correct images "
    f"{summary['correct_images']:.2%}; prompts with a correct image "
    f"{summary['correct_prompts']:.2%}.",
    "",
    "| task | accuracy | images |",
    "|---|---|---|",
  ]
  for tag, task in summary["tasks"].items():
    rows.append(f"| {tag} | {task['accuracy']:.2%} | {task['images']} |")
  rows += ["", f"Overall score (mean over tasks): {summary['overall']:.5f}"]
  return "\n".join(rows)
