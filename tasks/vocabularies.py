"""Vocabularies: SentencePiece for text, and the image-token vocabulary of the tokenizer's codebook.

Text uses T5's id convention (pad 0, EOS 1, UNK 2, no BOS) so that
`seqio.SentencePieceVocabulary` reads our models and T5's alike. Image token ids
are codebook indices: every id is a real code, including 0, and there is no EOS.
"""

from __future__ import annotations

import io
import pathlib
from collections.abc import Iterable

import sentencepiece as spm
import seqio
import tensorflow as tf

# The vocabulary trained on the shapes captions by `parti.tasks.train_vocab`
# (gin/data/train_vocab_shapes.gin), shipped so that the tasks work before any job ran.
SHAPES_VOCAB = pathlib.Path(__file__).parent / "vocab" / "parti_shapes.model"

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def train_sentencepiece(
  texts: Iterable[str],
  vocab_size: int,
  model_type: str = "unigram",
  character_coverage: float = 1.0,
  max_sentences: int = 1_000_000,
) -> bytes:
  """Trains a SentencePiece model on `texts` and returns the serialized model.

  `vocab_size` is an upper bound: a small corpus (such as the shapes captions)
  may not support that many pieces, and the model then has fewer.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(texts),
    model_writer=model,
    vocab_size=vocab_size,
    hard_vocab_limit=False,
    model_type=model_type,
    character_coverage=character_coverage,
    input_sentence_size=max_sentences,
    shuffle_input_sentence=True,
    pad_id=PAD_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    bos_id=-1,
    normalization_rule_name="nmt_nfkc",
    minloglevel=2,
  )
  return model.getvalue()


def text_vocabulary(path: str | pathlib.Path = SHAPES_VOCAB) -> seqio.SentencePieceVocabulary:
  """The seqio vocabulary of a SentencePiece `.model` file (ours, T5's, ...)."""
  if not tf.io.gfile.exists(str(path)):
    raise FileNotFoundError(
      f"SentencePiece model {path} not found. Train one with `python -m parti.tasks.train_vocab` "
      "or point to an existing .model file."
    )
  return seqio.SentencePieceVocabulary(str(path))


class ImageVocabulary(seqio.Vocabulary):
  """Image token ids: the codebook indices 0..codebook_size-1, with no EOS.

  Encoding and decoding are the identity on id sequences (there is no string
  form of an image token); out-of-range ids are refused.
  """

  def __init__(self, codebook_size: int):
    if codebook_size < 1:
      raise ValueError(f"codebook_size must be positive, got {codebook_size}.")
    self._codebook_size = codebook_size
    super().__init__(extra_ids=0)

  @property
  def codebook_size(self) -> int:
    return self._codebook_size

  @property
  def eos_id(self) -> None:
    return None

  @property
  def unk_id(self) -> None:
    return None

  @property
  def _base_vocab_size(self) -> int:
    return self._codebook_size

  def _check(self, ids: Iterable[int]) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self._codebook_size]
    if bad:
      raise ValueError(f"Image token ids {bad[:5]} outside [0, {self._codebook_size}).")
    return ids

  def _encode(self, s) -> list[int]:
    return self._check(s)

  def _decode(self, ids) -> list[int]:
    return self._check(ids)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    ids = tf.cast(s, tf.int32)
    tf.debugging.assert_less(ids, self._codebook_size, message="image token id out of range")
    tf.debugging.assert_non_negative(ids, message="image token id out of range")
    return ids

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    return tf.cast(ids, tf.int32)

  def __eq__(self, other) -> bool:
    return isinstance(other, ImageVocabulary) and other.codebook_size == self.codebook_size

  def __hash__(self) -> int:
    return hash(("ImageVocabulary", self._codebook_size))
