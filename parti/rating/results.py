"""What the raters said: win, tie and loss rates with 95% intervals, by question, by
PartiPrompts Category and Challenge, per rater, and how often raters agree.

Intervals are Wilson score intervals for a binomial proportion (each answer is one
trial of "run A preferred", "tie" or "run B preferred"): unlike the normal
approximation they stay inside [0, 1] and hold up at the few dozen answers of a small
study. Agreement is between every two raters over the items and questions both
answered: the share of equal answers, and Cohen's kappa (agreement beyond what each
rater's own answer rates would give by chance).
"""

from __future__ import annotations

import collections
import csv
import io
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

from parti.rating.store import QUESTIONS

Z_95 = 1.959964


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
  """The Wilson score interval of a binomial proportion ((0, 1) with no trials)."""
  if trials == 0:
    return 0.0, 1.0
  p = successes / trials
  denominator = 1 + z * z / trials
  center = (p + z * z / (2 * trials)) / denominator
  half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
  return max(0.0, center - half), min(1.0, center + half)


def _tally(rows: Iterable[Mapping], run_a: str, run_b: str) -> dict:
  counts = collections.Counter(
    "a" if row["winner"] == run_a else "b" if row["winner"] == run_b else "tie" for row in rows
  )
  n = sum(counts.values())
  out = {"answers": n}
  for outcome, name in (("a", "win"), ("tie", "tie"), ("b", "loss")):
    low, high = wilson_interval(counts[outcome], n)
    out[name] = {"count": counts[outcome], "rate": counts[outcome] / n if n else 0.0,
                 "low": low, "high": high}  # fmt: skip
  return out


def summarize(rows: Sequence[Mapping], items: Mapping[str, object]) -> dict:
  """Results per pair of runs: overall, by category, by challenge and per rater, for each
  question ("win" is the pair's first run preferred), and agreement between raters."""
  rows = [row for row in rows if row["item"] in items]
  pairs = sorted({items[row["item"]].runs for row in rows})
  result = {"interval": "Wilson score, 95%", "answers": len(rows), "raters": len({
    row["rater"] for row in rows}), "pairs": []}  # fmt: skip
  for run_a, run_b in pairs:
    pair_rows = [row for row in rows if items[row["item"]].runs == (run_a, run_b)]
    pair = {"runs": [run_a, run_b], "questions": {}}
    for question in QUESTIONS:
      asked = [row for row in pair_rows if row["question"] == question]
      groups = {"all": {"": asked}}
      for field in ("category", "challenge", "rater"):
        split = collections.defaultdict(list)
        for row in asked:
          key = row["rater"] if field == "rater" else getattr(items[row["item"]], field)
          if key:
            split[key].append(row)
        if split:
          groups[field] = dict(sorted(split.items()))
      pair["questions"][question] = {
        field: {key: _tally(group, run_a, run_b) for key, group in split.items()}
        for field, split in groups.items()
      }
    pair["agreement"] = agreement(pair_rows)
    result["pairs"].append(pair)
  return result


def agreement(rows: Sequence[Mapping]) -> list[dict]:
  """For every two raters with answers in common: how many, the share equal, and
  Cohen's kappa over (first run, tie, second run)."""
  by_rater = collections.defaultdict(dict)
  for row in rows:
    by_rater[row["rater"]][(row["item"], row["question"])] = row["winner"]
  out = []
  for first, second in itertools.combinations(sorted(by_rater), 2):
    common = sorted(set(by_rater[first]) & set(by_rater[second]))
    if not common:
      continue
    a = [by_rater[first][k] for k in common]
    b = [by_rater[second][k] for k in common]
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / len(common)
    labels = set(a) | set(b)
    expected = sum((a.count(label) / len(a)) * (b.count(label) / len(b)) for label in labels)
    kappa = 1.0 if expected == 1 else (observed - expected) / (1 - expected)
    out.append({"raters": [first, second], "shared_answers": len(common),
                "agreement": observed, "cohen_kappa": kappa})  # fmt: skip
  return out


CSV_FIELDS = (
  "run_a", "run_b", "question", "group_by", "group", "answers",
  "win", "win_low", "win_high", "tie", "tie_low", "tie_high", "loss", "loss_low", "loss_high",
)  # fmt: skip


def to_csv(summary: Mapping) -> str:
  """One CSV row per pair, question and group (rates and Wilson 95% bounds)."""
  buffer = io.StringIO()
  writer = csv.writer(buffer)
  writer.writerow(CSV_FIELDS)
  for pair in summary["pairs"]:
    for question, groups in pair["questions"].items():
      for group_by, tallies in groups.items():
        for group, tally in tallies.items():
          values = [tally[k][f] for k in ("win", "tie", "loss") for f in ("rate", "low", "high")]
          writer.writerow(
            [*pair["runs"], question, group_by, group, tally["answers"],
             *(f"{v:.4f}" for v in values)]
          )  # fmt: skip
  return buffer.getvalue()
