"""The install gives one import namespace, `parti`, from a checkout and from a wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
from helpers import REPO_ROOT


def test_imports_from_outside_the_checkout(run_python, tmp_path):
  result = run_python(
    "-c",
    "import parti, parti.tokenizer, parti.tasks, parti.runtime.gin_utils as g;"
    "print(parti.tokenizer.__file__); print(parti.tasks.__file__); print(g.default_search_paths())",
    cwd=tmp_path,
  )
  tokenizer_file, tasks_file, search_paths = result.stdout.splitlines()
  assert tokenizer_file == str(REPO_ROOT / "tokenizer" / "__init__.py")
  assert tasks_file == str(REPO_ROOT / "tasks" / "__init__.py")
  assert str(REPO_ROOT / "gin") in search_paths


def test_generic_names_are_not_importable(run_python, tmp_path):
  result = run_python(
    "-c",
    "import importlib.util as u; print([u.find_spec(n) is None for n in ('tasks', 'tokenizer')])",
    cwd=tmp_path,
  )
  assert result.stdout.strip() == "[True, True]"


def _source_copy(tmp_path):
  """The tracked sources, copied so that a build leaves nothing in the checkout."""
  files = subprocess.run(
    ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  source = tmp_path / "src"
  for name in files:
    if (REPO_ROOT / name).is_file():
      (source / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(REPO_ROOT / name, source / name)
  return source


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("wheel")
  source = _source_copy(tmp_path)
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "wheel",
      "--quiet",
      "--no-deps",
      "--no-build-isolation",
      "--wheel-dir",
      str(tmp_path / "dist"),
      str(source),
    ],
    check=True,
    capture_output=True,
  )
  (path,) = (tmp_path / "dist").glob("*.whl")
  return path


@pytest.mark.slow
def test_wheel_has_one_namespace_and_the_gin_files(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  top_level = {
    name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")
  }
  assert top_level == {"parti"}
  assert "parti/tokenizer/__init__.py" in names
  assert "parti/tasks/__init__.py" in names
  gin_files = sorted(
    p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "gin").rglob("*.gin")
  )
  assert gin_files, "the checkout has gin files"
  for gin_file in gin_files:
    assert f"parti/{gin_file}" in names


@pytest.mark.slow
def test_installed_wheel_finds_its_gin_files(wheel, run_python, tmp_path):
  target = tmp_path / "site"
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "install",
      "--quiet",
      "--no-deps",
      "--target",
      str(target),
      str(wheel),
    ],
    check=True,
    capture_output=True,
  )
  result = run_python(
    "-c",
    "import parti, parti.runtime.gin_utils as g; print(parti.__file__);"
    "print(g._resolve('gin/runs/device_check.gin', g.default_search_paths()))",
    cwd=tmp_path,
    env={"PYTHONPATH": str(target)},
  )
  package_file, resolved = result.stdout.splitlines()
  assert package_file == str(target / "parti" / "__init__.py")
  assert resolved == str(target / "parti" / "gin" / "runs" / "device_check.gin")
