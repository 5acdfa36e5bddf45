"""Per-category and per-challenge tables of an inference run (PartiPrompts' breakdown).

    python -c "from parti import prompt_report; print(prompt_report.markdown(entries))"

Groups the manifest entries of `parti.infer` by PartiPrompts' Category and
Challenge and reports, for each group, how many prompts it has, the mean of
their best sample's score (the reranker's cosine similarity, or without a
reranker the model's log-likelihood of the image) and, with a reranker, the
mean CLIP-style score (100 * max(cosine, 0)). The inference job writes it as
OUTPUT_DIR/report.md when its prompts carry categories.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence


def group_scores(
  entries: Sequence[Mapping], field: str, metric: str = "scores"
) -> dict[str, tuple[int, float]]:
  """group -> (prompts, mean of `metric`), groups in order of first appearance.

  `metric` is "scores" (the best sample's ranking score) or "clip_score".
  """
  if field not in ("category", "challenge"):
    raise ValueError(f"Group by 'category' or 'challenge', not {field!r}.")
  scores: dict[str, list[float]] = collections.defaultdict(list)
  for entry in entries:
    value = entry.get(metric, float("nan"))
    value = (value or [float("nan")])[0] if isinstance(value, list) else value
    scores[entry.get(field) or "(none)"].append(float(value))
  return {group: (len(values), sum(values) / len(values)) for group, values in scores.items()}


def markdown(entries: Sequence[Mapping], title: str = "Inference report") -> str:
  """The tables as Markdown: one by category, one by challenge, then all prompts."""
  kinds = sorted({entry.get("score", "log_likelihood") for entry in entries})
  with_clip = any("clip_score" in entry for entry in entries)
  lines = [
    f"# {title}",
    "",
    f"{len(entries)} prompts. Score: the best sample's {' / '.join(kinds) or 'score'}"
    + ("; CLIP score: 100 * max(reranker cosine, 0)." if with_clip else "."),
    "",
  ]
  for field in ("category", "challenge"):
    header = f"| {field} | prompts | mean score |" + (" mean CLIP score |" if with_clip else "")
    lines += [f"## By {field}", "", header, "|---|---|---|" + ("---|" if with_clip else "")]
    clip = group_scores(entries, field, "clip_score") if with_clip else {}
    for group, (count, mean) in sorted(group_scores(entries, field).items()):
      extra = f" {clip[group][1]:.1f} |" if with_clip else ""
      lines.append(f"| {group} | {count} | {mean:.2f} |{extra}")
    lines.append("")
  return "\n".join(lines)
