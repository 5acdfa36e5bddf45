"""Scores a GenEval image folder with the shapes evaluator (GenEval-compatible scoring).

    python -m parti.evaluate_geneval --gin_file=gin/geneval/evaluate.gin \
      --gin.IMAGE_DIR=runs/infer_geneval/geneval --gin.OUTPUT_DIR=runs/geneval_scores

IMAGE_DIR is in GenEval's layout (`<index>/metadata.jsonl`, `<index>/samples/NNNN.png`),
as `parti.infer` writes it for a GenEval metadata file, or as any generator writes it
for GenEval. Each image is checked against its prompt's clauses by GenEval's rules with
the shapes detector in place of GenEval's (`parti.evaluation.geneval`), so prompts
must be the shapes benchmark's (`parti.geneval_prompts`). OUTPUT_DIR receives GenEval's
`results.jsonl` (one line per image: filename, tag, prompt, correct, reason, metadata)
and its summary, `summary.json` and `summary.md`: per-task accuracy and the overall score,
the mean of the task means. An unreadable image is skipped, named in the log and counted
in the summary; a prompt folder without images is counted too.
"""

from __future__ import annotations

import json
import pathlib

import gin
import numpy as np
from absl import logging

from parti.evaluation import geneval
from parti.runtime import files, gin_utils, metric_logging
from parti.runtime.errors import ConfigError

RESULTS_FILE = "results.jsonl"


def evaluate_geneval(*, image_dir: str, output_dir: str) -> dict:
  """Scores every image of `image_dir`; returns the summary and writes the outputs.

  Raises:
    ConfigError: the folder is not in GenEval's layout, a metadata file is malformed,
      or a prompt asks for a class the shapes detector does not know.
  """
  from parti.tasks import records

  prompts = geneval.read_layout(image_dir)
  for line, _ in prompts:
    geneval.check_shapes_classes(line, f"{image_dir}: prompt {line['prompt']!r}")
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  total = sum(len(samples) for _, samples in prompts)
  progress = metric_logging.Progress(max(total, 1), unit="images", every=max(1, total // 10))
  results, unreadable, empty = [], [], 0
  for line, samples in prompts:
    empty += not samples
    for path in samples:
      try:
        image = records.decode_image(records.read_image_file(path), min_side=1)
      except (OSError, records.BadRecord) as error:
        logging.warning("%s cannot be read (%s): skipped.", path, error)
        unreadable.append(str(path))
        continue
      correct, reason = geneval.evaluate_image(_square(image), line)
      results.append({
        "filename": str(path), "tag": line["tag"], "prompt": line["prompt"],
        "correct": correct, "reason": reason, "metadata": json.dumps(line),
      })  # fmt: skip
      progress.update(len(results) + len(unreadable), 1)
  if not results:
    raise ConfigError(f"{image_dir} holds no readable image to score.")
  summary = {
    **geneval.summarize(results),
    "unreadable_images": unreadable,
    "prompts_without_images": empty,
  }
  files.atomic_write_bytes(
    out / RESULTS_FILE, "".join(json.dumps(row) + "\n" for row in results).encode()
  )
  files.atomic_write_json(out / "summary.json", summary)
  text = geneval.format_summary(summary)
  if unreadable or empty:
    text += f"\n\nSkipped: {len(unreadable)} unreadable images, {empty} prompts without images."
  files.atomic_write_bytes(out / "summary.md", (text + "\n").encode())
  print(text)
  return summary


def _square(image: np.ndarray) -> np.ndarray:
  """The image center-cropped to a square, as the shapes detector reads images."""
  height, width = image.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  return image[top : top + side, left : left + side]


configured_evaluate_geneval = gin.external_configurable(evaluate_geneval)

if __name__ == "__main__":
  gin_utils.run(configured_evaluate_geneval)
