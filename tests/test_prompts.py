"""Prompt files: JSON Lines requests, their per-request options, and malformed lines."""

from __future__ import annotations

import json

import pytest

from parti.runtime.errors import ConfigError
from parti.sampling.prompts import Prompt, read_prompts


def _write(path, lines: list[str]) -> str:
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_requests_keep_their_options_and_resolve_images_next_to_the_file(tmp_path):
  path = _write(
    tmp_path / "requests.jsonl",
    [
      json.dumps({"prompt": "  a red   circle ", "seed": 3, "guidance_scale": 2}),
      "",
      json.dumps({"prompt": "a red circle", "seed": 4}),
      json.dumps({"prompt": "a red circle", "seed": 3, "guidance_scale": 2.0}),  # Same: once.
      json.dumps({"prompt": "   "}),  # Blank: skipped.
      json.dumps({"prompt": "a cat", "image": "cats/1.png", "category": "Animals"}),
    ],
  )
  prompts = read_prompts(path)
  assert [(p.text, p.seed, p.guidance_scale) for p in prompts] == [
    ("a red circle", 3, 2.0), ("a red circle", 4, None), ("a cat", None, None),
  ]  # fmt: skip
  assert prompts[0].source == f"{path}:1" and prompts[2].category == "Animals"
  assert prompts[2].image == str(tmp_path / "cats" / "1.png")
  assert len({p.key for p in prompts}) == 3
  assert Prompt("a cat").key == "a cat"  # A plain prompt's key is its text.


@pytest.mark.parametrize(
  ("line", "message"),
  [
    ("{not json", "requests.jsonl:2 is not JSON"),
    ('["a red circle"]', "requests.jsonl:2 is not a JSON object"),
    ('{"prompt": "a", "sed": 3}', r"unknown fields \['sed'\]"),
    ('{"prompt": "a", "seed": "3"}', "'seed' should be an integer, not '3'"),
    ('{"prompt": "a", "seed": true}', "'seed' should be an integer, not True"),
    ('{"prompt": "a", "seed": 1.5}', "'seed' should be an integer"),
    ('{"prompt": 7}', "'prompt' should be a string"),
    ('{"prompt": "a", "guidance_scale": -1}', "guidance_scale should be finite and >= 0"),
    ('{"prompt": "a", "guidance_scale": NaN}', "guidance_scale should be finite and >= 0"),
    ('{"prompt": "a", "seed": -2}', r"seed should be in \[0, 2\*\*31\)"),
  ],
)
def test_malformed_requests_are_refused_naming_the_line(tmp_path, line, message):
  path = _write(tmp_path / "requests.jsonl", ['{"prompt": "fine"}', line])
  with pytest.raises(ConfigError, match=message):
    read_prompts(path)


def test_a_request_file_of_blank_prompts_has_no_prompts(tmp_path):
  path = _write(tmp_path / "requests.jsonl", ['{"prompt": ""}', "", '{"prompt": " "}'])
  with pytest.raises(ConfigError, match="has no prompts"):
    read_prompts(path)


def test_request_images_must_lie_under_the_request_folder_or_the_allowed_root(tmp_path):
  import json
  import os

  requests = tmp_path / "requests" / "r.jsonl"
  requests.parent.mkdir()
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  (elsewhere / "photo.png").write_bytes(b"png")
  os.symlink(elsewhere / "photo.png", requests.parent / "link.png")
  for image in ["../elsewhere/photo.png", str(elsewhere / "photo.png"), "link.png", "/dev/zero"]:
    requests.write_text(json.dumps({"prompt": "a red circle", "image": image}) + "\n")
    with pytest.raises(ConfigError, match="lies outside"):
      read_prompts(str(requests))
  requests.write_text(json.dumps({"prompt": "a red circle", "image": "link.png"}) + "\n")
  [prompt] = read_prompts(str(requests), image_root=str(elsewhere))
  assert prompt.image == str((elsewhere / "photo.png").resolve())


def test_a_line_of_control_characters_is_blank_and_they_are_removed_from_prompts(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_bytes(b"\x00\na red\x00 circle\n\x07\x1b\n")
  assert [p.text for p in read_prompts(str(path))] == ["a red circle"]
