"""Per-host, deterministic, resumable input: seqio datasets batched for one host.

Each host reads its own shard (`jax.process_index()` of `jax.process_count()`)
and batches `global_batch_size / process_count` examples. The iterator's state
(position, shuffle buffer) is saved with each checkpoint, so a restarted job
continues from the next unseen batch, as an uninterrupted one would.

A small training split can be held in memory (`in_memory`): its examples are
preprocessed once, and each epoch reads them in a fresh permutation. On a 2-core
machine the shapes demo's caption tokenization cost 23 ms a batch, as much as its
Parti step, and the two shared the cores.
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


# The in-memory reader (a gather on one thread, a fixed prefetch) leaves autotuning
# nothing to tune, and autotuning's model thread costs a job up to a minute at exit: the
# iterator's destructor waits for the thread's sleep, whose period doubles as the run goes
# on, to end (gdb: ~Iterator -> LogicalThreadWrapper wait while Model::OptimizeLoop
# sleeps). The demo's Parti job spent 33-57 s after its last step on it.
_WITHOUT_AUTOTUNE = tf.data.Options()
_WITHOUT_AUTOTUNE.autotune.enabled = False


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
  in_memory: bool = False,
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
    in_memory: preprocess this host's shard once and hold it in memory
      (`in_memory_examples`); for repeated reading (num_epochs None) only.

  Returns:
    Batched numpy-ready features, [host batch, ...] each; the last partial batch
    is dropped when repeating and kept (smaller) for a single epoch.
  """
  shard_info = shard_info or seqio.ShardInfo(jax.process_index(), jax.process_count())
  batch = host_batch_size(global_batch_size, shard_info.num_shards)
  if in_memory:
    if num_epochs is not None:
      raise ConfigError("in_memory reads a split repeatedly: it needs num_epochs None.")
    examples = in_memory_examples(
      mixture_or_task_name,
      split=split,
      task_feature_lengths=task_feature_lengths,
      feature_converter=feature_converter,
      shard_info=shard_info,
    )
    dataset = permuted_epochs(examples, batch_size=batch, shuffle=shuffle, seed=seed)
    return dataset.prefetch(2).with_options(_WITHOUT_AUTOTUNE)
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


# Held in a tf.data graph as constants, whose protos stop at 2 GiB; leave room.
MAX_IN_MEMORY_BYTES = 1 << 30


def in_memory_examples(
  mixture_or_task_name: str,
  *,
  split: str,
  task_feature_lengths: Mapping[str, int],
  feature_converter: seqio.FeatureConverter,
  shard_info: seqio.ShardInfo,
  max_bytes: int = MAX_IN_MEMORY_BYTES,
) -> dict[str, np.ndarray]:
  """This host's shard of `split`, preprocessed once, in order: feature -> [examples, ...].

  Raises ConfigError when the shard is empty or holds more than `max_bytes`, before
  it is all read.
  """
  dataset = seqio.get_dataset(
    mixture_or_task_name,
    task_feature_lengths=task_feature_lengths,
    feature_converter=feature_converter,
    dataset_split=split,
    shuffle=False,
    num_epochs=1,
    shard_info=shard_info,
    verbose=False,
  )
  columns: dict[str, list[np.ndarray]] = {}
  total = 0
  for example in dataset.batch(1024).as_numpy_iterator():
    for name, value in example.items():
      columns.setdefault(name, []).append(value)
      total += value.nbytes
    if total > max_bytes:
      raise ConfigError(
        f"{mixture_or_task_name!r} split {split!r} holds more than {max_bytes / 2**20:.0f} MiB "
        "of preprocessed examples on this host: too many to hold in memory (in_memory). "
        "Read it from disk instead."
      )
  if not columns:
    raise ConfigError(f"{mixture_or_task_name!r} split {split!r} has no examples on this host.")
  return {name: np.concatenate(parts) for name, parts in columns.items()}


def permuted_epochs(
  examples: dict[str, np.ndarray], *, batch_size: int, shuffle: bool, seed: int
) -> tf.data.Dataset:
  """Batches of `examples`, epoch after epoch without end, each epoch in its own
  permutation (or in order, without `shuffle`).

  Example i of the stream is example index_shuffle(i mod n) of epoch i // n, a pure
  function of the position, so the iterator's checkpoint is one counter rather than a
  shuffle buffer holding the data (tf.data's `shuffle` saved 15 MB a checkpoint for
  the demo's 20k examples). Batches may span two epochs.
  """
  count = len(next(iter(examples.values())))
  table = {name: tf.constant(value) for name, value in examples.items()}

  def batch_at(positions):
    epochs, indices = positions // count, positions % count
    if shuffle:
      # One seed per example ([seed, epoch, 0]): a batch may span two epochs. The raw op,
      # because index_shuffle's wrapper pads a batch of seeds to the wrong shape.
      seeds = tf.stack([tf.fill(tf.shape(epochs), tf.constant(seed, tf.int64)), epochs], axis=1)
      seeds = tf.pad(seeds, [[0, 0], [0, 1]])
      indices = tf.raw_ops.RandomIndexShuffle(
        index=indices, seed=seeds, max_index=tf.constant(count - 1, tf.int64)
      )
    return {name: tf.gather(value, indices) for name, value in table.items()}

  positions = tf.data.Dataset.range(np.iinfo(np.int64).max).batch(batch_size)
  return positions.map(batch_at)  # A gather: one thread keeps ahead of any step.


def split_reader(
  mixture_or_task_name: str,
  *,
  task_feature_lengths: Mapping[str, int],
  feature_converter: seqio.FeatureConverter,
  global_batch_size: int,
  seed: int = 0,
  shuffle: bool = True,
  in_memory: bool = False,
):
  """(split, epochs) -> `get_dataset` of that split: what a training job reads, with
  epochs None for training (repeated, shuffled when `shuffle`; held in memory when
  `in_memory`) and a count for evaluation (in order, read from disk)."""

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
      in_memory=in_memory and epochs is None,
    )

  return read
