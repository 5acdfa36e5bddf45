"""The training loop the three training jobs share (parti.training.loop), on a toy state."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parti import partitioning
from parti.runtime import metric_logging
from parti.runtime.errors import PREEMPTED_EXIT_CODE, ConfigError, Preempted
from parti.training import checkpoints, loop


@flax.struct.dataclass
class ToyState:
  step: jax.Array
  params: Any


def _toy(tmp_path, losses, **hooks):
  """A run whose step n (1-based) reports losses[n - 1]; returns (resumed, hooks, mesh)."""
  state = ToyState(jnp.zeros((), jnp.int32), {"w": jnp.zeros((2,), jnp.float32)})
  checkpointer = checkpoints.Checkpointer(tmp_path, keep=5, save_every=2)
  resumed = loop.Resumed(state, 0, {}, checkpointer, iterator=None)

  def step(number, state, batch):
    del batch
    new = ToyState(state.step + 1, {"w": state.params["w"] + 1.0})
    return new, {"loss": jnp.float32(losses[number])}

  return resumed, loop.Hooks(step=step, next_batch=lambda: None, loss_key="train/loss", **hooks)


def _run(tmp_path, resumed, hooks, num_steps, **kwargs):
  mesh = partitioning.create_mesh(partitioning.MeshConfig())
  return loop.run(
    hooks, resumed, schedule=loop.Schedule(num_steps, log_every=1, eval_every=3,
                                           checkpoint_every=2),
    mesh=mesh, rules=partitioning.rules_for(partitioning.MeshConfig()), model_dir=tmp_path,
    examples_per_step=4, **kwargs,
  )  # fmt: skip


def test_schedule_names_every_step_count_that_is_not_positive():
  with pytest.raises(ConfigError, match=r"log_every, checkpoint_every must be positive"):
    loop.Schedule(num_steps=10, log_every=0, eval_every=5, checkpoint_every=-1)
  assert loop.Schedule(1, 1, 1, 1).num_steps == 1


def _start_job(job: str, **common):
  """Starts one of the three training jobs with `common` arguments (and placeholders)."""
  from helpers import tiny_reranker_config, tiny_run_config, tiny_tokenizer_config

  from parti import train, train_contrastive
  from parti.tokenizer import train as train_tokenizer

  if job == "parti":
    lengths = {"inputs": 16, "targets": 16}
    return train.train(**common, model=tiny_run_config(), mixture_or_task_name="unused",
                       task_feature_lengths=lengths)  # fmt: skip
  if job == "tokenizer":
    return train_tokenizer.train(**common, config=tiny_tokenizer_config(), task="unused")
  return train_contrastive.train_contrastive(
    **common, model=tiny_reranker_config(), mixture_or_task_name="unused"
  )


@pytest.mark.parametrize("job", ["parti", "tokenizer", "contrastive"])
def test_every_training_job_checks_its_step_counts_before_touching_anything(tmp_path, job):
  model_dir = tmp_path / "run"
  with pytest.raises(ConfigError, match="log_every"):
    _start_job(job, model_dir=str(model_dir), batch_size=8, num_steps=10, log_every=0)
  assert not model_dir.exists()


def test_a_run_logs_evaluates_checkpoints_and_times_itself(tmp_path):
  evaluated = []

  def evaluate(step, state, writer):
    evaluated.append(step)
    return {"eval/w": float(state.params["w"][0])}

  resumed, hooks = _toy(tmp_path, [3.0, 2.0, 1.5, 1.0, 0.5], evaluate=evaluate)
  result = _run(tmp_path, resumed, hooks, num_steps=5)
  assert evaluated == [3, 5]  # Every eval_every steps, and at the last.
  assert result == {"eval/w": 5.0}
  logged = metric_logging.read_metrics(tmp_path)
  assert [logged[s]["train/loss"] for s in range(1, 6)] == [3.0, 2.0, 1.5, 1.0, 0.5]
  seconds = [logged[s]["perf/train_seconds"] for s in range(1, 6)]
  assert seconds == sorted(seconds) and seconds[0] > 0
  assert logged[3]["eval/w"] == 3.0
  saved = checkpoints.Checkpointer(tmp_path, keep=5, save_every=2)
  assert saved.steps() == [2, 4, 5]
  _, _, meta = saved.restore(
    {"params": resumed.state.params, "train": resumed.state.replace(params=None)}
  )
  assert meta[loop.TRAIN_SECONDS] >= seconds[-1]
  saved.close()


def test_a_nan_loss_stops_naming_the_last_good_checkpoint_and_closes_everything(tmp_path):
  closed = []

  class Recorder:
    def close(self):
      closed.append(True)

  resumed, hooks = _toy(tmp_path, [1.0, 1.0, np.nan, 1.0])
  with pytest.raises(FloatingPointError, match=r"at step 3.*steps \[2\]"):
    _run(tmp_path, resumed, hooks, num_steps=4, also_close=(Recorder(),))
  assert closed == [True]


def test_sigterm_saves_the_step_it_interrupted_and_stops(tmp_path):
  def preempt(step, state, batch, writer):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return state, False

  resumed, hooks = _toy(tmp_path, [1.0] * 10, after_step=preempt)
  with pytest.raises(Preempted, match="at step 3"):
    _run(tmp_path, resumed, hooks, num_steps=10)
  saved = checkpoints.Checkpointer(tmp_path, keep=5, save_every=2)
  assert saved.steps() == [2, 3]
  saved.close()


def test_a_resumed_run_drops_the_metric_rows_of_the_steps_it_runs_again(tmp_path):
  rows = [{"step": s, "train/loss": 1.0} for s in range(1, 6)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{torn")
  resumed, hooks = _toy(tmp_path, [9.0] * 10)
  resumed.start = 3  # Killed after logging step 5; its last checkpoint was step 3.
  _run(tmp_path, resumed, hooks, num_steps=6)
  steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if line.startswith("{\"")]  # fmt: skip
  assert steps == [1, 2, 3, 4, 5, 6]  # Steps 4 and 5 once each, from the resumed run.
  assert metric_logging.read_metrics(tmp_path)[4]["train/loss"] == 9.0


def test_a_preempted_job_exits_with_its_own_status_and_a_bad_config_says_so_once(tmp_path):
  import subprocess
  import sys

  script = tmp_path / "job.py"
  script.write_text(
    "import sys\n"
    "from parti.runtime import gin_utils\n"
    "from parti.runtime.errors import ConfigError, Preempted\n"
    "mode = sys.argv.pop() if len(sys.argv) > 1 else ''\n"
    "def job():\n"
    "  if mode == 'bad':\n"
    "    raise ConfigError('batch_size 0 is not positive.')\n"
    "  raise Preempted(7, '/runs/x/checkpoints')\n"
    "gin_utils.run(job)\n"
  )
  preempted = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
  assert preempted.returncode == PREEMPTED_EXIT_CODE == 75
  assert "Stopped at step 7 after SIGTERM" in preempted.stderr
  bad = subprocess.run([sys.executable, str(script), "bad"], capture_output=True, text=True)
  assert bad.returncode == 2
  assert bad.stderr.count("batch_size 0 is not positive") == 1
