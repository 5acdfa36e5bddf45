"""Pre-encodes an image-text task into (caption, image token ids) shards for Parti training.

    python -m parti.tokenizer.encode --gin_file=gin/tokenizer/encode_shapes.gin \
      --gin.CHECKPOINT_DIR=runs/tokenizer --gin.OUTPUT_DIR=runs/shapes_tokens

Parti training then reads ids (`registry.register_pre_encoded_task`) instead of
running the tokenizer at every step, as dalle-mini and LlamaGen do.

* Each host encodes its own shard of the source (`jax.process_index()` of
  `jax.process_count()`) and writes its own files, `{split}-{host}-{shard}.tfrecord`.
* Shard k of a host holds its source records [k * shard_size, (k + 1) * shard_size);
  records that cannot be used (corrupt image, empty caption) are left out,
  counted and reported at the end.
* A shard is written to a temporary file and renamed when complete, so a kill
  never leaves half a shard, and a rerun skips the shards that exist.
* provenance.json records the tokenizer checkpoint (and step) that made the
  folder; a rerun with another tokenizer is refused.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import gin
import jax
import numpy as np
from absl import logging

from parti import partitioning
from parti.runtime import gin_utils, metric_logging
from parti.runtime.errors import ConfigError
from parti.tokenizer import api


def encode(
  *,
  checkpoint_dir: str,
  task: str,
  output_dir: str,
  splits: Sequence[str] = ("train", "validation"),
  batch_size: int = 64,
  shard_size: int = 10_000,
  mesh: partitioning.MeshConfig = partitioning.MeshConfig(),
  tfds_data_dir: str | None = None,
) -> dict[str, int]:
  """Encodes `splits` of `task` with the tokenizer in `checkpoint_dir`.

  Args:
    checkpoint_dir: a tokenizer training run's MODEL_DIR.
    task: a registered image-text task (its source records are read, not its tokens).
    output_dir: the pre-encoded folder to write (or to complete).
    splits: the splits to encode.
    batch_size: images per encode call.
    shard_size: source records per output shard.
    mesh: the mesh the tokenizer runs on (the batch is split over its data axes).
    tfds_data_dir: where TFDS datasets are prepared.

  Returns:
    split -> records written by this host in this run.
  """
  import seqio

  from parti.tasks import preprocessors, records, registry, token_records  # noqa: F401

  if tfds_data_dir:
    seqio.set_tfds_data_dir_override(tfds_data_dir)
  if shard_size < 1 or batch_size < 1:
    raise ConfigError("shard_size and batch_size must be positive.")
  tokenizer = api.ImageTokenizer.from_checkpoint(
    checkpoint_dir, mesh=partitioning.create_mesh(mesh)
  )
  output = pathlib.Path(output_dir)
  provenance = token_records.Provenance(
    tokenizer_checkpoint=f"{pathlib.Path(checkpoint_dir).absolute()}@{tokenizer.step}",
    codebook_size=tokenizer.codebook_size,
    grid=tokenizer.grid,
    image_size=tokenizer.config.image_size,
    source=task,
    codebook_groups=tokenizer.config.codebook_groups,
    group_layout=tokenizer.config.group_layout,
  )
  _check_or_write_provenance(output, provenance)
  source = seqio.get_mixture_or_task(task).source
  host, hosts = jax.process_index(), jax.process_count()
  written = {}
  for split in splits:
    if split not in source.splits:
      raise ConfigError(f"Task {task!r} has no split {split!r}; it has {list(source.splits)}.")
    raw = source.get_dataset(split=split, shuffle=False, shard_info=seqio.ShardInfo(host, hosts))
    done = 0
    while (output / token_records.shard_name(split, host, done)).exists():
      done += 1
    if done:
      logging.info("%s: %d finished shards found; resuming after them.", split, done)
    total = source.num_input_examples(split)
    progress = metric_logging.Progress(
      -(-total // hosts) if total else 0, start_step=done * shard_size, unit="images", every=1
    )
    written[split] = 0
    shard = done
    for start in range(done * shard_size, 2**62, shard_size):
      chunk = raw.skip(start).take(shard_size)
      examples = preprocessors.decode_image_text(
        chunk, image_size=tokenizer.config.image_size, need_caption=True
      ).as_numpy_iterator()
      rows, seen = _encode_rows(tokenizer, examples, batch_size)
      if seen == 0 and not _has_records(chunk):
        break  # The source is exhausted.
      token_records.write_shard(output / token_records.shard_name(split, host, shard), rows)
      written[split] += len(rows)
      if progress.total:
        progress.update(min(start + shard_size, progress.total), len(rows))
      shard += 1
    print(f"{split}: wrote {written[split]} records in this run ({shard} shards on host {host}).")
  print(records.SKIPPED.report())
  return written


def _has_records(dataset) -> bool:
  return any(True for _ in dataset.take(1))


def _encode_rows(
  tokenizer: api.ImageTokenizer, examples, batch_size: int
) -> tuple[list[bytes], int]:
  """Serialized records of every good example in `examples`, encoded in batches."""
  from parti.tasks import token_records

  rows, batch, seen = [], [], 0

  def flush():
    if not batch:
      return
    ids = tokenizer.encode(np.stack([b["image"] for b in batch]))
    for example, tokens in zip(batch, ids, strict=True):
      rows.append(
        token_records.serialize(
          example["key"].decode(errors="replace"), example["caption"].decode(), tokens
        )
      )
    batch.clear()

  for example in examples:
    seen += 1
    batch.append(example)
    if len(batch) == batch_size:
      flush()
  flush()
  return rows, seen


def _check_or_write_provenance(output: pathlib.Path, provenance) -> None:
  from parti.tasks import token_records

  if (output / token_records.PROVENANCE).exists():
    existing = token_records.read_provenance(output)
    if existing != provenance:
      raise ConfigError(
        f"{output} was made by another tokenizer or source ({dataclasses.asdict(existing)}); "
        f"this run would use {dataclasses.asdict(provenance)}. Write to a new folder."
      )
    return
  output.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    token_records.write_provenance(output, provenance)


configured_encode = gin.external_configurable(encode)

if __name__ == "__main__":
  gin_utils.run(configured_encode)
