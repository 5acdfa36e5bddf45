"""The pre-encoded format: (caption, image token ids) records, written by the tokenizer's encode job.

A pre-encoded dataset is a folder:

  provenance.json                 which tokenizer checkpoint made it, codebook size, grid
  {split}-{host:05d}-{shard:05d}.tfrecord   tf.train.Example records:
      key           bytes     the source record's name
      caption       bytes     the cleaned caption (UTF-8)
      image_tokens  int64[h*w] codebook ids, row-major

Parti training then reads ids directly instead of running the tokenizer each step.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import tensorflow as tf

from parti.runtime import files

PROVENANCE = "provenance.json"


@dataclasses.dataclass(frozen=True)
class Provenance:
  """What made a pre-encoded dataset.

  Attributes:
    tokenizer_checkpoint: the tokenizer checkpoint folder (and step) that encoded it.
    codebook_size: number of codes; ids lie in [0, codebook_size).
    grid: (height, width) of each image's token grid.
    image_size: side of the images that were encoded.
    source: the dataset that was encoded.
    codebook_groups: tokens per patch (the tokenizer's `codebook_groups`; 1 in folders
      written before it existed).
    group_layout: where a patch's tokens sit on the grid (the tokenizer's
      `group_layout`; "interleaved", side by side, in folders written before it existed).
  """

  tokenizer_checkpoint: str
  codebook_size: int
  grid: tuple[int, int]
  image_size: int
  source: str
  codebook_groups: int = 1
  group_layout: str = "interleaved"

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]


def write_provenance(folder: str | pathlib.Path, provenance: Provenance) -> None:
  files.atomic_write_json(pathlib.Path(folder) / PROVENANCE, dataclasses.asdict(provenance))


def read_provenance(folder: str | pathlib.Path) -> Provenance:
  """The provenance of a pre-encoded folder, with a clear error when it is not one."""
  path = pathlib.Path(folder) / PROVENANCE
  if not path.exists():
    raise FileNotFoundError(
      f"{folder} is not a pre-encoded dataset: {path} is missing. Make one with "
      "`python -m parti.tokenizer.encode`."
    )
  try:
    raw = json.loads(path.read_text())
    raw["grid"] = tuple(raw["grid"])
    return Provenance(**raw)
  except (ValueError, TypeError, KeyError) as error:
    raise ValueError(f"{path} is malformed: {error}") from error


def shard_name(split: str, host: int, shard: int) -> str:
  return f"{split}-{host:05d}-{shard:05d}.tfrecord"


def serialize(key: str, caption: str, tokens: Sequence[int] | np.ndarray) -> bytes:
  """One record as a serialized tf.train.Example."""
  feature = {
    "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()])),
    "caption": tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption.encode()])),
    "image_tokens": tf.train.Feature(
      int64_list=tf.train.Int64List(value=np.asarray(tokens, np.int64).reshape(-1))
    ),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_shard(path: str | pathlib.Path, serialized: Iterable[bytes]) -> int:
  """Writes records to `path` atomically (a temp file renamed into place). Returns the count."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  count = 0
  try:
    with tf.io.TFRecordWriter(str(tmp)) as writer:
      for record in serialized:
        writer.write(record)
        count += 1
    tmp.replace(path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return count


def feature_description(provenance: Provenance) -> dict:
  return {
    "key": tf.io.FixedLenFeature([], tf.string),
    "caption": tf.io.FixedLenFeature([], tf.string),
    "image_tokens": tf.io.FixedLenFeature([provenance.num_tokens], tf.int64),
  }
