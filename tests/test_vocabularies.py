"""Text and image vocabularies round-trip; the vocab job reproduces the shipped model."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from parti.tasks import train_vocab, vocabularies


def test_shapes_text_vocabulary_round_trips():
  vocabulary = vocabularies.text_vocabulary()
  caption = "to the left of a blue square there is a small red circle on a white background"
  ids = vocabulary.encode(caption)
  assert vocabulary.decode(ids) == caption
  assert vocabularies.UNK_ID not in ids
  assert (vocabulary.pad_id, vocabulary.eos_id, vocabulary.unk_id) == (0, 1, 2)
  assert (
    vocabulary.decode_tf(vocabulary.encode_tf(tf.constant(caption))).numpy().decode() == caption
  )


def test_missing_text_vocabulary_names_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope\.model"):
    vocabularies.text_vocabulary(tmp_path / "nope.model")


def test_image_vocabulary_round_trips_and_has_no_eos():
  vocabulary = vocabularies.ImageVocabulary(8192)
  ids = [0, 1, 8191, 17]
  assert vocabulary.decode(vocabulary.encode(ids)) == ids
  assert vocabulary.eos_id is None
  assert vocabulary.vocab_size == 8192
  np.testing.assert_array_equal(vocabulary.encode_tf(tf.constant(ids)).numpy(), ids)
  with pytest.raises(ValueError, match="outside"):
    vocabulary.encode([8192])
  with pytest.raises(tf.errors.InvalidArgumentError):
    vocabulary.encode_tf(tf.constant([-1]))


def test_vocab_job_on_a_text_file(tmp_path):
  corpus = tmp_path / "captions.txt"
  corpus.write_text(
    "\n".join(f"a photo of a {w} dog" for w in ("big", "small", "red", "happy")) * 50
  )
  path = train_vocab.train_vocab(
    output_dir=str(tmp_path), name="dogs", text_file=str(corpus), vocab_size=40
  )
  processor = spm.SentencePieceProcessor(model_file=str(path))
  assert processor.decode(processor.encode("a photo of a red dog")) == "a photo of a red dog"


@pytest.mark.parametrize(
  "kwargs",
  [dict(), dict(text_file="a.txt", shapes_examples=10)],
  ids=["no source", "two sources"],
)
def test_vocab_job_needs_exactly_one_source(tmp_path, kwargs):
  with pytest.raises(ValueError, match="exactly one caption source"):
    train_vocab.train_vocab(output_dir=str(tmp_path), **kwargs)


@pytest.mark.slow
def test_vocab_job_reproduces_the_shipped_shapes_vocabulary(tmp_path):
  path = train_vocab.train_vocab(
    output_dir=str(tmp_path), name="parti_shapes", shapes_examples=20_000, vocab_size=256
  )
  made = spm.SentencePieceProcessor(model_file=str(path))
  shipped = spm.SentencePieceProcessor(model_file=str(vocabularies.SHAPES_VOCAB))
  assert [made.id_to_piece(i) for i in range(made.vocab_size())] == [
    shipped.id_to_piece(i) for i in range(shipped.vocab_size())
  ]


def test_vocab_job_on_a_task(tmp_path):
  from parti.tasks import registry, sources

  for i, word in enumerate(("red", "green", "blue", "")):
    (tmp_path / f"{i}.png").write_bytes(b"unused: only captions are read")
    (tmp_path / f"{i}.txt").write_text(f"a {word} kite flying" if word else "  ")
  registry.register_image_text_task(
    "test_vocab_task", sources.folder_source(str(tmp_path)), image_size=32
  )
  path = train_vocab.train_vocab(
    output_dir=str(tmp_path / "out"), task="test_vocab_task", vocab_size=30
  )
  processor = spm.SentencePieceProcessor(model_file=str(path))
  assert processor.decode(processor.encode("a blue kite flying")) == "a blue kite flying"
