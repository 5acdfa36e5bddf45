"""Scores a Parti run on the shapes dataset's prompts, over a sweep of guidance scales.

    python -m parti.evaluate_shapes --gin_file=gin/runs/evaluate_shapes.gin \
      --gin.CHECKPOINT_DIR=runs/parti --gin.TOKENIZER_DIR=runs/tokenizer --gin.OUTPUT_DIR=runs/eval

For each guidance scale λ and each split (test, and compositional: the held-out
color-shape pairs), it generates one image per prompt and asks the shapes
evaluator (`parti.tasks.shapes.evaluate`) whether the image shows what the
prompt says: count, color, shape, size, position, relations and background, by
prompt kind. The prompts are the dataset's own, regenerated from (seed, split,
index), so no prepared dataset or TensorFlow is needed. With `reranker_dir`, the
contrastive model's CLIP-style score (100 * max(cosine, 0), averaged) is reported
beside the accuracy. OUTPUT_DIR receives
`shapes_eval.json`, `report.md` (tables per λ and split), `accuracy_vs_guidance.png`
and a contact sheet of samples per λ and split. With `learning_curve_examples`, every
checkpoint the run kept is scored too (at `learning_curve_scale`), against the training
time it had reached: `learning_curve.png` and a table in the report.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import gin
import jax
import numpy as np
from absl import logging

from parti import partitioning
from parti.evaluation import contact_sheet, shapes_report
from parti.modeling import checkpoint_io, contrastive
from parti.runtime import files, gin_utils, metric_logging
from parti.runtime import images as images_io
from parti.runtime.errors import ConfigError
from parti.sampling import generation
from parti.sampling.prompts import Prompt, PromptEncoder
from parti.tasks.shapes import evaluate, scenes, spec


def evaluate_shapes(
  *,
  checkpoint_dir: str,
  tokenizer_dir: str,
  output_dir: str,
  guidance_scales: Sequence[float] = (1.0, 1.2, 2.0, 3.0),
  splits: Sequence[str] = ("test", "compositional"),
  examples: int = 64,
  dataset_seed: int = 0,
  temperature: float = 1.0,
  top_k: int = 0,
  plausibility: float = 0.0,
  seed: int = 0,
  batch_size: int = 8,
  vocabulary: str | None = None,
  mesh: partitioning.MeshConfig = partitioning.MeshConfig(),
  reranker_dir: str | None = None,
  learning_curve_examples: int = 0,
  learning_curve_scale: float = 1.0,
  jacobi_window: int = 0,
) -> dict:
  """Returns {λ: {split: kind -> attribute -> accuracy}} and writes the report.

  Args:
    checkpoint_dir: a `parti.train` MODEL_DIR trained on the shapes.
    tokenizer_dir: the tokenizer whose codes it writes.
    output_dir: where the report goes.
    guidance_scales: the λ sweep.
    splits: shapes splits whose prompts are generated for.
    examples: prompts per split (the first ones of the split).
    dataset_seed: the seed the shapes dataset was made with (parti_shapes uses 0).
    temperature: sampling temperature (0: greedy).
    top_k: sample among the k likeliest codes (0: all).
    plausibility: the sampler's plausibility constraint (see SamplingOptions).
    seed: the sampling seed.
    batch_size: prompts per step over all hosts.
    vocabulary: the SentencePiece model of the run (default: the shapes one).
    mesh: device mesh and logical-axis rules.
    reranker_dir: a `parti.train_contrastive` run whose CLIP-style score is also reported.
    learning_curve_examples: prompts per split to score each kept checkpoint on
      (0: no learning curve).
    learning_curve_scale: the guidance scale of the learning curve.
    jacobi_window: sample with speculative Jacobi decoding, this many draft tokens per
      decoder call (0: the standard sampler); see SamplingOptions.
  """
  unknown = [s for s in splits if s not in spec.SPLITS]
  if unknown or examples < 1 or not guidance_scales or learning_curve_examples < 0:
    raise ConfigError(
      f"Evaluate known splits {spec.SPLITS} with examples >= 1, at least one guidance "
      f"scale and learning_curve_examples >= 0; got splits {list(splits)}, examples "
      f"{examples}, scales {list(guidance_scales)}, learning_curve_examples "
      f"{learning_curve_examples}."
    )
  device_mesh = partitioning.create_mesh(mesh)
  rules = partitioning.rules_for(mesh)
  partitioning.check_batch_size(batch_size, device_mesh)
  config, params, shardings, step = checkpoint_io.load_params(checkpoint_dir, device_mesh, rules)
  tok_config, tok_params, _ = generation.load_tokenizer(tokenizer_dir, config, device_mesh)
  encoder = PromptEncoder(config.text_length, vocabulary)
  reranker = None
  if reranker_dir:
    from parti.sampling.rerank import Reranker

    reranker = Reranker.from_checkpoint(reranker_dir, vocabulary)
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  by_split = {s: [scenes.make_scene(dataset_seed, s, i) for i in range(examples)] for s in splits}

  results: dict[str, dict[str, dict]] = {}
  clip_scores: dict[str, dict[str, float]] = {}
  progress = metric_logging.Progress(len(guidance_scales) * len(splits), unit="images", every=1)
  sampling = generation.SamplingOptions(
    temperature=temperature, top_k=top_k, plausibility=plausibility, seed=seed,
    jacobi_window=jacobi_window,
  )  # fmt: skip
  for number, scale in enumerate(guidance_scales):
    options = dataclasses.replace(sampling, guidance_scale=float(scale))
    generate = generation.make_generator(config, tok_config, options, device_mesh, rules, shardings)
    results[str(scale)] = {}
    for offset, (split, split_scenes) in enumerate(by_split.items()):
      images = _generate(generate, params, tok_params, split_scenes, encoder, options, batch_size)
      scored = [
        (s.kind, evaluate.score(image, s)) for s, image in zip(split_scenes, images, strict=True)
      ]
      results[str(scale)][split] = evaluate.aggregate(scored)
      if reranker:
        cosine = reranker.score(np.stack(images) / 255.0, [s.caption for s in split_scenes])
        clip = float(np.mean(contrastive.clip_score(cosine)))
        clip_scores.setdefault(str(scale), {})[split] = clip
        logging.info("λ=%s, %s: CLIP score %.2f", scale, split, clip)
      logging.info("λ=%s, %s:\n%s", scale, split, evaluate.format_table(results[str(scale)][split]))
      if jax.process_index() == 0:
        sheet = contact_sheet.contact_sheet(
          list(images[:8]), [s.caption for s in split_scenes[:8]], columns=4, cell=128
        )
        files.atomic_write_bytes(out / f"samples_{split}_guidance_{scale}.png", sheet)
      progress.update(number * len(splits) + offset + 1, len(split_scenes))
  curve = []
  if learning_curve_examples:
    curve = _learning_curve(
      checkpoint_dir, (config, tok_config, tok_params), device_mesh, rules, encoder,
      {s: v[:learning_curve_examples] for s, v in by_split.items()},
      dataclasses.replace(sampling, guidance_scale=float(learning_curve_scale)),
      batch_size,
    )  # fmt: skip
  if jax.process_index() == 0:
    knobs = {k: getattr(sampling, k) for k in ("temperature", "top_k", "plausibility")}
    record = {"checkpoint": checkpoint_dir, "step": step, "sampling": knobs, "results": results}
    if curve:
      record["learning_curve"] = {"guidance_scale": learning_curve_scale, "points": curve}
      files.atomic_write_bytes(out / shapes_report.CURVE_PLOT, shapes_report.curve_plot(curve))
    if reranker:
      record.update(reranker=reranker_dir, reranker_step=reranker.step, clip_scores=clip_scores)
    files.atomic_write_json(out / shapes_report.REPORT_JSON, record)
    report = shapes_report.markdown(results, checkpoint_dir, step, clip_scores, knobs)
    if curve:
      report += shapes_report.curve_markdown(curve, learning_curve_scale)
    files.atomic_write_text(out / shapes_report.REPORT, report)
    files.atomic_write_bytes(out / shapes_report.PLOT, shapes_report.guidance_plot(results))
    gin_utils.write_operative_config(out)
  return results


def _generate(generate, params, tok_params, split_scenes, encoder, options, batch_size):
  """uint8 images [len(split_scenes), S, S, 3], every host's slices gathered on every host."""
  from jax.experimental import multihost_utils

  prompts = [(i, Prompt(s.caption)) for i, s in enumerate(split_scenes)]
  per_host = batch_size // jax.process_count()
  images = []
  for start in range(0, len(prompts), batch_size):
    batch = prompts[start : start + batch_size]
    mine = batch[jax.process_index() * per_host : (jax.process_index() + 1) * per_host]
    host_images, _ = generate(
      params, tok_params, *generation.host_inputs(mine or batch[-1:], per_host, encoder, options)
    )
    pixels = images_io.to_uint8(host_images[:, 0])
    gathered = np.asarray(multihost_utils.process_allgather(pixels, tiled=True))
    images.extend(gathered[: len(batch)])  # Host order is batch order; padding comes last.
  return images


def _learning_curve(
  checkpoint_dir, model, mesh, rules, encoder, by_split, options, batch_size
) -> list[dict]:
  """Each kept checkpoint's all-attributes accuracy per split, with its training time.

  The time is the run's `perf/train_seconds` logged at that step (its training
  loops' wall time, summed over resumes).
  """
  config, tok_config, tok_params = model
  folder = pathlib.Path(checkpoint_dir) / "checkpoints"
  steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
  logged = metric_logging.read_metrics(checkpoint_dir)
  curve = []
  generate = None  # One sampler for every checkpoint: they share shapes and shardings.
  for step in steps:
    _, params, shardings, _ = checkpoint_io.load_params(checkpoint_dir, mesh, rules, step)
    if generate is None:
      generate = generation.make_generator(config, tok_config, options, mesh, rules, shardings)
    accuracy = {}
    for split, split_scenes in by_split.items():
      images = _generate(generate, params, tok_params, split_scenes, encoder, options, batch_size)
      scores = [
        evaluate.score(image, s)["all"] for s, image in zip(split_scenes, images, strict=True)
      ]
      accuracy[split] = float(np.mean(scores))
    seconds = logged.get(step, {}).get("perf/train_seconds")  # None in runs from before.
    logging.info("Learning curve: step %d (%s s of training): %s", step, seconds, accuracy)
    curve.append({"step": step, "train_seconds": seconds, "all": accuracy, "prompts": {
      split: len(v) for split, v in by_split.items()
    }})  # fmt: skip
  return curve


configured_evaluate_shapes = gin.external_configurable(evaluate_shapes)

if __name__ == "__main__":
  gin_utils.run(configured_evaluate_shapes)
