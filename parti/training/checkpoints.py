"""Checkpoints: orbax, async and sharded, with resume that survives a bad latest step.

A checkpoint is a set of named items (pytrees of possibly sharded arrays) plus a
small JSON `meta`, under MODEL_DIR/checkpoints/STEP. Orbax writes each step to a
temporary folder and commits it at the end, so a killed save never looks like
a checkpoint. A committed step that still fails to restore (a truncated file, a
disk error) is reported, moved to checkpoints_unusable/, and the previous step is
used instead.

The input pipeline's per-host iterator state is saved beside each step, in
MODEL_DIR/checkpoints/input_state/STEP/, so a resumed job sees the next unseen batch.
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import signal
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

INPUT_STATE = "input_state"

# Replica-parallel saving splits each replicated array among its replicas with an
# eager slice per distinct shape, that is one XLA compilation per parameter shape.
# That pays off for large arrays on many hosts; for small ones the compilations cost
# far more than the writes (most of a tiny CPU run's checkpoint time), so only arrays
# whose per-replica slice is at least this big are split.
_MIN_REPLICA_SLICE_BYTES = 4 << 20
ocp.type_handlers.register_type_handler(
  jax.Array,
  ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES),
  override=True,
)


class Checkpointer:
  """Saves and restores named items every `save_every` steps, keeping the last `keep`."""

  def __init__(
    self,
    model_dir: str | pathlib.Path,
    keep: int = 3,
    save_every: int = 1000,
    subdir: str = "checkpoints",
    read_only: bool = False,
  ):
    """`read_only`: for jobs that read another run (inference, evaluation): nothing in
    the folder is created, moved, written or pruned; an unrestorable step is skipped
    where it lies."""
    self.directory = pathlib.Path(model_dir).absolute() / subdir
    self.save_every = save_every
    self.read_only = read_only
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        # Read-only managers keep and save nothing (orbax warns about any other values).
        max_to_keep=None if read_only else keep,
        save_interval_steps=0 if read_only else 1,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=True,
        # Orbax names a barrier by its purpose alone ("...:set_value_start"), so two
        # managers finishing saves at once (a training job's latest and best
        # checkpoints) would wait at one barrier twice. The coordination service
        # refuses that ("already ongoing") and a multi-host job hangs until the
        # barrier times out. The folder, the same on every host, keeps them apart.
        multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=str(self.directory)
        ),
      ),
    )

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(
    self,
    step: int,
    items: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
    input_iterator=None,
  ) -> None:
    """Starts saving `items` at `step` (asynchronously; `wait` blocks until written).

    A step that already exists belongs to a timeline this run abandoned (it resumed
    from an earlier step): it is replaced.
    """
    if self.read_only:
      raise RuntimeError(f"{self.directory} was opened read-only; nothing may be saved there.")
    if step in self._manager.all_steps():
      self._manager.wait_until_finished()
      self._manager.delete(step)
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    args["meta"] = ocp.args.JsonSave(dict(meta or {}, step=step))
    self._manager.save(step, args=ocp.args.Composite(**args), force=True)
    if input_iterator is not None:
      input_iterator.save(self.directory / INPUT_STATE / str(step))
    self._prune_input_states()

  def restore(
    self, abstract_items: Mapping[str, Any], step: int | None = None, input_iterator=None
  ) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """Restores `abstract_items` (names -> trees of jax.ShapeDtypeStruct with shardings).

    Tries `step` (default: the latest), then each earlier step if one fails.

    Returns:
      (step, items, meta), or None when there is no usable checkpoint.
    """
    candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
    unusable: list[int] = []
    for candidate in candidates:
      try:
        args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
        args["meta"] = ocp.args.JsonRestore()
        restored = self._manager.restore(candidate, args=ocp.args.Composite(**args))
        if input_iterator is not None:
          input_iterator.restore(self.directory / INPUT_STATE / str(candidate))
      except Exception as error:  # Any failure: try the previous step.
        if step is not None:
          raise
        # One line: orbax's and TensorStore's messages run to dozens of lines.
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        logging.warning(
          "Checkpoint %d in %s cannot be restored (%s: %s); trying the previous one.",
          candidate, self.directory, type(error).__name__, first_line,
        )  # fmt: skip
        logging.debug("Checkpoint %d: the whole error", candidate, exc_info=error)
        unusable.append(candidate)
        continue
      if self.read_only and unusable:
        logging.warning(
          "Using checkpoint %d of %s: the later steps %s cannot be restored (left where "
          "they are).", candidate, self.directory, sorted(unusable),
        )  # fmt: skip
      elif not self.read_only:
        self._set_aside(unusable)
      items = {name: restored[name] for name in abstract_items}
      logging.info("Restored checkpoint %d from %s.", candidate, self.directory)
      return candidate, items, dict(restored["meta"])
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unrestorable steps to `<directory>_unusable/` (kept for inspection, not
    deleted), so that training can write those steps again."""
    if not steps:
      return
    if jax.process_index() == 0:
      aside = self.directory.with_name(self.directory.name + "_unusable")
      aside.mkdir(exist_ok=True)
      for unusable in steps:
        target = aside / str(unusable)
        shutil.rmtree(target, ignore_errors=True)
        (self.directory / str(unusable)).rename(target)
        logging.warning("Moved unrestorable checkpoint %d to %s.", unusable, target)
    multihost_utils.sync_global_devices("checkpoints_set_aside")
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def _prune_input_states(self) -> None:
    folder = self.directory / INPUT_STATE
    if jax.process_index() != 0 or not folder.exists():
      return
    self._manager.wait_until_finished()  # Orbax prunes old steps once a save commits.
    kept = {str(s) for s in self._manager.all_steps()}
    for child in folder.iterdir():
      if child.name not in kept:
        shutil.rmtree(child, ignore_errors=True)


def restore_train_state(checkpointer: Checkpointer, state, shardings, input_iterator=None):
  """(state, step, meta): a training job's latest checkpoint, or `state` at step 0.

  Jobs save their state (a flax struct with a `params` field) as two items, the
  parameters alone and the rest beside them (`save_train_state`), so that other
  jobs read the parameters without the optimizer (`restore_params`).
  """
  from parti import partitioning

  abstract = partitioning.abstract_with_shardings(state, shardings)
  restored = checkpointer.restore(
    {"params": abstract.params, "train": abstract.replace(params=None)},
    input_iterator=input_iterator,
  )
  if not restored:
    return state, 0, {}
  step, items, meta = restored
  logging.info("Resuming from step %d.", step)
  return items["train"].replace(params=items["params"]), step, meta


def save_train_state(
  checkpointer: Checkpointer, step: int, state, meta=None, input_iterator=None
) -> None:
  """Saves a training job's state as `restore_train_state` reads it."""
  checkpointer.save(
    step,
    {"params": state.params, "train": state.replace(params=None)},
    meta=meta,
    input_iterator=input_iterator,
  )


def restore_params(model_dir: str | pathlib.Path, abstract_params, step: int | None = None):
  """(step, parameters) of another run's checkpoint (default: its latest that restores).

  Only the `params` item is read, into `abstract_params` (ShapeDtypeStructs with
  shardings), so training, fine-tuning and inference load each other's runs.

  Raises:
    FileNotFoundError: `model_dir` has no checkpoints/ folder, or no step restores.
  """
  folder = pathlib.Path(model_dir) / "checkpoints"
  if not folder.is_dir():
    raise FileNotFoundError(f"{model_dir} has no checkpoints/ folder.")
  checkpointer = Checkpointer(model_dir, read_only=True)
  try:
    restored = checkpointer.restore({"params": abstract_params}, step=step)
  finally:
    checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"{model_dir} has no checkpoint that restores.")
  found, items, _ = restored
  return found, items["params"]


class Preemption:
  """Notes SIGTERM (a preemption notice) so the training loop can save and exit cleanly."""

  def __init__(self):
    self.requested = False

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received signal %d: saving a checkpoint, then exiting.", signum)
    self.requested = True

  @contextlib.contextmanager
  def watching(self) -> Iterator[Preemption]:
    previous = signal.signal(signal.SIGTERM, self._handle)
    try:
      yield self
    finally:
      signal.signal(signal.SIGTERM, previous)
