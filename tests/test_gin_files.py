"""Every gin file in gin/ names its command, parses, finalizes and (if tiny) runs."""

from __future__ import annotations

import ast
import importlib
import json
import re

import gin
import numpy as np
import pytest
import seqio
from helpers import REPO_ROOT

from parti.runtime import gin_utils

GIN_FILES = sorted((REPO_ROOT / "gin").rglob("*.gin"))
_COMMAND = re.compile(r"^# python -m (?P<module>[\w.]+) (?P<args>--gin_file=.*)$")


def _header(path):
  """(module, the command's gin files in order): a file may be run with others (t5x style)."""
  match = _COMMAND.match(path.read_text().splitlines()[0])
  assert match, f"{path} must start with '# python -m MODULE --gin_file=...'"
  files = re.findall(r"--gin_file=(\S+)", match["args"])
  return match["module"], [REPO_ROOT / f for f in files]


def _required_macros(path):
  """The macros a file (or one it includes) leaves for the command line (`X = %gin.REQUIRED`)."""
  text = path.read_text()
  macros = re.findall(r"^(\w+) = %gin\.REQUIRED", text, flags=re.MULTILINE)
  for included in re.findall(r'^include "([^"]+)"', text, flags=re.MULTILINE):
    macros += _required_macros(REPO_ROOT / "gin" / included)
  return macros


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_there_are_gin_files():
  assert GIN_FILES


@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_gin_file_names_its_command_and_parses(path):
  module, files = _header(path)
  assert files[0].resolve() == path.resolve(), "the header's first --gin_file is another file"
  if module.startswith("t5x."):
    _check_t5x_run(module, files)
    return
  # The job module registers its configurables on import.
  importlib.import_module(module)
  required = [macro for f in files for macro in _required_macros(f)]
  gin_utils.parse([str(f) for f in files], [f"{macro} = '/tmp/unused'" for macro in required])
  assert gin.config_is_locked()


# --- t5x's jobs (gin/t5x/) -------------------------------------------------------------
# t5x is not installable from PyPI, and its run files bind `__main__` (t5x's job), so
# they cannot parse here. What is checked is the Parti half: the model file builds our
# PartiT5xModel through gin, and the run file's task fits that model. docs/t5x.md says
# how the whole runs were checked against t5x's source.


def _macro(text: str, name: str):
  match = re.search(rf"^{name} = (.+)$", text, flags=re.MULTILINE)
  assert match, f"the t5x run file must set {name}"
  return ast.literal_eval(match[1])


# The one model file the t5x run files are given with.
T5X_MODEL_FILE = REPO_ROOT / "gin" / "t5x" / "parti_tiny.gin"


def _check_t5x_run(module: str, files):
  assert T5X_MODEL_FILE in files, "a t5x command names the model file"
  gin_utils.parse([str(T5X_MODEL_FILE)], ["OPTIMIZER = None"])
  model = gin.query_parameter("%MODEL").scoped_configurable_fn()
  run_file = next((f for f in files if f != T5X_MODEL_FILE), None)
  config = model.config
  if run_file is None:
    return
  text = run_file.read_text()
  stock_run = {"t5x.train": "pretrain", "t5x.eval": "eval", "t5x.infer": "infer"}[module]
  assert f"include 't5x/configs/runs/{stock_run}.gin'" in text
  importlib.import_module(_macro(text, "MIXTURE_OR_TASK_MODULE"))
  task = seqio.get_mixture_or_task(_macro(text, "MIXTURE_OR_TASK_NAME"))
  lengths = _macro(text, "TASK_FEATURE_LENGTHS")
  assert lengths["targets"] == config.image_length
  assert lengths["inputs"] <= config.text_length
  assert task.output_features["targets"].vocabulary.vocab_size == config.image_vocab_size
  assert task.output_features["inputs"].vocabulary.vocab_size <= config.text_vocab_size
  if module == "t5x.train":  # t5x's pretrain.gin packs; our converter refuses packing.
    for scope in ("train", "train_eval"):
      assert f"{scope}/utils.DatasetConfig.pack = False" in text


def test_t5x_model_file_builds_the_model_t5x_gets():
  from parti.modeling.t5x_model import PartiT5xModel

  gin_utils.parse([str(T5X_MODEL_FILE)], ["OPTIMIZER = 'the optimizer'"])
  model = gin.query_parameter("%MODEL").scoped_configurable_fn()
  assert isinstance(model, PartiT5xModel)
  assert model.optimizer_def == "the optimizer"
  assert model.config.image_grid == (8, 8) and model.config.image_vocab_size == 11


def test_t5x_guide_lists_the_gin_files_as_they_are():
  guide = (REPO_ROOT / "docs" / "t5x.md").read_text()
  listings = re.findall(r"^### `(gin/t5x/[\w.]+)`\n\n```gin\n(.*?)```$", guide, re.S | re.M)
  assert len(listings) == 2
  for path, listing in listings:
    assert listing == (REPO_ROOT / path).read_text(), f"docs/t5x.md's listing of {path} is stale"


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


def test_prepare_shapes_gin_runs_and_skips_when_prepared(tmp_path, capsys):
  from parti.tasks import prepare_shapes

  bindings = [
    f"DATA_DIR = '{tmp_path}'",
    "prepare_shapes.config = 'tiny'",
    "prepare_shapes.image_size = 32",
    "prepare_shapes.num_train = 12",
    "prepare_shapes.num_eval = 4",
  ]
  gin_utils.parse(["gin/data/prepare_shapes.gin"], bindings)
  shapes = prepare_shapes.configured_prepare_shapes()
  assert shapes.info.splits["train"].num_examples == 12
  assert (tmp_path / "parti_shapes_tiny_preview.png").stat().st_size > 0
  prepare_shapes.configured_prepare_shapes()
  assert "already prepared" in capsys.readouterr().out


def test_prepare_shapes_rejects_unknown_and_shadowing_configs(tmp_path):
  from parti.runtime.errors import ConfigError
  from parti.tasks import prepare_shapes

  with pytest.raises(ConfigError, match="Unknown shapes config 'huge'"):
    prepare_shapes.prepare_shapes(data_dir=str(tmp_path), config="huge")
  with pytest.raises(ConfigError, match="needs a new name"):
    prepare_shapes.prepare_shapes(data_dir=str(tmp_path), config="64", num_train=5)


def test_train_vocab_gin_runs(tmp_path):
  from parti.tasks import train_vocab, vocabularies

  gin_utils.parse(
    ["gin/data/train_vocab_shapes.gin"],
    [f"MODEL_DIR = '{tmp_path}'", "train_vocab.shapes_examples = 300"],
  )
  path = train_vocab.configured_train_vocab()
  vocabulary = vocabularies.text_vocabulary(path)
  assert vocabulary.decode(vocabulary.encode("a red circle")) == "a red circle"
  assert "train_vocab.shapes_examples = 300" in (tmp_path / gin_utils.OPERATIVE_CONFIG).read_text()


def _pre_encoded_shapes(folder, grid=(16, 16), codes=512, count=16):
  """A pre-encoded folder shaped like the tiny tokenizer's shapes (16x16 tokens, 512 codes)."""
  from parti.tasks import token_records

  token_records.write_provenance(
    folder, token_records.Provenance("synthetic", codes, grid, 64, "parti_shapes_64_10k")
  )
  rng = np.random.default_rng(0)
  for split in ("train", "validation"):
    records = [
      token_records.serialize(
        f"{split}{i}", "a red circle above a blue square", rng.integers(0, codes, grid[0] * grid[1])
      )
      for i in range(count)
    ]
    token_records.write_shard(folder / token_records.shard_name(split, 0, 0), records)


@pytest.mark.slow
def test_pretrain_tiny_shapes_gin_trains(tmp_path):
  from parti import train
  from parti.runtime import metric_logging

  _pre_encoded_shapes(tmp_path / "tokens")
  gin_utils.parse(
    ["gin/runs/pretrain_tiny_shapes.gin"],
    [
      f"MODEL_DIR = '{tmp_path / 'run'}'",
      f"PRE_ENCODED_DIR = '{tmp_path / 'tokens'}'",
      "TRAIN_STEPS = 2",
      "BATCH_SIZE = 8",
      "train.eval_batches = 1",
      "train.peak_flops = 1e11",
    ],
  )
  result = train.configured_train()
  assert np.isfinite(result["eval/loss"])
  rows = metric_logging.read_metrics(tmp_path / "run")
  assert sorted(rows) == [2] and np.isfinite(rows[2]["train/loss"])
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
  assert "TRAIN_STEPS = 2" in (tmp_path / "run" / gin_utils.OPERATIVE_CONFIG).read_text()
