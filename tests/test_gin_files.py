"""Every gin file in gin/ names its command, parses, finalizes and (if tiny) runs."""

from __future__ import annotations

import importlib
import json
import re

import gin
import pytest
from conftest import REPO_ROOT

from parti import gin_utils

GIN_FILES = sorted((REPO_ROOT / "gin").rglob("*.gin"))
_COMMAND = re.compile(r"^# python -m (?P<module>[\w.]+) --gin_file=(?P<file>\S+)")


def _header(path):
  match = _COMMAND.match(path.read_text().splitlines()[0])
  assert match, f"{path} must start with '# python -m MODULE --gin_file=...'"
  return match


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_there_are_gin_files():
  assert GIN_FILES


@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_gin_file_names_its_command_and_parses(path):
  header = _header(path)
  assert (REPO_ROOT / header["file"]).resolve() == path.resolve(), "the header runs another file"
  # The job module registers its configurables on import.
  importlib.import_module(header["module"])
  gin_utils.parse([str(path)], ["MODEL_DIR = '/tmp/unused'"])
  assert gin.config_is_locked()


def test_device_check_gin_runs(tmp_path):
  from parti import device_check

  gin_utils.parse(
    ["gin/runs/device_check.gin"],
    [f"MODEL_DIR = '{tmp_path}'", "device_check.matmul_size = 64"],
  )
  report = device_check.configured_device_check()
  assert report.num_devices == 8
  saved = json.loads((tmp_path / device_check.REPORT).read_text())
  assert saved["mesh"] == {"data": 8, "fsdp": 1, "model": 1}
  assert "device_check.matmul_size = 64" in (tmp_path / gin_utils.OPERATIVE_CONFIG).read_text()
