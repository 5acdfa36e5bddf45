"""What the tokenizer benches share: held-out shapes scenes and how many survive a
reconstruction.

A scene "survives" when the shapes evaluator, which scores it correct on the ground
truth image, still scores every attribute correct on the reconstruction.
"""

import numpy as np
import tensorflow_datasets as tfds

from parti.tasks.shapes import evaluate, scenes


def read_split(shapes: tfds.core.DatasetBuilder, split: str, count: int) -> list[dict]:
  """The first `count` examples of `split`, in file order, as numpy dicts."""
  return list(tfds.as_numpy(shapes.as_dataset(split=split, shuffle_files=False).take(count)))


def images_of(examples: list[dict]) -> np.ndarray:
  """float32 [N, S, S, 3] in [0, 1]."""
  return np.stack([e["image"] for e in examples]).astype(np.float32) / 255


def scored_scenes(examples: list[dict]) -> list[tuple[int, object]]:
  """(index, scene) of the examples the evaluator scores correct on the ground truth."""
  truth = [(i, scenes.from_example(e)) for i, e in enumerate(examples)]
  return [(i, s) for i, s in truth if evaluate.score(examples[i]["image"], s)["all"]]


def rebuilt_scores(truth: list[tuple[int, object]], recon: np.ndarray) -> list[tuple[str, dict]]:
  """(kind, scores) of each scored scene on its reconstruction (float [N, S, S, 3])."""
  pixels = (np.clip(recon, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
  return [(scene.kind, evaluate.score(pixels[i], scene)) for i, scene in truth]


def kept(rebuilt: list[tuple[str, dict]]) -> float:
  """The share of scenes with every attribute right."""
  return float(np.mean([scores["all"] for _, scores in rebuilt])) if rebuilt else float("nan")
