"""The end-to-end demo driver: its stages, resume, failures and summary (the jobs are faked)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from helpers import REPO_ROOT

from parti import demo
from parti.evaluation import shapes_report
from parti.runtime import stages
from parti.runtime.errors import ConfigError


def test_every_stage_runs_the_job_its_gin_file_names(tmp_path):
  assert len(stages.demo_stages(tmp_path)) == 7
  long_plan = stages.demo_stages(tmp_path, long=True)
  assert [s.name for s in long_plan][-6:] == [
    "parti",
    "parti_edit",
    "upsampler_data",
    "upsampler",
    "infer",
    "evaluate",
  ]
  for long in (False, True):
    for stage in stages.demo_stages(tmp_path, long):
      command = stage.command(long)
      gin_file = REPO_ROOT / command[3].removeprefix("--gin_file=")
      assert gin_file.is_file(), gin_file
      header = gin_file.read_text().splitlines()[0]
      assert header.startswith(f"# python -m {stage.module} --gin_file=gin/demo/"), header
      # The stage binds exactly the macros its gin file leaves required.
      bound = {arg.split("=")[0].removeprefix("--gin.") for arg in command[4:]}
      required = set(re.findall(r"--gin\.(\w+)=", header))
      assert bound == required, (stage.name, bound, required)


class FakeJobs:
  """Stands in for subprocess.run: records commands, and fails the stage named `fail`."""

  def __init__(self, fail: str | None = None):
    self.fail, self.modules = fail, []

  def __call__(self, command, stdout, stderr, check):
    module = command[2]
    self.modules.append(module)
    stdout.write(f"running {module}\n".encode())
    if self.fail and self.fail in command[3]:
      stdout.write(b"Traceback: the job broke\n")
      return subprocess.CompletedProcess(command, 3)
    return subprocess.CompletedProcess(command, 0)


def test_stages_run_in_order_and_a_rerun_resumes_after_a_failure(tmp_path, monkeypatch, capsys):
  runs = tmp_path / "runs"
  failing = FakeJobs(fail="demo/encode")
  monkeypatch.setattr(stages.subprocess, "run", failing)
  monkeypatch.setattr(stages, "_compare_vocabulary", lambda path: None)
  with pytest.raises(RuntimeError, match=r"(?s)Stage encode failed \(exit 3\).*the job broke"):
    demo.run_demo(str(runs))
  assert failing.modules == [
    "parti.tasks.prepare_shapes", "parti.tasks.train_vocab", "parti.tokenizer.train",
    "parti.tokenizer.encode",
  ]  # fmt: skip
  assert sorted(p.name for p in runs.glob("*.done")) == [
    "data.done",
    "tokenizer.done",
    "vocab.done",
  ]
  prompts = (runs / "held_out_prompts.txt").read_text().splitlines()
  assert len(prompts) == 2 * demo.HELD_OUT_PROMPTS and all(prompts)

  resumed = FakeJobs()
  monkeypatch.setattr(stages.subprocess, "run", resumed)
  seconds = demo.run_demo(str(runs))
  assert resumed.modules == [
    "parti.tokenizer.encode", "parti.train", "parti.infer", "parti.evaluate_shapes",
  ]  # fmt: skip
  assert sorted(seconds) == ["encode", "evaluate", "infer", "parti"]
  out = capsys.readouterr().out
  assert "[1/7] data: done earlier, skipped" in out and "[5/7] parti" in out
  assert "All stages:" in out


def test_the_long_variant_uses_its_own_gin_files_and_folder(tmp_path, monkeypatch):
  jobs = FakeJobs()
  commands = []
  monkeypatch.setattr(
    stages.subprocess, "run", lambda command, **kw: commands.append(command) or jobs(command, **kw)
  )
  monkeypatch.setattr(stages, "_compare_vocabulary", lambda path: None)
  demo.run_demo(str(tmp_path / "long"), long=True, only=["tokenizer", "parti"])
  assert [c[3] for c in commands] == [
    "--gin_file=gin/demo/tokenizer_long.gin", "--gin_file=gin/demo/parti_long.gin",
  ]  # fmt: skip
  with pytest.raises(ConfigError, match="another --runs_dir"):
    demo.run_demo(str(tmp_path / "long"), long=False)
  with pytest.raises(ConfigError, match="Unknown demo stages"):
    demo.run_demo(str(tmp_path / "other"), only=["tokeniser"])


def test_summary_table_has_a_row_per_prompt_kind_and_a_column_per_split_and_scale():
  row = lambda all_right: {"all": all_right, "prompts": 4}  # noqa: E731
  results = {
    "1.0": {
      "test": {"basic": row(0.5), "overall": row(0.25)},
      "compositional": {"overall": row(0.0)},
    },
    "2.0": {
      "test": {"basic": row(1.0), "overall": row(0.75)},
      "compositional": {"overall": row(0.5)},
    },
  }
  lines = demo.summary_table(results).splitlines()
  assert (
    lines[0]
    == "| prompt kind | test λ=1.0 | compositional λ=1.0 | test λ=2.0 | compositional λ=2.0 |"
  )
  assert lines[2] == "| basic | 50% | - | 100% | - |"
  assert lines[3] == "| overall | 25% | 0% | 75% | 50% |"


def test_the_summary_reads_the_jobs_outputs(tmp_path, capsys):

  (tmp_path / "evaluate").mkdir()
  results = {"1.0": {"test": {"overall": {"all": 0.5, "prompts": 2}}}}
  (tmp_path / "evaluate" / shapes_report.REPORT_JSON).write_text(json.dumps({"results": results}))
  (tmp_path / "tokenizer").mkdir()
  (tmp_path / "tokenizer" / "metrics.jsonl").write_text(
    json.dumps({"step": 250, "eval/psnr": 24.5, "eval/codebook_usage": 0.9}) + "\n"
  )
  (tmp_path / "parti").mkdir()
  (tmp_path / "parti" / "metrics.jsonl").write_text(
    json.dumps({"step": 9, "eval/loss": 1.5, "eval/text_gap": 0.4, "eval/object_text_gap": 2.25})
    + "\n"
  )
  (tmp_path / "data.done").write_text(json.dumps({"seconds": 30.0}))
  demo._summary(tmp_path, stages.demo_stages(tmp_path))
  out = capsys.readouterr().out
  assert "All stages: 0m30s" in out
  assert "held-out PSNR 24.5 dB, codebook usage 90%" in out
  assert "worth 0.40 nats per token, 2.25 per object token" in out
  assert "prompts: 2 test" in out
  assert "| overall | 50% |" in out


def test_a_stage_whose_configuration_changed_is_not_skipped_silently(tmp_path, monkeypatch):
  base, top = tmp_path / "base.gin", tmp_path / "top.gin"
  base.write_text("train.num_steps = 10\n")
  top.write_text(f"include '{base}'\nMODEL_DIR = None\n")
  plan = [stages.Stage("train", "parti.train", str(top), {"MODEL_DIR": str(tmp_path / "m")})]
  jobs = FakeJobs()
  monkeypatch.setattr(stages.subprocess, "run", jobs)
  runs = tmp_path / "runs"
  runs.mkdir()
  stages.run_stages(runs, plan)
  stages.run_stages(runs, plan)  # Unchanged: skipped.
  # A run folder given under another name is the same configuration.
  moved = [stages.Stage("train", "parti.train", str(top), {"MODEL_DIR": "/elsewhere"})]
  stages.run_stages(runs, moved)
  assert jobs.modules == ["parti.train"]

  base.write_text("train.num_steps = 20\n")  # An included file changed.
  with pytest.raises(
    ConfigError, match=r"(?s)Stage train was done with another config.*train\.done"
  ):
    stages.run_stages(runs, plan)
  assert jobs.modules == ["parti.train"]  # Nothing ran; the outputs are kept.

  # Stamps from before fingerprints existed are trusted; an unreadable one is named.
  (runs / "train.done").write_text(json.dumps({"seconds": 1.0}))
  stages.run_stages(runs, plan)
  (runs / "train.done").write_text("{not json")
  with pytest.raises(ConfigError, match=r"train\.done is unreadable"):
    stages.run_stages(runs, plan)
  assert jobs.modules == ["parti.train"]
