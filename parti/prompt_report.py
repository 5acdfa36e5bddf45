"""Per-category and per-challenge tables of an inference run (PartiPrompts' breakdown).

    python -c "from parti import prompt_report; print(prompt_report.markdown(entries))"

Groups the manifest entries of `parti.infer` by PartiPrompts' Category and
Challenge and reports, for each group, how many prompts it has and the mean of
their best sample's score (the model's log-likelihood of the image, or the
reranker's score once the run has one). The inference job writes it as
OUTPUT_DIR/report.md when its prompts carry categories.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence


def group_scores(entries: Sequence[Mapping], field: str) -> dict[str, tuple[int, float]]:
  """group -> (prompts, mean best score), groups in order of first appearance."""
  if field not in ("category", "challenge"):
    raise ValueError(f"Group by 'category' or 'challenge', not {field!r}.")
  scores: dict[str, list[float]] = collections.defaultdict(list)
  for entry in entries:
    best = entry.get("scores") or [float("nan")]
    scores[entry.get(field) or "(none)"].append(float(best[0]))
  return {group: (len(values), sum(values) / len(values)) for group, values in scores.items()}


def markdown(entries: Sequence[Mapping], title: str = "Inference report") -> str:
  """The tables as Markdown: one by category, one by challenge, then all prompts."""
  lines = [f"# {title}", "", f"{len(entries)} prompts. Score: the best sample's score.", ""]
  for field in ("category", "challenge"):
    lines += [f"## By {field}", "", f"| {field} | prompts | mean score |", "|---|---|---|"]
    for group, (count, mean) in sorted(group_scores(entries, field).items()):
      lines.append(f"| {group} | {count} | {mean:.2f} |")
    lines.append("")
  return "\n".join(lines)
