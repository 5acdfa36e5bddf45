"""The PartiPrompts reader, on small TSVs the tests write."""

from __future__ import annotations

import pytest

from parti.tasks import parti_prompts

HEADER = "Prompt\tCategory\tChallenge\tNote\n"


def test_reads_prompts_with_category_and_challenge(tmp_path):
  path = tmp_path / "p.tsv"
  path.write_text(
    HEADER
    + "a red circle\tIllustrations\tBasic\t\n"
    + 'a sign that says "hello"\tArtifacts\tWriting & Symbols\tquotes kept\n'
    + "\t\t\t\n"
    + "two cats\tAnimals\tQuantity\t\n",
    encoding="utf-8",
  )
  prompts = parti_prompts.read_parti_prompts(path)
  assert [p.prompt for p in prompts] == ["a red circle", 'a sign that says "hello"', "two cats"]
  assert prompts[1].challenge == "Writing & Symbols"
  assert prompts[2].line == 5  # The blank row (line 4) was skipped, not renumbered.
  groups = parti_prompts.group_by(prompts, "category")
  assert list(groups) == ["Illustrations", "Artifacts", "Animals"]


def test_prompt_only_file_and_non_utf8_bytes(tmp_path):
  path = tmp_path / "p.tsv"
  path.write_bytes(b"Prompt\ncaf\xe9\n")
  (prompt,) = parti_prompts.read_parti_prompts(path)
  assert prompt.prompt == "caf\ufffd"
  assert prompt.category == ""


def test_missing_prompt_column_is_a_clear_error(tmp_path):
  path = tmp_path / "p.tsv"
  path.write_text("Text\tCategory\nx\ty\n")
  with pytest.raises(ValueError, match=r"no \['Prompt'\] column"):
    parti_prompts.read_parti_prompts(path)


def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope\.tsv"):
    parti_prompts.read_parti_prompts(tmp_path / "nope.tsv")
