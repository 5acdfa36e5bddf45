"""The shapes evaluation's outputs: their file names, the markdown report and the plots.

`parti.evaluate_shapes` writes them; the demo and the scaling study read them back.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from parti.tasks.shapes import evaluate

REPORT_JSON = "shapes_eval.json"
REPORT = "report.md"
PLOT = "accuracy_vs_guidance.png"
CURVE_PLOT = "learning_curve.png"


def markdown(
  results: dict, checkpoint_dir: str, step: int, clip_scores: dict, sampling: dict | None = None
) -> str:
  """The report: overall accuracy by guidance scale, CLIP-style scores, per-kind tables;
  `sampling` (name -> value) says how the images were sampled."""
  lines = [
    "# Shapes evaluation",
    "",
    f"{checkpoint_dir}, step {step}. Accuracy of the shapes evaluator on generated images.",
    "",
  ]
  if sampling:
    lines += ["Sampling: " + ", ".join(f"{k} {v}" for k, v in sampling.items()) + ".", ""]
  lines += [
    "## Overall (all attributes right) by guidance scale",
    "",
    "| guidance | " + " | ".join(next(iter(results.values()))) + " |",
    "|---|" + "---|" * len(next(iter(results.values()))),
  ]
  for scale, by_split in results.items():
    cells = " | ".join(f"{100 * t['overall'].get('all', 0):.1f}%" for t in by_split.values())
    lines.append(f"| {scale} | {cells} |")
  if clip_scores:
    splits = list(next(iter(clip_scores.values())))
    lines += [
      "",
      "## CLIP-style score (reranker, 100 * max(cosine, 0)) by guidance scale",
      "",
      "| guidance | " + " | ".join(splits) + " |",
      "|---|" + "---|" * len(splits),
    ]
    for scale, by_split in clip_scores.items():
      lines.append(f"| {scale} | " + " | ".join(f"{v:.1f}" for v in by_split.values()) + " |")
  for scale, by_split in results.items():
    for split, table in by_split.items():
      lines += ["", f"## λ = {scale}, {split}", "", "```", evaluate.format_table(table), "```"]
  return "\n".join(lines) + "\n"


def guidance_plot(results: dict) -> bytes:
  """A line per split: overall accuracy (all attributes right) against λ."""
  splits = list(next(iter(results.values())))
  series = {
    split: [(float(s), results[s][split]["overall"].get("all", 0.0)) for s in results]
    for split in splits
  }
  return line_plot(series, "guidance scale", "shapes evaluator: all attributes right")


def curve_plot(curve: list[dict]) -> bytes:
  """A line per split: overall accuracy against the run's training seconds (or its steps,
  when its metrics do not say the time of every checkpoint, as in runs from before)."""
  timed = all(point["train_seconds"] is not None for point in curve)
  x_key, x_label = ("train_seconds", "training seconds") if timed else ("step", "training steps")
  series: dict[str, list[tuple[float, float]]] = {}
  for point in curve:
    for split, accuracy in point["all"].items():
      series.setdefault(split, []).append((point[x_key], accuracy))
  return line_plot(series, x_label, "learning curve: all attributes right")


def line_plot(
  series: dict[str, list[tuple[float, float]]],
  x_label: str,
  title: str,
  width: int = 560,
  height: int = 360,
) -> bytes:
  """PNG of one line per series of (x, accuracy in [0, 1]) points."""
  xs = [x for points in series.values() for x, _ in points]
  image = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(image)
  left, right, top, bottom = 60, width - 20, 30, height - 50
  draw.rectangle([left, top, right, bottom], outline="black")
  low, high = min(xs), max(xs)
  span = high - low or 1.0

  def xy(x, accuracy):
    return (left + (x - low) / span * (right - left), bottom - accuracy * (bottom - top))

  for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
    y = xy(low, tick)[1]
    draw.line([left - 4, y, left, y], fill="black")
    draw.text((8, y - 6), f"{100 * tick:.0f}%", fill="black")
  for x in sorted(set(xs)):
    draw.text((xy(x, 0)[0] - 8, bottom + 6), f"{x:.3g}", fill="black")
  draw.text(((left + right) // 2 - 50, height - 22), x_label, fill="black")
  draw.text((left, 8), title, fill="black")
  colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
  for index, (label, points) in enumerate(series.items()):
    pixels = [xy(x, y) for x, y in points]
    color = colors[index % len(colors)]
    if len(pixels) > 1:
      draw.line(pixels, fill=color, width=2)
    for x, y in pixels:
      draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    draw.text((right - 110, top + 8 + 14 * index), label, fill=color)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def curve_markdown(curve: list[dict], scale: float) -> str:
  """The learning curve's section of the report: the plot and a row per checkpoint."""
  splits = list(curve[0]["all"])
  lines = [
    "",
    f"## Learning curve (λ = {scale}, {curve[0]['prompts'][splits[0]]} prompts per split)",
    "",
    f"![learning curve]({CURVE_PLOT})",
    "",
    "| step | training seconds | " + " | ".join(splits) + " |",
    "|---|---|" + "---|" * len(splits),
  ]
  for point in curve:
    cells = " | ".join(f"{100 * point['all'][s]:.1f}%" for s in splits)
    seconds = point["train_seconds"]
    shown = "-" if seconds is None else f"{seconds:.0f}"
    lines.append(f"| {point['step']} | {shown} | {cells} |")
  return "\n".join(lines) + "\n"
