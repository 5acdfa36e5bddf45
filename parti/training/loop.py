"""The training loop that the Parti, tokenizer and contrastive jobs share.

A job builds its model's state, its jitted step and its evaluation; this module owns
what every run does around them, written once:

  - the start: TFDS override, mesh and rules, the batch and step-count checks;
  - resuming: the resumable input iterator, the checkpointer and the restore, the
    run's config file on a fresh start, and the operative gin config;
  - the loop: the step under the mesh's rules, logging with progress (rate, ETA),
    a stop on a non-finite loss that names the last good checkpoint, periodic
    evaluation, periodic checkpoints, and a clean stop on SIGTERM (preemption);
  - `perf/train_seconds`, the loop's wall time summed over resumes (the x axis of a
    learning curve), and the steps/s of timed steps (compilation, evaluation and
    checkpoints excluded);
  - closing every checkpointer and flushing the metrics on every path out.

Each job adds what is its own through hooks: extra scalars (a learning rate, MFU),
work after a step (dead-code restarts, sample images) and after an evaluation (the
best checkpoint).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from parti import partitioning
from parti.runtime import gin_utils, metric_logging
from parti.runtime.errors import ConfigError, Preempted
from parti.runtime.validation import check_types
from parti.training import checkpoints

# The meta key of the loop's wall time, summed over resumes.
TRAIN_SECONDS = "train_seconds"


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How long a run trains, and how often it logs, evaluates and checkpoints (in steps)."""

  num_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int

  def __post_init__(self):
    check_types(self)
    bad = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) < 1]
    if bad:
      raise ConfigError(
        f"{', '.join(bad)} must be positive, not {[getattr(self, n) for n in bad]}."
      )


def start_mesh(
  mesh: partitioning.MeshConfig, batch_size: int, tfds_data_dir: str | None = None
) -> tuple[jax.sharding.Mesh, Any]:
  """(device mesh, logical-axis rules) of a training run, once its batch is checked to
  split over the data axes. Points seqio at `tfds_data_dir` first, when given."""
  if tfds_data_dir:
    import seqio

    seqio.set_tfds_data_dir_override(tfds_data_dir)
  device_mesh = partitioning.create_mesh(mesh)
  partitioning.check_batch_size(batch_size, device_mesh)
  return device_mesh, partitioning.rules_for(mesh)


@dataclasses.dataclass
class Resumed:
  """Where a run starts: its state, step and checkpoint meta, the checkpointer that keeps
  saving it, and the training data's iterator, positioned where the checkpoint left it."""

  state: Any
  start: int
  meta: dict
  checkpointer: checkpoints.Checkpointer
  iterator: Any


def resume(
  model_dir: pathlib.Path,
  state,
  state_shardings,
  train_data,
  *,
  keep: int,
  save_every: int,
  config,
  config_file: str,
) -> Resumed:
  """The latest checkpoint restored (with the input position of `train_data`, a
  tf.data.Dataset), or a fresh start that saves `config` (a config dataclass with
  `save` and `load`) as `model_dir/config_file`. Writes the operative gin config
  either way (chief host only).

  Raises:
    ConfigError: `model_dir` holds a run of another config: its checkpoints would not
      fit, so nothing there is read, moved or written.
  """
  from parti.tasks import input_pipeline

  check_same_config(model_dir / config_file, config)
  iterator = input_pipeline.ResumableIterator(train_data)
  checkpointer = checkpoints.Checkpointer(model_dir, keep=keep, save_every=save_every)
  state, start, meta = checkpoints.restore_train_state(
    checkpointer, state, state_shardings, iterator
  )
  if not start and jax.process_index() == 0:
    model_dir.mkdir(parents=True, exist_ok=True)
    config.save(model_dir / config_file)
  gin_utils.write_operative_config(model_dir if jax.process_index() == 0 else None)
  return Resumed(state, start, meta, checkpointer, iterator)


def check_same_config(path: pathlib.Path, config) -> None:
  """Refuses to train `config` in a folder whose saved config (at `path`) differs,
  naming the fields: a rerun with another architecture must not take over a run."""
  if not path.is_file():
    return
  saved = type(config).load(path)
  if saved == config:
    return
  changed = [
    f"{f.name}: {getattr(saved, f.name)!r} there, {getattr(config, f.name)!r} here"
    for f in dataclasses.fields(config)
    if getattr(saved, f.name) != getattr(config, f.name)
  ]
  raise ConfigError(
    f"{path.parent} holds a run of another config ({'; '.join(changed)}). Its checkpoints "
    "would not fit, so nothing there was touched: train into another MODEL_DIR (or start "
    "from this run with init_from), or rerun with the saved config."
  )


@dataclasses.dataclass
class Hooks:
  """A job's own parts of the loop.

  Attributes:
    step: (step number before it, state, global batch) -> (state, metrics); jitted and
      donating the state.
    next_batch: the next global batch.
    loss_key: the logged metric that must stay finite.
    evaluate: (step, state, writer) -> scalars, or None for no evaluation; the loop
      logs and writes the scalars it returns.
    metric_prefix: prepended to the step's metric names ("train/"; "" when the step's
      names already say what they are).
    extra_scalars: (step, timed steps per second or None) -> scalars logged with the
      step's (a learning rate, throughput).
    after_step: (step, state, batch, writer) -> (state, paused): work after a step;
      `paused` says it was not training time (sampling images), so the timer restarts.
    after_evaluation: (step, state, evaluation scalars) -> None (the best checkpoint).
    checkpoint_meta: () -> extra meta saved with each checkpoint.
  """

  step: Callable
  next_batch: Callable[[], Any]
  loss_key: str
  evaluate: Callable[[int, Any, metric_logging.MetricLogger], dict[str, float]] | None = None
  metric_prefix: str = "train/"
  extra_scalars: Callable[[int, float | None], dict[str, float]] | None = None
  after_step: Callable[[int, Any, Any, metric_logging.MetricLogger], tuple[Any, bool]] | None = None
  after_evaluation: Callable[[int, Any, dict[str, float]], None] | None = None
  checkpoint_meta: Callable[[], dict] | None = None


def run(
  hooks: Hooks,
  resumed: Resumed,
  *,
  schedule: Schedule,
  mesh: jax.sharding.Mesh,
  rules,
  model_dir: pathlib.Path,
  examples_per_step: int,
  unit: str = "images",
  also_close: Sequence[checkpoints.Checkpointer] = (),
) -> dict[str, float]:
  """Trains from where `resumed` starts to `schedule.num_steps`; returns the last logged
  or evaluated scalars.

  Raises:
    Preempted: SIGTERM arrived; the step it interrupted was checkpointed.
    FloatingPointError: a non-finite loss, naming the last good checkpoint.
  """
  state, start, checkpointer, iterator = (
    resumed.state, resumed.start, resumed.checkpointer, resumed.iterator
  )  # fmt: skip
  seconds_before = float(resumed.meta.get(TRAIN_SECONDS, 0.0))
  writer = metric_logging.MetricLogger(model_dir, resumed_at=start)
  progress = metric_logging.Progress(schedule.num_steps, start, unit=unit, every=schedule.log_every)
  preemption = checkpoints.Preemption()
  result: dict[str, float] = {}
  step = start
  timer = None  # Starts after the first step, so that compilation is not counted.
  timed_steps = 0
  loop_start = time.perf_counter()

  def train_seconds() -> float:
    return seconds_before + time.perf_counter() - loop_start

  logging.info("Training from step %d to %d.", step, schedule.num_steps)
  try:
    with preemption.watching():
      while step < schedule.num_steps:
        batch = hooks.next_batch()
        with partitioning.activate(mesh, rules):
          state, metrics = hooks.step(step, state, batch)
        step += 1
        if timer is None:
          jax.block_until_ready(metrics)
          timer = time.perf_counter()
        else:
          timed_steps += 1
        last = step == schedule.num_steps
        paused = False  # Evaluations, images and checkpoints are not training time.
        if hooks.after_step:
          with partitioning.activate(mesh, rules):
            state, paused = hooks.after_step(step, state, batch, writer)
        if step % schedule.log_every == 0 or last:
          rate = timed_steps / (time.perf_counter() - timer) if timed_steps else None
          result = _log_step(hooks, writer, checkpointer, step, metrics, rate, train_seconds())
          progress.update(step, schedule.log_every * examples_per_step)
          if rate is not None:
            timer, timed_steps = time.perf_counter(), 0
        if hooks.evaluate and (step % schedule.eval_every == 0 or last):
          paused = True
          result = hooks.evaluate(step, state, writer)
          writer.scalars(step, result)
          logging.info("Evaluation at step %d: %s", step, result)
          if hooks.after_evaluation:
            hooks.after_evaluation(step, state, result)
        if checkpointer.should_save(step) or last or preemption.requested:
          paused = True
          meta = {
            TRAIN_SECONDS: train_seconds(),
            **(hooks.checkpoint_meta() if hooks.checkpoint_meta else {}),
          }
          checkpoints.save_train_state(checkpointer, step, state, meta, iterator)
        if preemption.requested:
          raise Preempted(step, checkpointer.directory)
        if paused and timer is not None:
          jax.block_until_ready(state)
          timer, timed_steps = time.perf_counter(), 0
  finally:
    for closing in (checkpointer, *also_close):
      closing.close()
    writer.flush()
  return result


def _log_step(
  hooks: Hooks, writer, checkpointer, step, metrics, rate: float | None, seconds: float
):
  """Writes the step's metrics (and the job's extra scalars); stops on a non-finite loss."""
  scalars = {f"{hooks.metric_prefix}{k}": float(v) for k, v in jax.device_get(metrics).items()}
  loss = scalars[hooks.loss_key]
  if not np.isfinite(loss):
    raise FloatingPointError(
      f"Loss is {loss} at step {step}; stopping. The last good checkpoint is in "
      f"{checkpointer.directory} (steps {checkpointer.steps()})."
    )
  scalars["perf/train_seconds"] = seconds
  if rate is not None:
    scalars["perf/steps_per_second"] = rate
  if hooks.extra_scalars:
    scalars.update(hooks.extra_scalars(step, rate))
  writer.scalars(step, scalars)
  return scalars
