"""Prompts for inference: read from a file or a task, cleaned, and encoded like training text.

    prompts = read_prompts("PartiPrompts.tsv")  # or .txt, .jsonl, or "task:NAME:split"
    encoder = PromptEncoder(text_length=128)    # the shipped shapes vocabulary
    tokens = encoder.encode(prompts[0])         # int32 [128]

Sources: a text file (one prompt per line), a PartiPrompts-format TSV (Category
and Challenge kept), a JSON Lines file of requests, or a seqio task's split
(`task:NAME[:SPLIT]`, default validation; this one needs TensorFlow). A request
line is an object with a "prompt" and, optionally, "category", "challenge", its
own "seed" and "guidance_scale", and an "image" to complete (a path, relative to
the file's folder), for example

    {"prompt": "a red circle", "seed": 7, "guidance_scale": 2.0, "image": "photo.png"}

or to edit, with the region to redraw as a "mask" (a PNG of the image's size, white
where to redraw), a "box" [x0, y0, x1, y1] in pixels, or an "extend" [top, right,
bottom, left] of pixels to add around it (outpainting); see `parti.sampling.editing`.

Bad input has a defined outcome, each logged with where it came from: blank
prompts are skipped, bytes that are not UTF-8 are replaced, a request seen
before is generated once, and a prompt longer than the text length is truncated
like training text. A request line that is not such an object is refused,
naming its line, before anything is generated.

Encoding is SentencePiece with T5's ids, then EOS, then padding: what the seqio
tasks' `tokenize` and `append_eos_after_trim` make of a caption, without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import pathlib
import re
from collections.abc import Sequence

import numpy as np
from absl import logging

from parti.runtime.errors import ConfigError

PAD_ID, EOS_ID = 0, 1
TASK_PREFIX = "task:"


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One request to generate for; `source` says where it came from (file:line).

  `seed` and `guidance_scale` override the run's for this request (None: the
  run's); `image` is an image file whose top rows the request continues, or which it
  edits in the region its `mask`, `box` or `extend` names (`parti.sampling.editing`).
  """

  text: str
  category: str = ""
  challenge: str = ""
  source: str = ""
  seed: int | None = None
  guidance_scale: float | None = None
  image: str = ""
  mask: str = ""
  box: tuple[int, ...] | None = None
  extend: tuple[int, ...] | None = None

  @property
  def key(self) -> str:
    """What makes two requests the same: the text, and any per-request option."""
    options = {
      "seed": self.seed, "guidance_scale": self.guidance_scale, "image": self.image,
      "mask": self.mask, "box": self.box and list(self.box),
      "extend": self.extend and list(self.extend),
    }  # fmt: skip
    options = {k: v for k, v in options.items() if v not in (None, "")}
    return self.text if not options else json.dumps({"prompt": self.text, **options})


def shapes_vocabulary_path() -> pathlib.Path:
  """The SentencePiece model shipped for the shapes dataset (what the tiny model reads)."""
  return pathlib.Path(
    str(importlib.resources.files("parti.tasks") / "vocab" / "parti_shapes.model")
  )


def read_prompts(source: str, image_root: str | None = None) -> list[Prompt]:
  """Prompts from a .txt or .tsv file, or `task:NAME[:SPLIT]`, cleaned and deduplicated.

  A .jsonl request's `image` must lie under the request file's folder, or under
  `image_root` when given (symbolic links are followed before the check).
  """
  if source.startswith(TASK_PREFIX):
    prompts = _task_prompts(source[len(TASK_PREFIX) :])
  else:
    path = pathlib.Path(source)
    if not path.is_file():
      raise ConfigError(f"Prompts file {source} not found.")
    if path.suffix.lower() == ".jsonl":
      prompts = _request_file_prompts(path, image_root)
    elif path.suffix.lower() == ".tsv":
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


# Control characters other than tab: a line of a NUL byte alone is blank, not a prompt.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _lines(path: pathlib.Path) -> list[str]:
  """The file's lines, with bytes that are not UTF-8 replaced (and a warning) and
  control characters removed."""
  raw = path.read_bytes()
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError:
    text = raw.decode("utf-8-sig", errors="replace")
    logging.warning("%s is not valid UTF-8; undecodable bytes were replaced (U+FFFD).", path)
  return [_CONTROL.sub("", line) for line in text.splitlines()]


def _text_file_prompts(path: pathlib.Path) -> list[Prompt]:
  prompts = []
  for number, line in enumerate(_lines(path), start=1):
    if not line.strip():
      logging.warning("%s:%d: blank prompt skipped.", path, number)
      continue
    prompts.append(Prompt(" ".join(line.split()), source=f"{path}:{number}"))
  return prompts


_REQUEST_FIELDS = {
  "prompt": str, "category": str, "challenge": str, "seed": int, "guidance_scale": float,
  "image": str, "mask": str, "box": list, "extend": list,
}  # fmt: skip
_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", list: "4 integers"}
# A GenEval metadata line is a request too (`parti.evaluation.geneval`): its clauses say
# what the image must show, for the scorer; `parti.infer` writes GenEval's folders.
_GENEVAL_FIELDS = ("tag", "include", "exclude")


def _is_a(value, kind: type) -> bool:
  """Whether a JSON value is absent or of `kind` (an int will do for a float; a bool never
  for a number, though Python counts it as an int)."""
  if value is None:
    return True
  if isinstance(value, bool):
    return kind is bool
  if kind is list:  # Four pixel counts: a box or an extension.
    return (
      isinstance(value, list)
      and len(value) == 4
      and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
  return isinstance(value, (int, float) if kind is float else kind)


def _request_file_prompts(path: pathlib.Path, image_root: str | None = None) -> list[Prompt]:
  """Requests from JSON Lines; see the module docstring for the fields."""
  roots = [path.parent.resolve()] + ([pathlib.Path(image_root).resolve()] if image_root else [])
  prompts = []
  for number, line in enumerate(_lines(path), start=1):
    where = f"{path}:{number}"
    if not line.strip():
      continue
    try:
      request = json.loads(line)
    except json.JSONDecodeError as error:
      raise ConfigError(f"{where} is not JSON ({error}): {line[:120]!r}") from None
    if not isinstance(request, dict):
      raise ConfigError(f"{where} is not a JSON object: {line[:120]!r}")
    if any(field in request for field in _GENEVAL_FIELDS):
      from parti.evaluation import geneval

      geneval.check_line(request, where)
      request = {k: v for k, v in request.items() if k not in _GENEVAL_FIELDS}
    unknown = sorted(set(request) - set(_REQUEST_FIELDS))
    if unknown:
      known = sorted([*_REQUEST_FIELDS, *_GENEVAL_FIELDS])
      raise ConfigError(f"{where} has unknown fields {unknown}; known: {known}.")
    for name, kind in _REQUEST_FIELDS.items():
      if not _is_a(request.get(name), kind):
        raise ConfigError(
          f"{where}: {name!r} should be {_KIND_NAMES[kind]}, not {request[name]!r}."
        )
    scale = request.get("guidance_scale")
    if scale is not None and not (math.isfinite(scale) and scale >= 0):
      raise ConfigError(f"{where}: guidance_scale should be finite and >= 0, not {scale}.")
    seed = request.get("seed")
    if seed is not None and not 0 <= seed < 2**31:
      raise ConfigError(f"{where}: seed should be in [0, 2**31), not {seed}.")
    text = " ".join((request.get("prompt") or "").split())
    if not text:
      logging.warning("%s: blank prompt skipped.", where)
      continue
    image = request.get("image")
    if image:
      image = _image_under(roots, path.parent / image, where)
    mask = request.get("mask")
    if mask:
      mask = _image_under(roots, path.parent / mask, where)
    regions = [name for name in ("mask", "box", "extend") if request.get(name)]
    if regions and not image:
      raise ConfigError(f"{where}: {regions[0]!r} names a region to edit, but there is no 'image'.")
    prompts.append(
      Prompt(
        text,
        category=request.get("category") or "",
        challenge=request.get("challenge") or "",
        source=where,
        seed=seed,
        guidance_scale=None if scale is None else float(scale),
        image=image or "",
        mask=mask or "",
        box=tuple(request["box"]) if request.get("box") else None,
        extend=tuple(request["extend"]) if request.get("extend") else None,
      )
    )
  return prompts


def _image_under(roots: list[pathlib.Path], image: pathlib.Path, where: str) -> str:
  """`image`, resolved, if it lies under one of `roots`; a request must not read (and
  copy into the output) files from anywhere else."""
  resolved = image.resolve()
  if not any(resolved.is_relative_to(root) for root in roots):
    raise ConfigError(
      f"{where}: image {str(image)!r} lies outside {[str(r) for r in roots]}; requests read "
      "images under their file's folder, or under infer.image_root when it is set."
    )
  return str(resolved)


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
    if prompt.key in seen:
      logging.warning(
        "%s repeats the request of %s (%r): generated once.",
        prompt.source, seen[prompt.key].source, prompt.key,
      )  # fmt: skip
      continue
    seen[prompt.key] = prompt
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

  def piece_count(self, text: str) -> int:
    """How many pieces `text` encodes to, before truncation and EOS."""
    return len(self._processor.encode(text))

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
