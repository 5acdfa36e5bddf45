"""Each seqio task yields model features from small data the tests make."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from parti.runtime.errors import ConfigError
from parti.tasks import (
  feature_converters,
  input_pipeline,
  records,
  registry,
  sources,
  token_records,
  vocabularies,
)

ONE_HOST = seqio.ShardInfo(0, 1)


def _png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def _image(value: int, size: int = 40) -> np.ndarray:
  return np.full((size, size, 3), value, np.uint8)


def _examples(task: str, split: str, lengths: dict, converter=None, **kwargs) -> list[dict]:
  dataset = input_pipeline.get_dataset(
    task,
    split=split,
    task_feature_lengths=lengths,
    feature_converter=converter or feature_converters.ImageTextFeatureConverter(),
    global_batch_size=1,
    shuffle=False,
    num_epochs=1,
    shard_info=kwargs.pop("shard_info", ONE_HOST),
    **kwargs,
  )
  return [{k: v[0] for k, v in batch.items()} for batch in dataset.as_numpy_iterator()]


@pytest.fixture
def shapes_task(shapes_tfds):
  shapes, data_dir = shapes_tfds
  seqio.set_tfds_data_dir_override(data_dir)
  registry._register_shapes(shapes.builder_config)
  yield "parti_shapes_test_32"
  seqio.set_tfds_data_dir_override(None)


def test_shapes_task_yields_caption_tokens_and_the_image(shapes_task, shapes_tfds):
  examples = _examples(shapes_task, "test", {"inputs": 64, "image": 32})
  truth = list(tfds.as_numpy(shapes_tfds[0].as_dataset(split="test", shuffle_files=False)))
  assert len(examples) == len(truth) == 8
  vocabulary = vocabularies.text_vocabulary()
  by_caption = {t["caption"].decode(): t["image"] for t in truth}
  for example in examples:
    tokens = example["encoder_input_tokens"]
    caption = vocabulary.decode(tokens.tolist())
    assert tokens[np.flatnonzero(tokens)[-1]] == vocabularies.EOS_ID
    assert example["images"].dtype == np.float32
    np.testing.assert_array_equal(np.round(example["images"] * 255), by_caption[caption])


def test_long_captions_are_truncated_to_the_feature_length(shapes_task):
  for example in _examples(shapes_task, "test", {"inputs": 4, "image": 32}):
    tokens = example["encoder_input_tokens"]
    assert tokens.shape == (4,)
    assert tokens[-1] == vocabularies.EOS_ID


def test_image_only_task(shapes_task):
  examples = _examples(
    shapes_task + "_images", "validation", {"image": 32}, seqio.PassThroughFeatureConverter()
  )
  assert len(examples) == 8
  assert set(examples[0]) == {"image"}
  assert examples[0]["image"].shape == (32, 32, 3)
  assert 0.0 <= examples[0]["image"].min() <= examples[0]["image"].max() <= 1.0


def test_unprepared_tfds_dataset_names_the_folder(tmp_path):
  seqio.set_tfds_data_dir_override(str(tmp_path))
  try:
    with pytest.raises(FileNotFoundError, match=f"expected it in {tmp_path}/coco_captions/2014"):
      _examples("coco_captions_256", "train", {"inputs": 8, "image": 256})
  finally:
    seqio.set_tfds_data_dir_override(None)


def test_coco_standardization_picks_a_stable_caption():
  example = {
    "image": tf.constant(b"jpeg bytes"),
    "image/id": tf.constant(42, tf.int64),
    "captions": {"text": tf.constant([b"one", b"two", b"three"])},
  }
  first = registry._standardize_coco(example)
  assert first["key"].numpy() == b"coco#42"
  assert first["caption"].numpy() in (b"one", b"two", b"three")
  assert registry._standardize_coco(example)["caption"].numpy() == first["caption"].numpy()


# --- Bring your own data ----------------------------------------------------------------


@pytest.fixture
def messy_folder(tmp_path):
  """Good images and one of each kind of bad record."""
  folder = tmp_path / "images"
  folder.mkdir()
  (folder / "good.png").write_bytes(_png(_image(10)))
  (folder / "gray.png").write_bytes(_png(np.full((40, 40), 20, np.uint8)))
  rgba = np.zeros((40, 40, 4), np.uint8)
  (folder / "rgba.png").write_bytes(_png(rgba))  # Fully transparent: white.
  (folder / "sidecar.png").write_bytes(_png(_image(30)))
  (folder / "sidecar.txt").write_text("a caption from a txt file")
  (folder / "corrupt.png").write_bytes(b"\x89PNG garbage")
  (folder / "tiny.png").write_bytes(_png(_image(50, size=4)))
  (folder / "empty_caption.png").write_bytes(_png(_image(60)))
  (folder / "no_caption.png").write_bytes(_png(_image(70)))
  (folder / "latin1.png").write_bytes(_png(_image(80)))
  (folder / "captions.tsv").write_bytes(
    b"file\tcaption\n"
    b"good.png\ta good image\n"
    b"gray.png\ta gray image\n"
    b"rgba.png\ta transparent image\n"
    b"corrupt.png\tbroken bytes\n"
    b"tiny.png\ttoo small\n"
    b"empty_caption.png\t   \n"
    b"latin1.png\tcaf\xe9 au lait\n"
    b"this line has no tab\n"
  )
  return folder


def test_folder_task_keeps_good_and_fixed_records_and_counts_the_rest(messy_folder):
  before = records.SKIPPED.counts()
  registry.register_image_text_task(
    "test_folder", sources.folder_source(str(messy_folder)), image_size=32
  )
  examples = _examples("test_folder", "train", {"inputs": 32, "image": 32})
  vocabulary = vocabularies.text_vocabulary()
  captions = sorted(vocabulary.decode(e["encoder_input_tokens"].tolist()) for e in examples)
  assert len(captions) == 5  # good, gray, rgba, sidecar, latin1
  assert "a good image" in captions
  by_value = {round(float(e["images"][0, 0, 0]) * 255) for e in examples}
  assert {10, 20, 255, 30, 80} == by_value  # Gray became RGB, transparent became white.
  after = records.SKIPPED.counts()
  skipped = {k: after.get(k, 0) - before.get(k, 0) for k in after}
  assert skipped["unreadable image"] == 1
  assert skipped["empty caption"] == 1
  assert skipped["no caption"] == 1
  assert skipped["malformed captions.tsv line"] == 1
  assert any(k.startswith("image is 4x4") for k in skipped)


def test_folder_splits_from_subfolders(tmp_path):
  for split, value in (("train", 1), ("validation", 2)):
    (tmp_path / split).mkdir()
    (tmp_path / split / "a.png").write_bytes(_png(_image(value)))
    (tmp_path / split / "a.txt").write_text(f"{split} image")
  source = sources.folder_source(str(tmp_path))
  assert set(source.splits) == {"train", "validation"}
  registry.register_image_text_task("test_split_folder", source, image_size=32)
  (example,) = _examples("test_split_folder", "validation", {"inputs": 16, "image": 32})
  assert round(float(example["images"][0, 0, 0]) * 255) == 2


def test_missing_folder_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.folder_source(str(tmp_path / "nowhere"))


def _tf_example(image: bytes, caption: bytes) -> bytes:
  feature = {
    "jpg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
    "txt": tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def test_tfrecord_task(tmp_path):
  for shard in range(2):
    with tf.io.TFRecordWriter(str(tmp_path / f"train-{shard}.tfrecord")) as writer:
      writer.write(_tf_example(_png(_image(10 + shard)), b"a picture"))
      writer.write(_tf_example(b"corrupt", b"a broken picture"))
  source = sources.tfrecord_source(
    {"train": str(tmp_path / "train-*.tfrecord")}, image_key="jpg", caption_key="txt"
  )
  registry.register_image_text_task("test_tfrecords", source, image_size=32)
  examples = _examples("test_tfrecords", "train", {"inputs": 16, "image": 32})
  assert sorted(round(float(e["images"][0, 0, 0]) * 255) for e in examples) == [10, 11]


def test_tfrecord_pattern_without_files(tmp_path):
  source = sources.tfrecord_source({"train": str(tmp_path / "none-*.tfrecord")})
  registry.register_image_text_task("test_no_tfrecords", source, image_size=32)
  with pytest.raises(FileNotFoundError, match="none-"):
    _examples("test_no_tfrecords", "train", {"inputs": 16, "image": 32})


def _tar(path, members: dict[str, bytes]) -> None:
  with tarfile.open(path, "w") as archive:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))


def test_webdataset_task(tmp_path):
  _tar(
    tmp_path / "shard-000.tar",
    {
      "000.jpg": _png(_image(10)),
      "000.txt": b"first",
      "001.png": _png(_image(11)),
      "001.json": json.dumps({"caption": "second"}).encode(),
      "002.png": _png(_image(12)),  # No caption: skipped.
      "003.txt": b"caption without image",  # No image: skipped.
    },
  )
  (tmp_path / "shard-001.tar").write_bytes(b"this is not a tar file")
  source = sources.webdataset_source({"train": str(tmp_path / "shard-*.tar")})
  registry.register_image_text_task("test_webdataset", source, image_size=32)
  before = records.SKIPPED.counts()
  examples = _examples("test_webdataset", "train", {"inputs": 16, "image": 32})
  vocabulary = vocabularies.text_vocabulary()
  assert sorted(vocabulary.decode(e["encoder_input_tokens"].tolist()) for e in examples) == [
    "first",
    "second",
  ]
  after = records.SKIPPED.counts()
  assert after["unreadable tar shard"] - before.get("unreadable tar shard", 0) == 1
  assert after["no caption"] - before.get("no caption", 0) >= 1


# --- Pre-encoded tokens -----------------------------------------------------------------------


@pytest.fixture
def pre_encoded(tmp_path):
  provenance = token_records.Provenance("tokenizer/ckpt-7", 16, (2, 3), 32, "parti_shapes/test_32")
  token_records.write_provenance(tmp_path, provenance)
  for host in range(2):
    rows = [
      token_records.serialize(f"k{host}-{i}", "a red circle", [0, host, i, 3, 4, 15])
      for i in range(6)
    ]
    token_records.write_shard(tmp_path / token_records.shard_name("train", host, 0), rows)
  registry.register_pre_encoded_task("test_pre_encoded", str(tmp_path))
  return provenance


def test_pre_encoded_task_gives_decoder_features(pre_encoded):
  converter = feature_converters.ImageTokensFeatureConverter(bos_id=16)
  examples = _examples("test_pre_encoded", "train", {"inputs": 8, "targets": 6}, converter)
  assert len(examples) == 12
  for example in examples:
    targets = example["decoder_target_tokens"]
    assert targets[0] == 0  # Code 0 is a real code...
    np.testing.assert_array_equal(example["decoder_loss_weights"], np.ones(6))  # ...with weight.
    np.testing.assert_array_equal(example["decoder_input_tokens"], [16, *targets[:-1]])
  vocabulary = seqio.get_mixture_or_task("test_pre_encoded").output_features["targets"].vocabulary
  assert vocabulary == vocabularies.ImageVocabulary(16)


def test_pre_encoded_wrong_length_is_refused(pre_encoded):
  converter = feature_converters.ImageTokensFeatureConverter(bos_id=16)
  with pytest.raises(tf.errors.InvalidArgumentError, match="image token sequence length"):
    _examples("test_pre_encoded", "train", {"inputs": 8, "targets": 8}, converter)


def test_folder_without_provenance_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"provenance\.json is missing"):
    registry.register_pre_encoded_task("test_no_provenance", str(tmp_path))


# --- Host sharding, determinism, resume ---------------------------------------------------------


def _keys(batch) -> list[tuple[int, int]]:
  return [tuple(int(v) for v in row[1:3]) for row in batch["decoder_target_tokens"]]


def _dataset(shard_info=ONE_HOST, seed=0, batch=2, shuffle=True, num_epochs=1, in_memory=False):
  return input_pipeline.get_dataset(
    "test_pre_encoded",
    split="train",
    task_feature_lengths={"inputs": 8, "targets": 6},
    feature_converter=feature_converters.ImageTokensFeatureConverter(bos_id=16),
    global_batch_size=batch * shard_info.num_shards,
    shuffle=shuffle,
    seed=seed,
    num_epochs=num_epochs,
    shard_info=shard_info,
    in_memory=in_memory,
  )


def test_each_host_reads_its_own_shard(pre_encoded):
  seen = []
  for host in range(2):
    host_keys = [
      k for b in _dataset(seqio.ShardInfo(host, 2)).as_numpy_iterator() for k in _keys(b)
    ]
    seen.append(set(host_keys))
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == 12


def test_same_seed_same_order(pre_encoded):
  order = [_keys(b) for b in _dataset(seed=3).as_numpy_iterator()]
  assert order == [_keys(b) for b in _dataset(seed=3).as_numpy_iterator()]
  assert order != [_keys(b) for b in _dataset(seed=4).as_numpy_iterator()]


def test_restored_iterator_continues_from_the_next_unseen_batch(pre_encoded, tmp_path):
  iterator = input_pipeline.ResumableIterator(_dataset(seed=5))
  first = [_keys(next(iterator)) for _ in range(2)]
  iterator.save(tmp_path / "ckpt")
  expected = [_keys(next(iterator)) for _ in range(3)]
  resumed = input_pipeline.ResumableIterator(_dataset(seed=5))
  resumed.restore(tmp_path / "ckpt")
  assert [_keys(next(resumed)) for _ in range(3)] == expected
  assert first[0] not in expected


def test_restore_without_state_is_a_clear_error(pre_encoded, tmp_path):
  with pytest.raises(FileNotFoundError, match="No input state"):
    input_pipeline.ResumableIterator(_dataset()).restore(tmp_path / "empty")


# --- Held in memory ------------------------------------------------------------------------------


def _in_memory(shard_info=ONE_HOST, seed=0, batch=4, shuffle=True):
  return _dataset(shard_info, seed, batch, shuffle, num_epochs=None, in_memory=True)


def _stream(dataset, batches: int) -> list[tuple[int, int]]:
  return [k for b in dataset.take(batches).as_numpy_iterator() for k in _keys(b)]


def test_in_memory_epochs_are_each_a_fresh_permutation_of_every_example(pre_encoded):
  stream = _stream(_in_memory(), 9)  # 36 examples: three epochs of 12.
  epochs = [stream[i : i + 12] for i in range(0, 36, 12)]
  on_disk = sorted(_stream(_dataset(), 6))
  for epoch in epochs:
    assert sorted(epoch) == on_disk  # Each example once an epoch...
  assert len({tuple(e) for e in epochs}) == 3  # ...in a new order each time,
  assert epochs[0] != sorted(epochs[0])  # shuffled.
  assert stream == _stream(_in_memory(), 9)  # Deterministic from the seed.
  assert stream != _stream(_in_memory(seed=1), 9)
  assert _stream(_in_memory(shuffle=False), 6) == _stream(_in_memory(shuffle=False), 3) * 2


def test_in_memory_examples_match_the_ones_read_from_disk(pre_encoded):
  def by_key(batches):
    return {
      tuple(int(v) for v in row[1:3]): {k: b[k][i].tolist() for k in b}
      for b in batches
      for i, row in enumerate(b["decoder_target_tokens"])
    }

  in_memory = by_key(_in_memory(batch=3).take(4).as_numpy_iterator())
  assert in_memory == by_key(_dataset(batch=3).as_numpy_iterator())


def test_in_memory_hosts_read_their_own_shards(pre_encoded):
  seen = [set(_stream(_in_memory(seqio.ShardInfo(host, 2), batch=3), 2)) for host in range(2)]
  assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 12


def test_in_memory_iterator_resumes_with_a_small_state(pre_encoded, tmp_path):
  iterator = input_pipeline.ResumableIterator(_in_memory(seed=2))
  for _ in range(5):
    next(iterator)
  path = iterator.save(tmp_path / "ckpt")
  expected = [_keys(next(iterator)) for _ in range(4)]
  resumed = input_pipeline.ResumableIterator(_in_memory(seed=2))
  resumed.restore(tmp_path / "ckpt")
  assert [_keys(next(resumed)) for _ in range(4)] == expected
  state_bytes = sum(f.stat().st_size for f in path.parent.glob(f"{path.name}*"))
  assert state_bytes < 64 * 1024


def test_in_memory_reader_runs_no_autotuning_thread(pre_encoded):
  # Autotuning's model thread held the demo's Parti job up to a minute at exit.
  assert _in_memory().options().autotune.enabled is False
  assert _dataset().options().autotune.enabled is not False  # Reading from disk tunes.


def test_in_memory_refuses_a_single_epoch_and_a_split_too_large(pre_encoded):
  with pytest.raises(ConfigError, match="needs num_epochs None"):
    _dataset(num_epochs=1, in_memory=True)
  with pytest.raises(ConfigError, match="too many to hold in memory"):
    input_pipeline.in_memory_examples(
      "test_pre_encoded", split="train", task_feature_lengths={"inputs": 8, "targets": 6},
      feature_converter=feature_converters.ImageTokensFeatureConverter(bos_id=16),
      shard_info=ONE_HOST, max_bytes=100,
    )  # fmt: skip


def test_global_batch_must_split_over_hosts():
  with pytest.raises(ValueError, match="does not split over 3 hosts"):
    input_pipeline.host_batch_size(8, 3)


def test_mixtures(messy_folder, tmp_path):
  mixture = seqio.get_mixture_or_task("parti_shapes_coco_256")
  assert {t.name for t in mixture.tasks} == {"parti_shapes_256", "coco_captions_256"}
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "x.png").write_bytes(_png(_image(200)))
  (tmp_path / "other" / "x.txt").write_text("another caption")
  registry.register_image_text_task(
    "test_mix_a", sources.folder_source(str(messy_folder)), image_size=32
  )
  registry.register_image_text_task(
    "test_mix_b", sources.folder_source(str(tmp_path / "other")), image_size=32
  )
  seqio.MixtureRegistry.remove("test_mix")
  seqio.MixtureRegistry.add("test_mix", [("test_mix_a", 1.0), ("test_mix_b", 1.0)])
  dataset = input_pipeline.get_dataset(
    "test_mix",
    split="train",
    task_feature_lengths={"inputs": 16, "image": 32},
    feature_converter=feature_converters.ImageTextFeatureConverter(),
    global_batch_size=1,
    shuffle=True,
    seed=0,
    shard_info=ONE_HOST,
  )
  values = {
    round(float(b["images"][0, 0, 0, 0]) * 255) for b in dataset.take(40).as_numpy_iterator()
  }
  assert 200 in values and len(values) > 1  # Both tasks contribute.
