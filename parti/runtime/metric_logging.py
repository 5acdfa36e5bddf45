"""Metrics to TensorBoard (through clu) and to MODEL_DIR/metrics.jsonl, and a progress line.

clu's metric writers need TensorFlow; where it is missing (an accelerator
machine running a synthetic benchmark, say) scalars still go to the log and to
metrics.jsonl, and images to PNG files.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging

from parti.runtime import files
from parti.runtime import images as images_io


class MetricLogger:
  """Writes scalars and images; only process 0 writes files."""

  def __init__(self, model_dir: str | pathlib.Path, resumed_at: int | None = None):
    """`resumed_at`: the step a run resumes from; rows logged after it (by the run
    that was killed before its next checkpoint) are dropped, as those steps run again."""
    self.directory = pathlib.Path(model_dir)
    self._chief = jax.process_index() == 0
    self._writer = None
    if self._chief:
      self.directory.mkdir(parents=True, exist_ok=True)
      if resumed_at is not None:
        self._drop_rows_after(resumed_at)
      try:
        from clu import metric_writers
      except ImportError:
        logging.info("TensorBoard summaries off (clu needs TensorFlow); writing metrics.jsonl.")
      else:
        self._writer = metric_writers.create_default_writer(str(self.directory), asynchronous=True)

  def _drop_rows_after(self, step: int) -> None:
    path = self.directory / "metrics.jsonl"
    if not path.is_file():
      return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if (_step_of(line) or 0) <= step]
    if len(kept) != len(lines):
      files.atomic_write_text(path, "".join(line + "\n" for line in kept))
      logging.info(
        "Dropped %d metric rows after step %d, which runs again.", len(lines) - len(kept), step
      )

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    values = {k: float(v) for k, v in values.items()}
    if not self._chief:
      return
    with open(self.directory / "metrics.jsonl", "a", encoding="utf-8") as handle:
      handle.write(json.dumps({"step": step, **values}) + "\n")
    if self._writer is not None:
      self._writer.write_scalars(step, values)

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: name -> [H, W, 3] in [0, 1]; to TensorBoard and images/NAME_STEP.png."""
    if not self._chief:
      return
    for name, image in images.items():
      filename = f"{name.replace('/', '_')}_{step:07d}.png"
      files.atomic_write_bytes(self.directory / "images" / filename, images_io.png_bytes(image))
    if self._writer is not None:
      self._writer.write_images(step, {k: np.asarray(v)[None] for k, v in images.items()})

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()


def _step_of(line: str) -> int | None:
  """The step of a metrics.jsonl line, or None for a torn one (which is kept)."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def read_metrics(model_dir: str | pathlib.Path) -> dict[int, dict[str, float]]:
  """step -> metrics from metrics.jsonl; a resumed run's later lines win, torn lines are skipped."""
  path = pathlib.Path(model_dir) / "metrics.jsonl"
  table: dict[int, dict[str, float]] = {}
  if not path.exists():
    return table
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    table.setdefault(row.pop("step"), {}).update(row)
  return table


class Progress:
  """Logs `step/total (pct) | rate unit/s | ETA` every `every` steps."""

  def __init__(
    self, total_steps: int, start_step: int = 0, unit: str = "examples", every: int = 50
  ):
    self.total = total_steps
    self.unit = unit
    self.every = every
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self._count = 0

  def update(self, step: int, count: int) -> str | None:
    """Records `count` units done by `step`; returns (and logs) a line when one is due."""
    self._count += count
    if step % self.every and step != self.total:
      return None
    now = time.perf_counter()
    seconds = max(now - self._last_time, 1e-9)
    rate = self._count / seconds
    steps_per_second = (step - self._last_step) / seconds
    remaining = (self.total - step) / steps_per_second if steps_per_second > 0 else math.inf
    line = (
      f"step {step}/{self.total} ({100 * step / self.total:.0f}%) | "
      f"{rate:.1f} {self.unit}/s | ETA {format_duration(remaining)}"
    )
    logging.info("%s", line)
    print(line, flush=True)
    self._last_step, self._last_time, self._count = step, now, 0
    return line


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
