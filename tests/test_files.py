"""Atomic writes: the target holds the old bytes or the new, never a part."""

from __future__ import annotations

import json
import os

import pytest

from parti.runtime import files


def test_writes_and_creates_parents(tmp_path):
  path = files.atomic_write_json(tmp_path / "a" / "b.json", {"x": 1})
  assert json.loads(path.read_text()) == {"x": 1}
  assert os.listdir(tmp_path / "a") == ["b.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
  target = tmp_path / "report.json"
  target.write_text("old")

  def killed(*args):
    raise KeyboardInterrupt  # What a kill between write and rename looks like.

  monkeypatch.setattr(os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    files.atomic_write_text(target, "new")
  assert target.read_text() == "old"
  assert os.listdir(tmp_path) == ["report.json"]


def test_written_files_get_the_usual_permissions(tmp_path):
  path = files.atomic_write_text(tmp_path / "x.txt", "x")
  umask = os.umask(0)
  os.umask(umask)
  assert path.stat().st_mode & 0o777 == 0o666 & ~umask
