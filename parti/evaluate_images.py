"""FID and CLIP-style score of generated images against real ones (t5x-style job).

    python -m parti.evaluate_images --gin_file=gin/runs/evaluate_images.gin \
      --gin.GENERATED=runs/infer --gin.REFERENCE=task:coco_captions_256_images:val \
      --gin.INCEPTION_WEIGHTS=pt_inception_fid.npz --gin.OUTPUT_DIR=runs/eval_images

GENERATED is a `parti.infer` OUTPUT_DIR (each prompt's best image, and its prompt
for the CLIP score) or a folder of images. REFERENCE is a folder of images, a
`task:NAME[:SPLIT]` seqio task yielding `image` (needs TensorFlow), or an `.npz`
of feature statistics saved by an earlier run (pytorch-fid's format). FID is the
Fréchet distance between Inception-v3 pool features (`parti.evaluation.inception`, weights
from INCEPTION_WEIGHTS); with `reranker_dir` the mean CLIP-style score of each
image against its prompt is reported too. OUTPUT_DIR receives
`image_metrics.json`, `report.md`, and `reference_stats.npz` / `generated_stats.npz`
for reuse. An unreadable image is skipped with a warning that names it, and counted.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Iterator

import gin
import jax
import numpy as np
from absl import logging
from PIL import Image

from parti.evaluation import fid, inception
from parti.modeling import contrastive
from parti.runtime import files, gin_utils, metric_logging
from parti.runtime.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METRICS_JSON = "image_metrics.json"
REPORT = "report.md"
TASK_PREFIX = "task:"


def read_image(path: pathlib.Path) -> np.ndarray | None:
  """RGB float32 [H, W, 3] in [0, 1], or None (with a warning) if it cannot be decoded."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"), np.float32) / 255.0
  except (OSError, ValueError, Image.DecompressionBombError) as error:
    logging.warning("Skipping %s: not a readable image (%s).", path, error)
    return None


def _folder_images(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _generated(source: str, upsampled: bool = False) -> tuple[list[pathlib.Path], list[str] | None]:
  """The images to evaluate, and their prompts if `source` is an inference run (its
  upsampled images with `upsampled`)."""
  folder = pathlib.Path(source)
  if not folder.is_dir():
    raise ConfigError(f"Generated images folder {source} not found.")
  manifests = sorted(folder.glob("manifest-*.jsonl"))
  if not manifests:
    return _folder_images(folder), None
  from parti.sampling.manifests import finished_prompts

  entries = sorted(finished_prompts(folder).values(), key=lambda e: e["index"])
  key = "upsampled_files" if upsampled else "files"
  if upsampled and not all(e.get(key) for e in entries):
    raise ConfigError(
      f"{source} has images without an upsampled version: run parti.infer with "
      "UPSAMPLER_DIR, or evaluate the tokenizer-size images (upsampled=False)."
    )
  return [folder / e[key][0] for e in entries], [e["prompt"] for e in entries]


def _task_images(spec: str, limit: int | None) -> Iterator[np.ndarray]:
  """The `image` feature of a seqio task's split, float in [0, 1] (needs TensorFlow)."""
  import seqio

  import parti.tasks.registry  # noqa: F401  (registers the project's tasks)

  name, _, split = spec.partition(":")
  try:
    task = seqio.get_mixture_or_task(name)
  except ValueError as error:
    raise ConfigError(f"Unknown seqio task {name!r}: {error}") from error
  if "image" not in task.output_features:
    raise ConfigError(f"Task {name!r} has no 'image' feature to compare against.")
  dataset = task.get_dataset(
    sequence_length=None, split=split or "validation", shuffle=False, num_epochs=1
  )
  if limit:
    dataset = dataset.take(limit)
  for example in dataset.as_numpy_iterator():
    yield np.asarray(example["image"], np.float32)


def same_size_batches(images: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
  """Stacks consecutive images of one shape, up to `batch_size` at a time."""
  batch: list[np.ndarray] = []
  for image in images:
    if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
      yield np.stack(batch)
      batch = []
    batch.append(image)
  if batch:
    yield np.stack(batch)


def inception_features(weights, images: Iterable[np.ndarray], batch_size: int, total: int | None):
  """[N, 2048] pool features of `images`, with progress lines."""
  progress = metric_logging.Progress(max(total or 1, 1), unit="images", every=batch_size)
  features, done = [], 0
  for batch in same_size_batches(images, batch_size):
    features.append(np.asarray(jax.device_get(inception.pool_features(weights, batch))))
    done += len(batch)
    if total:
      progress.update(min(done, total), len(batch))
  if not features:
    return np.zeros((0, inception.FEATURE_DIM), np.float32)
  return np.concatenate(features)


def _statistics(features: np.ndarray, what: str) -> fid.FeatureStatistics:
  if len(features) < 2:
    raise ConfigError(f"FID needs at least 2 readable {what} images; found {len(features)}.")
  if len(features) < inception.FEATURE_DIM:
    logging.warning(
      "%d %s images for %d-d features: the covariance is rank-deficient and FID biased "
      "high; FID is usually reported over 10k-50k images.",
      len(features), what, inception.FEATURE_DIM,
    )  # fmt: skip
  return fid.FeatureStatistics.of(features)


def evaluate_images(
  *,
  generated: str,
  reference: str,
  output_dir: str,
  inception_weights: str,
  reranker_dir: str | None = None,
  vocabulary: str | None = None,
  batch_size: int = 32,
  max_reference_images: int | None = None,
  upsampled: bool = False,
) -> dict:
  """Computes FID (and the CLIP-style score); writes and returns the metrics.

  Args:
    generated: a `parti.infer` OUTPUT_DIR or a folder of images.
    reference: a folder of images, `task:NAME[:SPLIT]`, or a statistics `.npz`.
    output_dir: where the metrics, report and statistics go.
    inception_weights: pytorch-fid's Inception-v3 state dict as .npz (see parti/evaluation/inception.py).
    reranker_dir: a `parti.train_contrastive` run for the CLIP-style score (needs prompts,
      so `generated` must be an inference run).
    vocabulary: the reranker's SentencePiece model (default: the shapes one).
    batch_size: images per Inception forward pass.
    max_reference_images: read at most this many reference images (None: all).
    upsampled: evaluate an inference run's upsampled images (its super-resolution
      stage's output) instead of the tokenizer-size ones.
  """
  if batch_size < 1:
    raise ConfigError(f"batch_size must be positive, got {batch_size}.")
  try:
    weights = inception.load_inception(inception_weights)
  except (FileNotFoundError, ValueError) as error:
    raise ConfigError(str(error)) from error
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)

  paths, prompts = _generated(generated, upsampled)
  if reranker_dir and prompts is None:
    raise ConfigError(
      f"The CLIP-style score needs each image's prompt: {generated} is not a parti.infer "
      "output (no manifest-*.jsonl)."
    )
  readable = [(path, image) for path in paths if (image := read_image(path)) is not None]
  skipped = len(paths) - len(readable)
  logging.info("Generated: %d images (%d unreadable) in %s.", len(readable), skipped, generated)
  if len(readable) < 2:
    raise ConfigError(
      f"FID needs at least 2 readable generated images; {generated} has {len(readable)}."
    )
  features = inception_features(weights, (im for _, im in readable), batch_size, len(readable))
  generated_stats = _statistics(features, "generated")
  generated_stats.save(out / "generated_stats.npz")

  reference_skipped = 0
  if reference.endswith(".npz"):
    try:
      reference_stats = fid.FeatureStatistics.load(reference)
    except (FileNotFoundError, ValueError) as error:
      raise ConfigError(f"Reference statistics: {error}") from error
  else:
    if reference.startswith(TASK_PREFIX):
      images, total = _task_images(reference[len(TASK_PREFIX) :], max_reference_images), None
    else:
      folder = pathlib.Path(reference)
      if not folder.is_dir():
        raise ConfigError(
          f"Reference {reference} is neither a folder of images, a task:NAME[:SPLIT] nor an .npz."
        )
      reference_paths = _folder_images(folder)[:max_reference_images]
      decoded = (read_image(p) for p in reference_paths)
      images, total = (im for im in decoded if im is not None), len(reference_paths)
    reference_features = inception_features(weights, images, batch_size, total)
    if total is not None:
      reference_skipped = total - len(reference_features)
    reference_stats = _statistics(reference_features, "reference")
    reference_stats.save(out / "reference_stats.npz")

  metrics = {
    "fid": fid.frechet_distance(reference_stats, generated_stats),
    "generated_images": len(readable),
    "generated_unreadable": skipped,
    "reference_images": reference_stats.count,
    "reference_unreadable": reference_skipped,
    "generated": str(generated),
    "reference": str(reference),
  }
  if reranker_dir:
    metrics.update(_clip_score(readable, paths, prompts, reranker_dir, vocabulary, batch_size))
  files.atomic_write_json(out / METRICS_JSON, metrics)
  files.atomic_write_text(out / REPORT, _markdown(metrics))
  logging.info("Image metrics: %s", json.dumps(metrics))
  print(f"FID {metrics['fid']:.2f} over {len(readable)} generated images; report: {out / REPORT}")
  return metrics


def _clip_score(readable, paths, prompts, reranker_dir, vocabulary, batch_size) -> dict:
  from parti.sampling.rerank import Reranker

  reranker = Reranker.from_checkpoint(reranker_dir, vocabulary)
  prompt_of = dict(zip(paths, prompts, strict=True))
  texts = [prompt_of[path] for path, _ in readable]
  scores, done = [], 0
  for batch in same_size_batches((image for _, image in readable), batch_size):
    cosine = reranker.score(batch, texts[done : done + len(batch)])
    done += len(batch)
    scores.extend(np.asarray(contrastive.clip_score(cosine)).tolist())
  return {
    "clip_score": float(np.mean(scores)),
    "reranker": str(reranker_dir),
    "reranker_step": reranker.step,
  }


def _markdown(metrics: dict) -> str:
  lines = [
    "# Image metrics",
    "",
    "| metric | value |",
    "|---|---|",
    f"| FID (Inception-v3 pool3) | {metrics['fid']:.2f} |",
  ]
  if "clip_score" in metrics:
    lines.append(f"| CLIP-style score (100 · max(cos, 0)) | {metrics['clip_score']:.2f} |")
  lines += [
    f"| generated images | {metrics['generated_images']} ({metrics['generated_unreadable']} unreadable) |",
    f"| reference images | {metrics['reference_images']} ({metrics['reference_unreadable']} unreadable) |",
    "",
    f"Generated: `{metrics['generated']}`; reference: `{metrics['reference']}`.",
  ]
  return "\n".join(lines) + "\n"


configured_evaluate_images = gin.external_configurable(evaluate_images)

if __name__ == "__main__":
  gin_utils.run(configured_evaluate_images)
