"""The scaling study's driver and report (the jobs are faked; their outputs written here)."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import REPO_ROOT
from PIL import Image

from parti import scaling
from parti.evaluation import shapes_report
from parti.modeling.config import PartiConfig
from parti.runtime import stages


def test_each_size_trains_a_bigger_model_with_the_demo_recipe():
  import gin

  from parti import train  # noqa: F401  (registers the configurables)
  from parti.runtime import gin_utils

  widths, steps, tasks, rates = [], [], [], []
  for size in scaling.SIZES:
    gin.clear_config()
    gin_utils.parse(
      [str(REPO_ROOT / f"gin/scaling/parti_{size}.gin")],
      ["MODEL_DIR = '/tmp/m'", "PRE_ENCODED_DIR = '/tmp/p'"],
    )
    widths.append(gin.query_parameter("parti.PartiConfig.embed_dim"))
    steps.append(gin.query_parameter("%TRAIN_STEPS"))
    tasks.append(gin.query_parameter("%MIXTURE_OR_TASK_NAME"))
    rates.append(gin.query_parameter("optim.AdamConfig.learning_rate"))
  gin.clear_config()
  assert widths == sorted(widths) and len(set(widths)) == 3
  assert len(set(steps)) == 1  # The same steps for every size.
  # ... on the long demo's 100k scenes, which the prerequisites prepare.
  assert set(tasks) == {"parti_shapes_48_100k_factored_tokens"}
  # Adam's learning rate scales as 1 / width, the demo's 3e-3 at width 64.
  assert [rate * width for rate, width in zip(rates, widths, strict=True)] == pytest.approx(
    [3e-3 * 64] * 3
  )


def _fake_outputs(runs, size, width, loss, accuracy):
  model_dir = runs / f"parti_{size}"
  model_dir.mkdir(parents=True)
  PartiConfig(
    text_vocab_size=128, text_length=32, image_vocab_size=512, image_grid=(16, 16),
    embed_dim=width, mlp_dim=4 * width, num_heads=4, num_encoder_layers=2, num_decoder_layers=4,
  ).save(model_dir / "parti_config.json")  # fmt: skip
  (model_dir / "metrics.jsonl").write_text(
    json.dumps({"step": 120, "eval/loss": loss + 1})
    + "\n"
    + json.dumps({"step": 240, "eval/loss": loss})
    + "\n"
  )
  out = runs / f"evaluate_{size}"
  out.mkdir()
  results = {
    scale: {
      split: {"overall": {"all": accuracy * factor, "shape": accuracy / 2, "prompts": 64}}
      for split in ("test", "compositional")
    }
    for scale, factor in (("1.0", 0.5), ("2.0", 1.0))
  }
  (out / shapes_report.REPORT_JSON).write_text(json.dumps({"results": results}))


def test_the_study_runs_every_stage_and_reports_each_size(tmp_path, monkeypatch, capsys):
  runs, demo_dir = tmp_path / "scaling", tmp_path / "demo"
  commands = []

  def fake_job(command, stdout, stderr, check):
    commands.append(command[2:4])
    gin_file = command[3]
    for size, width, loss, accuracy in (
      ("small", 64, 2.0, 0.2),
      ("base", 128, 1.5, 0.4),
      ("large", 192, 1.2, 0.6),
    ):
      if gin_file == f"--gin_file=gin/scaling/parti_{size}.gin":
        _fake_outputs(runs, size, width, loss, accuracy)
    return subprocess.CompletedProcess(command, 0)

  monkeypatch.setattr(stages.subprocess, "run", fake_job)
  monkeypatch.setattr(stages, "_compare_vocabulary", lambda path: None)
  rows = scaling.run_scaling(str(demo_dir), str(runs))
  assert [c[0] for c in commands] == [
    "parti.tasks.prepare_shapes", "parti.tasks.train_vocab", "parti.tokenizer.train",
    "parti.tokenizer.encode", *["parti.train", "parti.evaluate_shapes"] * 3,
  ]  # fmt: skip
  # The long demo's data, tokenizer and tokens.
  assert [c[1] for c in commands[:4]] == [
    "--gin_file=gin/demo/data_long.gin", "--gin_file=gin/demo/vocab.gin",
    "--gin_file=gin/demo/tokenizer_long.gin", "--gin_file=gin/demo/encode_long.gin",
  ]  # fmt: skip
  assert [r["size"] for r in rows] == ["small", "base", "large"]
  counts = [r["parameters"] for r in rows]
  assert counts == sorted(counts) and counts[0] > 0
  assert [r["eval_loss"] for r in rows] == [2.0, 1.5, 1.2]  # The last evaluation.
  report = (runs / scaling.REPORT).read_text()
  assert "| large |" in report and "| 60% | 60% |" in report
  # Each attribute alone, at the smallest λ on the test split.
  assert "Each attribute alone (test λ=1.0)" in report and "| large | 30% |" in report
  assert Image.open(runs / scaling.PLOT).size == (640, 300)
  # A rerun skips every finished stage.
  commands.clear()
  scaling.run_scaling(str(demo_dir), str(runs))
  assert commands == []
  assert "done earlier, skipped" in capsys.readouterr().out


def test_a_study_with_nothing_finished_is_an_error(tmp_path, monkeypatch):
  monkeypatch.setattr(
    stages.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(command, 0)
  )
  monkeypatch.setattr(stages, "_compare_vocabulary", lambda path: None)
  with pytest.raises(scaling.ConfigError, match="No size of the study finished"):
    scaling.run_scaling(str(tmp_path / "demo"), str(tmp_path / "runs"))
