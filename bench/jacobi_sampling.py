"""Speculative Jacobi decoding against the standard sampler, side by side in one run.

    python bench/jacobi_sampling.py [--windows=4,8,16] [--grids=16,32] [--batches=1,8]
    python bench/jacobi_sampling.py --checkpoint_dir=runs/palette/parti   # a trained model

For each image size, batch size and window: decoder calls per image (after the
prefill; the mean over the same --keys draws that every sampler is timed on), tokens
committed per call, image tokens per second and the wall-clock speed-up over
`decoding.sample` on the same prompts and draws, guidance 2.0 and top-k 64 (or
all codes when there are fewer), temperature 1. Without a checkpoint the model is
random: nothing in its images is predictable, so few drafts are kept (about 1.4
tokens per call), a worst case; the trained rows are the ones to believe. With
--checkpoint_dir the model and its grid come from a `parti.train` run, and its
validation captions (if it was trained on the palette task) are the prompts.
"""

from __future__ import annotations

import functools
import time

import jacobi_models
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from parti.modeling.config import PartiConfig
from parti.sampling import decoding, jacobi

_WINDOWS = flags.DEFINE_list("windows", ["4", "8", "16"], "Jacobi windows to measure.")
_GRIDS = flags.DEFINE_list("grids", ["16", "32"], "Image grids (side) of the random model.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_CHECKPOINT = flags.DEFINE_string("checkpoint_dir", None, "A trained parti.train run.")
_MIN_SECONDS = flags.DEFINE_float("min_seconds", 5.0, "Time each sampler at least this long.")
_KEYS = flags.DEFINE_integer("keys", 8, "Draws (keys) per timed round, the same for each sampler.")
_PROMPTS = flags.DEFINE_integer(
  "faithfulness_prompts", 512, "Palette validation captions scored per sampler (trained model)."
)

GUIDANCE, TOP_K = 2.0, 64


def _interleaved_seconds(samplers: dict, *args) -> tuple[dict, dict]:
  """Seconds per call of each sampler (the median round), and each one's last results.

  Every sampler is timed on the same `--keys` draws. A round calls each sampler once
  per key, one sampler after the other, so that the shared machine's drift (its speed
  moves by tens of percent within minutes) falls on all of them alike; rounds repeat
  until `--min_seconds` are timed per sampler. Two earlier ways overstated SJD: the
  best single call (a Jacobi call's work depends on its draws, so the fastest call
  is also the luckiest, with the fewest decoder calls), and each sampler timed in
  its own stretch of minutes.
  """
  keys = [jax.random.key(i + 1) for i in range(_KEYS.value)]
  for fn in samplers.values():
    jax.block_until_ready(fn(*args, jax.random.key(0)))  # Compile.
  seconds = {name: [] for name in samplers}
  results = {}
  while min(len(times) for times in seconds.values()) < 3 or (
    min(sum(times) for times in seconds.values()) * len(keys) < _MIN_SECONDS.value
  ):
    for name, fn in samplers.items():
      start = time.perf_counter()
      results[name] = [jax.block_until_ready(fn(*args, key)) for key in keys]
      seconds[name].append((time.perf_counter() - start) / len(keys))
  return {name: float(np.median(times)) for name, times in seconds.items()}, results


def compare(config: PartiConfig, params, text, label: str) -> None:
  """Prints the standard sampler's row and one row per window, all on the same prompts."""
  batch, tokens = text.shape[0], config.image_length
  top_k = TOP_K if config.image_vocab_size > TOP_K else 0
  options = dict(guidance_scale=GUIDANCE, top_k=top_k)
  samplers = {"standard": jax.jit(functools.partial(decoding.sample, config, **options))}
  for window in map(int, _WINDOWS.value):
    samplers[f"window {window}"] = jax.jit(
      functools.partial(jacobi.sample, config, window=window, **options)
    )
  seconds, results = _interleaved_seconds(samplers, params, text)
  for name in samplers:
    # Calls vary with the draws: the mean over the keys.
    calls = tokens - 1 if name == "standard" else np.mean([int(r[2]) for r in results[name]])
    print(
      f"| {label} | {tokens} | {batch} | {name} | {calls:.0f} | {(tokens - 1) / calls:.2f} | "
      f"{batch * tokens / seconds[name]:.0f} | {seconds['standard'] / seconds[name]:.2f}x |",
      flush=True,
    )


def faithfulness(config: PartiConfig, params, batch: int = 64) -> None:
  """The palette metrics of each sampler's images of the same validation captions."""
  from parti.tasks import palette

  grid = config.image_grid[0]
  count = _PROMPTS.value
  targets = [palette.example("validation", i, grid)["targets"] for i in range(count)]
  text = _prompts(config, count)
  top_k = TOP_K if config.image_vocab_size > TOP_K else 0
  samplers = {"standard": functools.partial(decoding.sample, config)}
  for window in map(int, _WINDOWS.value):
    samplers[f"window {window}"] = functools.partial(jacobi.sample, config, window=window)
  print(f"\nFaithfulness, {count} validation captions, guidance {GUIDANCE}:")
  print("| sampler | cell accuracy | object-cell accuracy | 95% interval of the object cells |")
  print("|---|---|---|---|")
  for name, sampler in samplers.items():
    run = jax.jit(functools.partial(sampler, guidance_scale=GUIDANCE, top_k=top_k))
    images = []
    for start in range(0, count, batch):
      keys = jax.random.split(jax.random.key(start), min(batch, count - start))
      images.append(np.asarray(run(params, text[start : start + batch], keys)[0]))
    predictions = np.concatenate(images)
    metrics = palette.palette_metrics(targets, predictions)
    # Per-image object-cell accuracy, for an interval over images (cells of one image
    # are not independent).
    per_image = [
      100 * np.mean((p == t)[t < len(palette.spec.COLORS)])
      for p, t in zip(predictions, targets, strict=True)
      if (t < len(palette.spec.COLORS)).any()
    ]
    half = 1.96 * np.std(per_image) / np.sqrt(len(per_image))
    print(
      f"| {name} | {metrics['cell_accuracy']:.1f}% | {metrics['object_cell_accuracy']:.1f}% | "
      f"±{half:.1f} |",
      flush=True,
    )


def _prompts(config: PartiConfig, batch: int) -> jax.Array:
  """The palette task's validation captions, tokenized (the shapes vocabulary)."""
  from parti.sampling.prompts import PromptEncoder
  from parti.tasks import palette

  encoder = PromptEncoder(config.text_length, None)
  captions = [palette.example("validation", i, 8)["caption"] for i in range(batch)]
  return jnp.asarray(np.stack([encoder.encode(c) for c in captions]), jnp.int32)


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; float32")
  print(
    "| model | tokens | batch | sampler | decoder calls per image | tokens per call | "
    "image tokens/s | speed-up |"
  )
  print("|---|---|---|---|---|---|---|---|")
  if _CHECKPOINT.value:
    config, params, step = jacobi_models.trained_model(_CHECKPOINT.value)
    for batch in map(int, _BATCHES.value):
      compare(config, params, _prompts(config, batch), f"trained, step {step}")
    faithfulness(config, params)
    return
  for grid in map(int, _GRIDS.value):
    config, params = jacobi_models.random_model(grid)
    rng = np.random.default_rng(0)
    for batch in map(int, _BATCHES.value):
      text = jnp.asarray(rng.integers(2, 128, (batch, config.text_length)), jnp.int32)
      compare(config, params, text, "random")


if __name__ == "__main__":
  app.run(main)
