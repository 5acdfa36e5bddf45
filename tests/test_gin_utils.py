"""The gin edge: `--gin.K=V` flags, file lookup, clear errors, the job command line."""

from __future__ import annotations

import json

import gin
import pytest

from parti.runtime import gin_utils


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize(
  ("arg", "binding"),
  [
    ("--gin.MODEL_DIR=/tmp/x", "--gin_bindings=MODEL_DIR = '/tmp/x'"),
    ("--gin.MODEL_DIR='/tmp/x'", "--gin_bindings=MODEL_DIR = '/tmp/x'"),
    ("--gin.train.steps=100", "--gin_bindings=train.steps = 100"),
    ("--gin.x.shape=(4, 2)", "--gin_bindings=x.shape = (4, 2)"),
    ("--gin.x.flag=True", "--gin_bindings=x.flag = True"),
    (
      "--gin.x.mesh=@partitioning.MeshConfig()",
      "--gin_bindings=x.mesh = @partitioning.MeshConfig()",
    ),
    ("--gin.x.dir=%MODEL_DIR", "--gin_bindings=x.dir = %MODEL_DIR"),
    ("--gin.x.name=a b", "--gin_bindings=x.name = 'a b'"),
    ("--gin_file=a.gin", "--gin_file=a.gin"),
  ],
)
def test_rewrite_gin_args(arg, binding):
  assert gin_utils.rewrite_gin_args(["prog", arg]) == ["prog", binding]


def test_unknown_configurable_is_a_clear_error():
  with pytest.raises(gin_utils.GinConfigError, match="No configurable matching 'no_such_job'"):
    gin_utils.parse([], ["no_such_job.steps = 3"])


def test_unknown_parameter_is_a_clear_error():
  import parti.device_check  # noqa: F401  (registers device_check)

  with pytest.raises(gin_utils.GinConfigError, match="matmul_sizes"):
    gin_utils.parse([], ["device_check.matmul_sizes = 3"])


def test_missing_gin_file_names_the_file_and_the_search_paths():
  with pytest.raises(gin_utils.GinConfigError, match=r"'runs/nope\.gin' not found.*search paths"):
    gin_utils.parse(["runs/nope.gin"])


def test_syntax_error_names_the_file(tmp_path):
  bad = tmp_path / "bad.gin"
  bad.write_text("device_check.matmul_size = = 3\n")
  with pytest.raises(gin_utils.GinConfigError, match=r"bad\.gin"):
    gin_utils.parse([str(bad)])


def test_includes_resolve_beside_a_same_named_folder_in_the_working_directory(
  tmp_path, monkeypatch
):
  # `make demo` writes runs/ into the checkout; `include "runs/pretrain.gin"` must
  # still find gin/runs/pretrain.gin rather than trip over the namespace package.
  import sys

  from parti import train  # noqa: F401  (registers the configurables)

  (tmp_path / "runs").mkdir()
  (tmp_path / "models").mkdir()
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  for name in ("runs", "models"):
    sys.modules.pop(name, None)
  gin_utils.parse(
    ["gin/models/parti_tiny.gin", "gin/runs/pretrain_tiny_shapes.gin"],
    ["MODEL_DIR = '/tmp/m'", "PRE_ENCODED_DIR = '/tmp/p'", "MIXTURE_OR_TASK_NAME = 'x'"],
  )
  assert gin.config_is_locked()


def test_job_command_line_from_outside_the_checkout(run_python, tmp_path):
  out = tmp_path / "out"
  run_python(
    "-m",
    "parti.device_check",
    "--gin_file=gin/runs/device_check.gin",
    f"--gin.MODEL_DIR={out}",
    "--gin.device_check.matmul_size=64",
    "--gin.partitioning.MeshConfig.model=2",
    cwd=tmp_path,
  )
  report = json.loads((out / "device_check.json").read_text())
  assert report["mesh"] == {"data": 4, "fsdp": 1, "model": 2}
  assert report["sharded_max_error"] < 1e-3

  # The operative config alone reproduces the run.
  rerun = tmp_path / "rerun"
  run_python(
    "-m",
    "parti.device_check",
    f"--gin_file={out / 'config.gin'}",
    f"--gin.MODEL_DIR={rerun}",
    cwd=tmp_path,
  )
  assert json.loads((rerun / "device_check.json").read_text())["mesh"] == report["mesh"]


@pytest.mark.parametrize(
  ("flag", "message"),
  [
    ("--gin.device_check.nope=1", "No configurable matching|nope"),
    ("--gin.partitioning.MeshConfig.model=3", "does not divide the 8 devices"),
  ],
)
def test_job_command_line_bad_config_fails_at_start_up(run_python, tmp_path, flag, message):
  result = run_python(
    "-m",
    "parti.device_check",
    "--gin_file=gin/runs/device_check.gin",
    f"--gin.MODEL_DIR={tmp_path}",
    flag,
    cwd=tmp_path,
    check=False,
  )
  assert result.returncode != 0
  assert __import__("re").search(message, result.stderr), result.stderr
  assert not (tmp_path / "device_check.json").exists()


def test_required_model_dir_is_reported(run_python, tmp_path):
  result = run_python(
    "-m", "parti.device_check", "--gin_file=gin/runs/device_check.gin", cwd=tmp_path, check=False
  )
  assert result.returncode != 0
  assert "MODEL_DIR" in result.stderr
