"""Data sources for image-text data in the forms LAION and CC12M are usually kept.

Every source yields the same standardized records, `{"key", "image", "caption"}`
(all strings; `image` holds the encoded bytes, `key` names the record in logs),
which `parti.tasks.preprocessors` then decodes, cleans and tokenizes.

  folder_source       a folder of images with `captions.tsv`, or a `.txt` beside each image;
                      subfolders named after splits (train/, validation/) become splits
  tfrecord_source     TFRecords of tf.train.Example with image bytes and a caption
  webdataset_source   WebDataset-style tar shards: KEY.jpg (or .png, .webp) with KEY.txt
                      (or KEY.json holding {"caption": ...})
  TfdsSource          a prepared TFDS dataset, images left encoded
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from parti.tasks import records

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTIONS_FILE = "captions.tsv"
RECORD_SIGNATURE = {
  "key": tf.TensorSpec((), tf.string),
  "image": tf.TensorSpec((), tf.string),
  "caption": tf.TensorSpec((), tf.string),
}

Records = Iterator[dict[str, bytes]]


def _from_generator(make_records: Callable[[], Records]) -> tf.data.Dataset:
  return tf.data.Dataset.from_generator(make_records, output_signature=RECORD_SIGNATURE)


# --- A folder of captioned images ------------------------------------------------------


def _read_captions_tsv(path: pathlib.Path) -> dict[str, bytes]:
  """file name -> caption from a two-column TSV (an optional `file  caption` header)."""
  captions = {}
  with open(path, "rb") as handle:
    for number, raw in enumerate(handle, start=1):
      line = raw.rstrip(b"\r\n")
      if not line.strip():
        continue
      name, sep, caption = line.partition(b"\t")
      if not sep:
        records.SKIPPED.skip(f"{path}:{number}", "malformed captions.tsv line: no tab")
        continue
      if number == 1 and name.strip().lower() in (b"file", b"filename", b"image"):
        continue
      captions[name.decode("utf-8", errors="replace").strip()] = caption
  return captions


def _folder_records(folder: pathlib.Path, require_captions: bool = True) -> Records:
  tsv = folder / CAPTIONS_FILE
  captions = _read_captions_tsv(tsv) if tsv.exists() else {}
  images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
  for image in images:
    caption = captions.get(image.name)
    if caption is None and image.with_suffix(".txt").exists():
      caption = image.with_suffix(".txt").read_bytes()
    if caption is None:
      if require_captions:
        records.SKIPPED.skip(str(image), "no caption")
        continue
      caption = b""
    yield {"key": str(image).encode(), "image": image.read_bytes(), "caption": caption}


def folder_source(path: str, require_captions: bool = True) -> seqio.DataSource:
  """Images in `path` (or in its split subfolders) with their captions.

  Args:
    path: the folder. If it has subfolders named train, validation or test, each
      is a split; otherwise the folder itself is the train split.
    require_captions: skip (and count) images without a caption; False for
      image-only tasks.
  """
  root = pathlib.Path(path)
  if not root.is_dir():
    raise FileNotFoundError(f"Image folder {root} does not exist.")
  split_dirs = {s: root / s for s in ("train", "validation", "test") if (root / s).is_dir()}
  split_dirs = split_dirs or {"train": root}

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # Files are read in name order; the task shuffles examples.
    return _from_generator(lambda: _folder_records(split_dirs[split], require_captions))

  return seqio.FunctionDataSource(dataset_fn, splits=tuple(split_dirs))


# --- TFRecords of (image bytes, caption) ----------------------------------------------------


def _expand(patterns: Mapping[str, str | Sequence[str]], split: str) -> list[str]:
  pattern = patterns[split]
  files = sorted(
    {f for p in ([pattern] if isinstance(pattern, str) else pattern) for f in glob.glob(p)}
  )
  if not files:
    raise FileNotFoundError(f"No files match {pattern!r} for split {split!r}.")
  return files


def tfrecord_source(
  split_to_pattern: Mapping[str, str | Sequence[str]],
  image_key: str = "image",
  caption_key: str = "caption",
) -> seqio.DataSource:
  """TFRecords of tf.train.Example with `image_key` (encoded bytes) and `caption_key`."""
  description = {
    image_key: tf.io.FixedLenFeature([], tf.string),
    caption_key: tf.io.FixedLenFeature([], tf.string, default_value=""),
  }

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    files = _expand(split_to_pattern, split)
    names = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_files:
      names = names.shuffle(len(files), seed=seed)

    def read(name):
      return (
        tf.data.TFRecordDataset(name)
        .enumerate()
        .map(lambda i, raw: (name + tf.constant("#") + tf.strings.as_string(i), raw))
      )

    def parse(key, raw):
      example = tf.io.parse_single_example(raw, description)
      return {"key": key, "image": example[image_key], "caption": example[caption_key]}

    return names.interleave(
      read, cycle_length=4, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    ).map(parse)

  return seqio.FunctionDataSource(dataset_fn, splits=tuple(split_to_pattern))


# --- WebDataset tar shards ---------------------------------------------------------------------


def _caption_from_json(data: bytes, name: str) -> bytes:
  try:
    return str(json.loads(data).get("caption", "")).encode()
  except (ValueError, AttributeError):
    records.SKIPPED.skip(name, "malformed json sidecar")
    return b""


def _tar_records(shard: str, require_captions: bool = True) -> Records:
  """Groups a tar's members by key (the name before the first dot) into records."""
  current_key, group = None, {}

  def emit():
    name = f"{shard}/{current_key}"
    image = next((group[s] for s in IMAGE_SUFFIXES if s in group), None)
    if image is None:
      records.SKIPPED.skip(name, "no image in the group")
      return None
    caption = group.get(".txt")
    if caption is None and ".json" in group:
      caption = _caption_from_json(group[".json"], name)
    if caption is None and require_captions:
      records.SKIPPED.skip(name, "no caption")
      return None
    return {"key": name.encode(), "image": image, "caption": caption or b""}

  try:
    with tarfile.open(shard, "r:*") as archive:
      for member in archive:
        if not member.isfile():
          continue
        base = os.path.basename(member.name)
        key, dot, suffix = base.partition(".")
        key = os.path.join(os.path.dirname(member.name), key)
        if key != current_key and group:
          record = emit()
          if record:
            yield record
          group = {}
        current_key = key
        group["." + suffix.lower() if dot else ""] = archive.extractfile(member).read()
      if group:
        record = emit()
        if record:
          yield record
  except (tarfile.TarError, OSError, EOFError) as error:
    records.SKIPPED.skip(shard, f"unreadable tar shard: {error}")


def webdataset_source(
  split_to_pattern: Mapping[str, str | Sequence[str]], require_captions: bool = True
) -> seqio.DataSource:
  """WebDataset-style tar shards: each sample is KEY.<image suffix> with KEY.txt or KEY.json."""

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    files = _expand(split_to_pattern, split)
    names = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_files:
      names = names.shuffle(len(files), seed=seed)
    return names.interleave(
      lambda name: tf.data.Dataset.from_generator(
        lambda n: _tar_records(n.decode(), require_captions),
        output_signature=RECORD_SIGNATURE,
        args=(name,),
      ),
      cycle_length=4,
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True,
    )

  return seqio.FunctionDataSource(dataset_fn, splits=tuple(split_to_pattern))


# --- TFDS ---------------------------------------------------------------------------------------


class TfdsSource(seqio.TfdsDataSource):
  """A prepared TFDS dataset, images left encoded, mapped to standardized records.

  Built on seqio's TfdsDataSource, so it shuffles and shards by file and honours
  `seqio.set_tfds_data_dir_override` (what jobs' `tfds_data_dir` setting calls).
  A dataset that is not prepared fails with an error naming the folder it looked
  in and how to prepare it, rather than trying to download.
  """

  def __init__(
    self,
    name: str,
    standardize: Callable[[dict], dict],
    data_dir: str | None = None,
    splits: Sequence[str] | None = None,
    prepare_hint: str = "",
  ):
    super().__init__(
      tfds_name=name,
      tfds_data_dir=data_dir,
      splits=splits,
      decoders={"image": tfds.decode.SkipDecoding()},
    )
    self._standardize = standardize
    self._prepare_hint = prepare_hint

  def _check_prepared(self) -> None:
    data_dir = self.tfds_dataset.data_dir or tfds.core.constants.DATA_DIR
    try:
      prepared = self.tfds_dataset.builder.is_prepared()
    except ValueError:  # TFDS knows an unprepared custom config by its files alone.
      prepared = False
    if not prepared:
      raise FileNotFoundError(
        f"TFDS dataset {self.tfds_dataset.name!r} is not prepared: expected it in "
        f"{os.path.join(data_dir, self.tfds_dataset.name.replace(':', '/'))}. {self._prepare_hint}"
      )

  def list_shards(self, split: str) -> Sequence[str]:
    self._check_prepared()
    return super().list_shards(split)

  def get_dataset(self, split=None, shuffle=True, seed=None, shard_info=None, **kwargs):
    self._check_prepared()
    dataset = super().get_dataset(split, shuffle, seed, shard_info, **kwargs)
    return dataset.map(self._standardize, num_parallel_calls=tf.data.AUTOTUNE)
