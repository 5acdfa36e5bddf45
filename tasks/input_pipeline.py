"""Per-host, deterministic, resumable input: seqio datasets batched for one host.

Each host reads its own shard (`jax.process_index()` of `jax.process_count()`)
and batches `global_batch_size / process_count` examples. The iterator's state
(position, shuffle buffer) is saved with each checkpoint, so a restarted job
continues from the next unseen batch, as an uninterrupted one would.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf
from clu.data import dataset_iterator

from parti.runtime.errors import ConfigError


def host_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
  """The batch each host feeds; the global batch must split evenly over hosts."""
  process_count = process_count or jax.process_count()
  if global_batch_size % process_count:
    raise ConfigError(
      f"Global batch size {global_batch_size} does not split over {process_count} hosts."
    )
  return global_batch_size // process_count


def get_dataset(
  mixture_or_task_name: str,
  *,
  split: str,
  task_feature_lengths: Mapping[str, int],
  feature_converter: seqio.FeatureConverter,
  global_batch_size: int,
  shuffle: bool = True,
  seed: int = 0,
  num_epochs: int | None = None,
  shard_info: seqio.ShardInfo | None = None,
) -> tf.data.Dataset:
  """This host's batches of model features.

  Args:
    mixture_or_task_name: a registered seqio task or mixture.
    split: the split.
    task_feature_lengths: e.g. {"inputs": 128, "targets": 1024}.
    feature_converter: maps task features to model features.
    global_batch_size: examples per step over all hosts.
    shuffle: shuffle examples (with `seed`: deterministic).
    seed: the shuffle and preprocessing seed.
    num_epochs: None repeats forever (training); 1 for evaluation.
    shard_info: this host's shard (default: from jax's process index and count).

  Returns:
    Batched numpy-ready features, [host batch, ...] each; the last partial batch
    is dropped when repeating and kept (smaller) for a single epoch.
  """
  shard_info = shard_info or seqio.ShardInfo(jax.process_index(), jax.process_count())
  batch = host_batch_size(global_batch_size, shard_info.num_shards)
  dataset = seqio.get_dataset(
    mixture_or_task_name,
    task_feature_lengths=task_feature_lengths,
    feature_converter=feature_converter,
    dataset_split=split,
    shuffle=shuffle,
    num_epochs=num_epochs,
    shard_info=shard_info,
    seed=seed,
    verbose=False,
  )
  return dataset.batch(batch, drop_remainder=num_epochs is None).prefetch(tf.data.AUTOTUNE)


class ResumableIterator:
  """Iterates numpy batches; `save`/`restore` its exact position with a checkpoint.

  Wraps clu's checkpointable TfDatasetIterator (tf.data's own iterator state:
  file positions and shuffle buffers), one state file per host.
  """

  def __init__(self, dataset: tf.data.Dataset):
    self._iterator = dataset_iterator.TfDatasetIterator(dataset, checkpoint=True)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return self._iterator.get_next()

  @staticmethod
  def state_path(folder: str | pathlib.Path, process_index: int | None = None) -> pathlib.Path:
    index = jax.process_index() if process_index is None else process_index
    return pathlib.Path(folder) / f"input_state_{index:05d}"

  def save(self, folder: str | pathlib.Path) -> pathlib.Path:
    """Writes this host's iterator state into `folder` (a checkpoint's folder)."""
    path = self.state_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    self._iterator.save(path)
    return path

  def restore(self, folder: str | pathlib.Path) -> None:
    """Continues from the state `save` wrote into `folder`."""
    path = self.state_path(folder)
    if not tf.io.gfile.glob(f"{path}*"):
      raise FileNotFoundError(f"No input state for this host at {path}.")
    self._iterator.restore(path)


def split_reader(
  mixture_or_task_name: str,
  *,
  task_feature_lengths: Mapping[str, int],
  feature_converter: seqio.FeatureConverter,
  global_batch_size: int,
  seed: int = 0,
  shuffle: bool = True,
):
  """(split, epochs) -> `get_dataset` of that split: what a training job reads, with
  epochs None for training (repeated, shuffled when `shuffle`) and a count for
  evaluation (in order)."""

  def read(split: str, epochs: int | None) -> tf.data.Dataset:
    return get_dataset(
      mixture_or_task_name,
      split=split,
      task_feature_lengths=task_feature_lengths,
      feature_converter=feature_converter,
      global_batch_size=global_batch_size,
      shuffle=shuffle and epochs is None,
      seed=seed,
      num_epochs=epochs,
    )

  return read
