"""GenEval-compatible prompts, folders and scoring: the shapes prompts in GenEval's schema,
GenEval's clause rules with the shapes detector, and checks of bad metadata and folders."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
from helpers import read_geneval_folder
from PIL import Image

from parti import evaluate_geneval, geneval_prompts
from parti.evaluation import geneval
from parti.runtime.errors import ConfigError
from parti.tasks.shapes import render, scenes, spec

SIZE = 96


def test_each_shapes_kind_maps_onto_a_geneval_task():
  by_kind = collections.defaultdict(set)
  for index in range(300):
    scene = scenes.make_scene(0, "test", index)
    line = geneval.check_line(geneval.metadata_for_scene(scene), f"scene {index}")
    assert line["prompt"] == scene.caption
    by_kind[scene.kind].add(line["tag"])
    if line["tag"] == "counting":
      (clause,) = line["include"]
      assert clause["count"] == len(scene.objects) and line["exclude"] == [
        {"class": clause["class"], "count": clause["count"] + 1}
      ]
    if line["tag"] == "position":
      assert line["include"][1]["position"][0] in geneval.GENEVAL_RELATIONS
  assert by_kind["basic"] == by_kind["detail"] == {"colors"}
  assert by_kind["quantity"] == {"counting"} and by_kind["positioning"] == {"position"}
  assert by_kind["complex"] == {"color_attr"}
  assert by_kind["linguistic"] <= {"colors", "position"}


def test_the_ground_truth_passes_and_a_wrong_image_fails_with_a_reason():
  passed = []
  for index in range(120):
    scene = scenes.make_scene(0, "test", index)
    line = geneval.metadata_for_scene(scene)
    passed.append(geneval.evaluate_image(render.render(scene, SIZE), line)[0])
    # Recolored objects: every clause names a color, so the image must fail.
    others = [c for c in spec.COLORS if c not in {o.color for o in scene.objects}]
    wrong = line | {"include": [c | {"color": others[0]} for c in line["include"]]}
    correct, reason = geneval.evaluate_image(render.render(scene, SIZE), wrong)
    assert not correct and f"expected {others[0]}" in reason
  assert np.mean(passed) >= 0.95, np.mean(passed)


def test_geneval_relations_and_clause_rules():
  # Box A left of box B (x0, y0, x1, y1), well apart; overlapping boxes have no relation.
  assert geneval.relative_position((0, 0, 1, 1), (3, 0, 4, 1)) == {"left of"}
  assert geneval.relative_position((0, 3, 1, 4), (0, 0, 1, 1)) == {"below"}
  assert geneval.relative_position((0, 0, 2, 2), (0.1, 0.1, 2.1, 2.1)) == set()
  Obj = collections.namedtuple("Obj", "color bbox")  # bbox: ymin, xmin, ymax, xmax
  red_left = Obj("red", (0.4, 0.0, 0.6, 0.2))
  blue_right = Obj("blue", (0.4, 0.8, 0.6, 1.0))
  objects = {"circle": [red_left], "square": [blue_right]}
  line = {"tag": "position", "prompt": "p", "include": [
    {"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]},
  ]}  # fmt: skip
  assert geneval.evaluate_objects(objects, line) == (True, "")
  line["include"][1]["position"][0] = "right of"
  correct, reason = geneval.evaluate_objects(objects, line)
  assert not correct and reason == "expected circle right of target, found left of target"
  counting = {"tag": "counting", "prompt": "p", "include": [{"class": "circle", "count": 2}],
              "exclude": [{"class": "circle", "count": 3}]}  # fmt: skip
  assert geneval.evaluate_objects({"circle": [red_left] * 2}, counting)[0]
  assert geneval.evaluate_objects({"circle": [red_left] * 3}, counting) == (
    False, "expected circle<3, found 3"
  )  # fmt: skip


def test_the_summary_is_the_mean_of_the_task_means():
  rows = [
    {"tag": "colors", "correct": True, "metadata": "a"},
    {"tag": "colors", "correct": False, "metadata": "a"},
    {"tag": "counting", "correct": False, "metadata": "b"},
    {"tag": "counting", "correct": False, "metadata": "c"},
    {"tag": "counting", "correct": True, "metadata": "c"},
    {"tag": "counting", "correct": True, "metadata": "c"},
  ]
  summary = geneval.summarize(rows)
  assert summary["tasks"]["colors"]["accuracy"] == 0.5
  assert summary["tasks"]["counting"] == {"accuracy": 0.5, "images": 4}
  assert summary["overall"] == 0.5 and summary["correct_images"] == 0.5
  assert summary["prompts"] == 3 and summary["correct_prompts"] == pytest.approx(2 / 3)
  assert "Overall score (mean over tasks): 0.50000" in geneval.format_summary(summary)


@pytest.mark.parametrize(
  ("line", "message"),
  [
    ("not json", "is not JSON"),
    ('{"tag": "shapes", "prompt": "p", "include": []}', "GenEval's tasks"),
    ('{"tag": "colors", "include": [{"class": "circle", "count": 1}]}', "'prompt'"),
    ('{"tag": "colors", "prompt": "p", "include": []}', "include: not empty"),
    ('{"tag": "colors", "prompt": "p", "include": [{"class": "circle", "count": 0}]}', "count"),
    ('{"tag": "position", "prompt": "p", "include": [{"class": "circle", "count": 1, '
     '"position": ["left of", 0]}]}', "earlier include clause"),
    ('{"tag": "colors", "prompt": "p", "include": [{"class": "circle", "count": 1, '
     '"color": 3}]}', "'color'"),
  ],
  ids=["json", "tag", "prompt", "empty", "count", "position", "color"],
)  # fmt: skip
def test_malformed_metadata_is_refused_by_line(tmp_path, line, message):
  path = tmp_path / "evaluation_metadata.jsonl"
  good = json.dumps(geneval.metadata_for_scene(scenes.make_scene(0, "test", 0)))
  path.write_text(f"{good}\n{line}\n")
  with pytest.raises(ConfigError, match=rf"evaluation_metadata\.jsonl:2.*{message}"):
    geneval.read_metadata(path)
  from parti.sampling.prompts import read_prompts

  with pytest.raises(ConfigError, match=r"evaluation_metadata\.jsonl:2"):
    read_prompts(str(path))


def test_prompts_out_and_scores_in_through_geneval_folders(tmp_path):
  """The prompts job's file, ground-truth images laid out as GenEval's, scored by the job."""
  metadata = tmp_path / "evaluation_metadata.jsonl"
  counts = geneval_prompts.write_geneval_prompts(output_file=str(metadata), examples=40)
  lines = geneval.read_metadata(metadata)
  assert sum(counts.values()) == len(lines) == 40
  assert geneval.is_metadata_file(metadata)
  sources = tmp_path / "images"
  sources.mkdir()
  images = []
  for index in range(len(lines)):
    scene = scenes.make_scene(0, "test", index)
    right, wrong = sources / f"{index}_right.png", sources / f"{index}_wrong.png"
    Image.fromarray(render.render(scene, SIZE)).save(right)
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(wrong)  # Nothing drawn.
    images.append([right, wrong])
  folder = tmp_path / "geneval"
  assert geneval.write_layout(folder, lines, images) == 80
  read = read_geneval_folder(folder)
  assert len(read) == 80 and [m for _, m, _ in read[::2]] == lines
  assert read[0][2].endswith(os.path.join("00000", "samples", "0000.png"))
  # A damaged image and a prompt without images: skipped and counted, not a crash.
  (folder / "00001" / "samples" / "0001.png").write_bytes(b"not a png")
  for sample in (folder / "00002" / "samples").iterdir():
    sample.unlink()
  out = tmp_path / "scores"
  summary = evaluate_geneval.evaluate_geneval(image_dir=str(folder), output_dir=str(out))
  rows = [json.loads(x) for x in (out / evaluate_geneval.RESULTS_FILE).read_text().splitlines()]
  assert len(rows) == 77 and summary["images"] == 77
  assert summary["prompts_without_images"] == 1 and len(summary["unreadable_images"]) == 1
  assert set(rows[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata"}
  right = [r["correct"] for r in rows if r["filename"].endswith("0000.png")]
  blank = [r for r in rows if r["filename"].endswith("0001.png")]
  assert np.mean(right) >= 0.9 and not any(r["correct"] for r in blank)
  assert all(r["reason"].startswith("expected") for r in blank)
  by_task = collections.defaultdict(list)
  for row in rows:
    by_task[row["tag"]].append(row["correct"])
  assert summary["overall"] == pytest.approx(np.mean([np.mean(v) for v in by_task.values()]))
  assert (out / "summary.md").read_text().count("|") > 8


def test_folders_the_shapes_evaluator_cannot_score_are_refused(tmp_path):
  with pytest.raises(ConfigError, match="not found"):
    evaluate_geneval.evaluate_geneval(image_dir=str(tmp_path / "none"), output_dir=str(tmp_path))
  with pytest.raises(ConfigError, match="no GenEval prompt folder"):
    evaluate_geneval.evaluate_geneval(image_dir=str(tmp_path), output_dir=str(tmp_path / "o"))
  giraffe = {"tag": "single_object", "prompt": "a photo of a giraffe",
             "include": [{"class": "giraffe", "count": 1}]}  # fmt: skip
  geneval.write_layout(tmp_path / "g", [giraffe], [[]])
  with pytest.raises(ConfigError, match="'giraffe' is not a shape"):
    evaluate_geneval.evaluate_geneval(image_dir=str(tmp_path / "g"), output_dir=str(tmp_path))
  (tmp_path / "g" / "00000" / "metadata.jsonl").write_text("{broken")
  with pytest.raises(ConfigError, match=r"00000.metadata\.jsonl cannot be read"):
    geneval.read_layout(tmp_path / "g")
