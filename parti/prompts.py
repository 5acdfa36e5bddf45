"""Prompts for inference: read from a file or a task, cleaned, and encoded like training text.

    prompts = read_prompts("PartiPrompts.tsv")          # or prompts.txt, or "task:NAME:split"
    encoder = PromptEncoder(text_length=128)             # the shipped shapes vocabulary
    tokens = encoder.encode_all(prompts)                 # int32 [P, 128]

Sources: a text file (one prompt per line), a PartiPrompts-format TSV (Category
and Challenge kept), or a seqio task's split (`task:NAME[:SPLIT]`, default
validation; this one needs TensorFlow). Bad input has a defined outcome, each
logged with where it came from: blank prompts are skipped, bytes that are not
UTF-8 are replaced, a prompt seen before is generated once, and a prompt longer
than the text length is truncated like training text.

Encoding is SentencePiece with T5's ids, then EOS, then padding: what the seqio
tasks' `tokenize` and `append_eos_after_trim` make of a caption, without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import pathlib
from collections.abc import Sequence

import numpy as np
from absl import logging

from parti.errors import ConfigError

PAD_ID, EOS_ID = 0, 1
TASK_PREFIX = "task:"


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt to generate for; `source` says where it came from (file:line)."""

  text: str
  category: str = ""
  challenge: str = ""
  source: str = ""


def shapes_vocabulary_path() -> pathlib.Path:
  """The SentencePiece model shipped for the shapes dataset (what the tiny model reads)."""
  return pathlib.Path(
    str(importlib.resources.files("parti.tasks") / "vocab" / "parti_shapes.model")
  )


def read_prompts(source: str) -> list[Prompt]:
  """Prompts from a .txt or .tsv file, or `task:NAME[:SPLIT]`, cleaned and deduplicated."""
  if source.startswith(TASK_PREFIX):
    prompts = _task_prompts(source[len(TASK_PREFIX) :])
  else:
    path = pathlib.Path(source)
    if not path.is_file():
      raise ConfigError(f"Prompts file {source} not found.")
    if path.suffix.lower() == ".tsv":
      from parti.tasks import parti_prompts

      prompts = [
        Prompt(p.prompt, p.category, p.challenge, f"{path}:{p.line}")
        for p in parti_prompts.read_parti_prompts(path)
      ]
    else:
      prompts = _text_file_prompts(path)
  unique = _deduplicate(prompts)
  if not unique:
    raise ConfigError(f"{source} has no prompts.")
  return unique


def _text_file_prompts(path: pathlib.Path) -> list[Prompt]:
  raw = path.read_bytes()
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError:
    text = raw.decode("utf-8-sig", errors="replace")
    logging.warning("%s is not valid UTF-8; undecodable bytes were replaced (U+FFFD).", path)
  prompts = []
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      logging.warning("%s:%d: blank prompt skipped.", path, number)
      continue
    prompts.append(Prompt(" ".join(line.split()), source=f"{path}:{number}"))
  return prompts


def _task_prompts(spec: str) -> list[Prompt]:
  """The captions of a registered seqio task's split (needs TensorFlow)."""
  import seqio

  import parti.tasks.registry  # noqa: F401  (registers the project's tasks)

  name, _, split = spec.partition(":")
  split = split or "validation"
  try:
    task = seqio.get_mixture_or_task(name)
  except ValueError as error:
    raise ConfigError(f"Unknown seqio task {name!r}: {error}") from error
  vocabulary = task.output_features["inputs"].vocabulary
  dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1)
  prompts = []
  for index, example in enumerate(dataset.as_numpy_iterator()):
    ids = [int(t) for t in example["inputs"] if t > EOS_ID]
    prompts.append(Prompt(vocabulary.decode(ids), source=f"{name}:{split}:{index}"))
  return prompts


def _deduplicate(prompts: Sequence[Prompt]) -> list[Prompt]:
  seen: dict[str, Prompt] = {}
  for prompt in prompts:
    if prompt.text in seen:
      logging.warning(
        "%s repeats the prompt of %s (%r): generated once.",
        prompt.source, seen[prompt.text].source, prompt.text,
      )  # fmt: skip
      continue
    seen[prompt.text] = prompt
  return list(seen.values())


class PromptEncoder:
  """Text -> padded token ids, as the training tasks encode captions."""

  def __init__(self, text_length: int, vocabulary_path: str | pathlib.Path | None = None):
    import sentencepiece as spm

    path = pathlib.Path(vocabulary_path or shapes_vocabulary_path())
    if not path.is_file():
      raise ConfigError(f"SentencePiece vocabulary {path} not found.")
    self.text_length = text_length
    self.path = path
    self._processor = spm.SentencePieceProcessor(model_file=str(path))

  @property
  def vocab_size(self) -> int:
    return self._processor.get_piece_size()

  def encode(self, prompt: Prompt | str) -> np.ndarray:
    """int32 [text_length]: pieces (truncated to leave room for EOS), EOS, padding."""
    text = prompt.text if isinstance(prompt, Prompt) else prompt
    ids = self._processor.encode(text)
    if len(ids) > self.text_length - 1:
      logging.warning(
        "Prompt of %d tokens truncated to %d: %r",
        len(ids), self.text_length - 1, text if len(text) < 200 else text[:200] + "...",
      )  # fmt: skip
      ids = ids[: self.text_length - 1]
    out = np.full(self.text_length, PAD_ID, np.int32)
    out[: len(ids)] = ids
    out[len(ids)] = EOS_ID
    return out

  def decode(self, ids) -> str:
    return self._processor.decode([int(t) for t in ids if t > EOS_ID])
