"""Trains a SentencePiece text vocabulary on captions: a TFDS dataset, a text file, or shapes scenes.

    python -m parti.tasks.train_vocab --gin_file=gin/data/train_vocab_shapes.gin \
      --gin.MODEL_DIR=runs/vocab

Parti's vocabulary has 16k pieces; the shapes captions support far fewer. The
model is written atomically as OUTPUT_DIR/NAME.model, with the operative config
beside it.
"""

from __future__ import annotations

import itertools
import pathlib
import time
from collections.abc import Iterator

import gin
from absl import logging

from parti.runtime import files, gin_utils
from parti.runtime.errors import ConfigError
from parti.tasks import vocabularies


def _captions_from_tfds(
  name: str, split: str, text_key: str, data_dir: str | None
) -> Iterator[str]:
  import tensorflow_datasets as tfds

  from parti.tasks.shapes import builder  # noqa: F401  (registers parti_shapes)

  dataset = tfds.load(name, split=split, data_dir=data_dir, download=False)
  for example in tfds.as_numpy(dataset.map(lambda ex: ex[text_key])):
    yield example.decode("utf-8", errors="replace")


def _captions_from_task(name: str, split: str) -> Iterator[str]:
  """Cleaned captions of a registered task's records (bad ones skipped and counted)."""
  import seqio

  from parti.tasks import records, registry  # noqa: F401  (registers the tasks)

  task = seqio.get_mixture_or_task(name)
  for record in task.source.get_dataset(split=split, shuffle=False).as_numpy_iterator():
    try:
      yield records.clean_caption(record["caption"], record["key"].decode(errors="replace"))
    except records.BadRecord as error:
      records.SKIPPED.skip(record["key"].decode(errors="replace"), str(error))


def _captions_from_file(path: str) -> Iterator[str]:
  with open(path, encoding="utf-8", errors="replace") as handle:
    for line in handle:
      if line.strip():
        yield line.rstrip("\n")


def _captions_from_shapes(count: int, seed: int) -> Iterator[str]:
  from parti.tasks.shapes import scenes

  for index in range(count):
    yield scenes.make_scene(seed, "train", index).caption


def train_vocab(
  *,
  output_dir: str,
  name: str = "spm",
  task: str | None = None,
  tfds_name: str | None = None,
  shapes_examples: int | None = None,
  shapes_seed: int = 0,
  split: str = "train",
  text_key: str = "caption",
  data_dir: str | None = None,
  text_file: str | None = None,
  vocab_size: int = 16_000,
  max_sentences: int = 1_000_000,
  model_type: str = "unigram",
) -> pathlib.Path:
  """Trains the vocabulary and writes `output_dir/name.model`.

  Give exactly one caption source: `task`, `tfds_name`, `text_file` or `shapes_examples`.

  Args:
    output_dir: the folder to write to.
    name: the model's file name, without `.model`.
    task: a registered image-text task (see parti.tasks.registry) whose captions to read.
    tfds_name: a TFDS dataset (with config) whose `text_key` feature holds captions.
    shapes_examples: read the captions of this many shapes training scenes,
      generated directly (no prepared dataset needed).
    shapes_seed: the shapes dataset seed.
    split: the split of `task` or `tfds_name`.
    text_key: the caption feature.
    data_dir: the TFDS data dir (default: TFDS's).
    text_file: instead of TFDS, a file with one caption per line.
    vocab_size: the largest number of pieces.
    max_sentences: captions read at most.
    model_type: "unigram" or "bpe".

  Returns:
    The model's path.

  Raises:
    ConfigError: no caption source, several, or one without captions.
  """
  sources = [task, tfds_name, text_file, shapes_examples]
  if sum(source is not None for source in sources) != 1:
    raise ConfigError(
      "Give exactly one caption source: task, tfds_name, text_file or shapes_examples."
    )
  if task is not None:
    texts = _captions_from_task(task, split)
  elif text_file is not None:
    texts = _captions_from_file(text_file)
  elif tfds_name is not None:
    texts = _captions_from_tfds(tfds_name, split, text_key, data_dir)
  else:
    texts = _captions_from_shapes(shapes_examples, shapes_seed)
  start = time.perf_counter()
  texts = list(itertools.islice(texts, max_sentences))
  if not texts:
    raise ConfigError(
      f"No captions found in {task or text_file or tfds_name or 'the shapes scenes'}."
    )
  logging.info("Read %d captions in %.1fs.", len(texts), time.perf_counter() - start)
  model = vocabularies.train_sentencepiece(texts, vocab_size, model_type=model_type)
  path = files.atomic_write_bytes(pathlib.Path(output_dir) / f"{name}.model", model)
  vocabulary = vocabularies.text_vocabulary(path)
  print(f"Wrote {path}: {vocabulary.vocab_size} pieces from {len(texts)} captions.")
  gin_utils.write_operative_config(path.parent)
  return path


configured_train_vocab = gin.external_configurable(train_vocab)

if __name__ == "__main__":
  gin_utils.run(configured_train_vocab)
