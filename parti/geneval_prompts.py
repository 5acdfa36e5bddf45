"""Writes the shapes benchmark's prompts as a GenEval `evaluation_metadata.jsonl`.

    python -m parti.geneval_prompts --gin_file=gin/geneval/prompts_shapes.gin \
      --gin.OUTPUT_FILE=runs/geneval/evaluation_metadata.jsonl

The prompts are the shapes splits' own, regenerated from (seed, split, index) as
`parti.evaluate_shapes` does, each in GenEval's schema (see `parti.evaluation.geneval`
for how the shapes kinds map onto GenEval's tasks). Give the file to `parti.infer` as
PROMPTS: it writes GenEval's folders, which `parti.evaluate_geneval` (or GenEval's own
scorer, for its own classes) scores.
"""

from __future__ import annotations

import collections
import json
import pathlib
from collections.abc import Sequence

import gin
from absl import logging

from parti.evaluation import geneval
from parti.runtime import files, gin_utils
from parti.runtime.errors import ConfigError
from parti.tasks.shapes import scenes, spec


def write_geneval_prompts(
  *, output_file: str, splits: Sequence[str] = ("test",), examples: int = 300, dataset_seed: int = 0
) -> dict[str, int]:
  """Writes the first `examples` prompts of each split; returns the count per GenEval task.

  Raises:
    ConfigError: an unknown split, or examples < 1.
  """
  unknown = [s for s in splits if s not in spec.SPLITS]
  if unknown or examples < 1:
    raise ConfigError(
      f"Write prompts of known splits {spec.SPLITS} with examples >= 1; got {list(splits)}, "
      f"{examples}."
    )
  lines = [
    geneval.metadata_for_scene(scenes.make_scene(dataset_seed, split, index))
    for split in splits
    for index in range(examples)
  ]
  path = pathlib.Path(output_file)
  path.parent.mkdir(parents=True, exist_ok=True)
  files.atomic_write_bytes(path, "".join(json.dumps(line) + "\n" for line in lines).encode())
  counts = dict(collections.Counter(line["tag"] for line in lines))
  logging.info("Wrote %d GenEval prompts to %s: %s", len(lines), path, counts)
  print(f"{len(lines)} prompts in {path}: {counts}")
  return counts


configured_write_geneval_prompts = gin.external_configurable(write_geneval_prompts)

if __name__ == "__main__":
  gin_utils.run(configured_write_geneval_prompts)
