"""Reads PartiPrompts-format TSVs: Prompt, Category, Challenge, Note (and any other columns).

    prompts = read_parti_prompts("PartiPrompts.tsv")
    by_category = group_by(prompts, "category")

The real benchmark has 1632 prompts in 12 categories and 11 challenge aspects.
Blank prompts are skipped with a warning that names the line; bytes that are
not UTF-8 are replaced (U+FFFD) with a warning. Nothing here needs TensorFlow.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import pathlib

from absl import logging

REQUIRED_COLUMNS = ("Prompt",)


@dataclasses.dataclass(frozen=True)
class PartiPrompt:
  """One benchmark prompt; `line` is its line number in the file (header is line 1)."""

  prompt: str
  category: str = ""
  challenge: str = ""
  note: str = ""
  line: int = 0


def read_parti_prompts(path: str | pathlib.Path) -> list[PartiPrompt]:
  """Reads a PartiPrompts-format TSV.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the header has no `Prompt` column.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"PartiPrompts file {path} not found.")
  raw = path.read_bytes()
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError:
    text = raw.decode("utf-8-sig", errors="replace")
    logging.warning("%s is not valid UTF-8; undecodable bytes were replaced.", path)
  reader = csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
  missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
  if missing:
    raise ValueError(f"{path} has no {missing} column; its header is {reader.fieldnames}.")
  prompts = []
  for line, row in enumerate(reader, start=2):
    prompt = (row.get("Prompt") or "").strip()
    if not prompt:
      logging.warning("%s:%d: blank prompt skipped.", path, line)
      continue
    prompts.append(
      PartiPrompt(
        prompt=prompt,
        category=(row.get("Category") or "").strip(),
        challenge=(row.get("Challenge") or "").strip(),
        note=(row.get("Note") or "").strip(),
        line=line,
      )
    )
  return prompts


def group_by(prompts: list[PartiPrompt], field: str) -> dict[str, list[PartiPrompt]]:
  """Prompts grouped by "category" or "challenge", groups in order of first appearance."""
  if field not in ("category", "challenge"):
    raise ValueError(f"Group by 'category' or 'challenge', not {field!r}.")
  groups: dict[str, list[PartiPrompt]] = collections.defaultdict(list)
  for prompt in prompts:
    groups[getattr(prompt, field)].append(prompt)
  return dict(groups)
