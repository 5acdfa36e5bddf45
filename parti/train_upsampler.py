"""Trains the super-resolution stage: a WDSR upsampler from the tokenizer's image size to
2x or 4x it (Parti's 256 -> 1024), on any image task.

    python -m parti.train_upsampler --gin_file=gin/upsampler/shapes_64_256.gin \
      --gin.MODEL_DIR=runs/upsampler --gin.TFDS_DATA_DIR=runs/tfds

Training pairs: a task with `image_low` (the shapes' `parti_shapes_256_from_64_pairs`,
each scene rendered at both sizes) gives exact pairs; any other image task's images
are downscaled, antialiased, to the input size (and first to the output size when they
are larger). Steps train on aligned random crops (`crop_size` input pixels; the
network is convolutional, so whole images run at inference); evaluation upsamples
whole held-out images and logs the PSNR of the upsampler, of bicubic interpolation
and their gap.

MODEL_DIR receives upsampler_config.json (what `Upsampler.from_checkpoint` and
`parti.infer`'s UPSAMPLER_DIR read), checkpoints/, metrics.jsonl and TensorBoard
summaries, images/ (low | bicubic | upsampled | high) and the operative config.gin.
A rerun resumes from the latest checkpoint; SIGTERM saves one and exits with status 75.
"""

from __future__ import annotations

import pathlib

import gin
import jax
import numpy as np
import optax
from absl import logging

from parti import partitioning
from parti.runtime import gin_utils
from parti.runtime.errors import ConfigError
from parti.tokenizer import vgg
from parti.training import gan, loop, optim
from parti.upsampling import checkpoint_io, model
from parti.upsampling import trainer as trainer_lib
from parti.upsampling.config import PRESETS, UpsamplerConfig
from parti.upsampling.trainer import UpsamplerLossWeights


def train(
  *,
  model_dir: str,
  config: UpsamplerConfig,
  task: str,
  batch_size: int,
  num_steps: int,
  crop_size: int = 0,
  loss_weights: UpsamplerLossWeights = UpsamplerLossWeights(),
  optimizer: optim.AdamConfig = optim.AdamConfig(),
  disc_optimizer: optim.AdamConfig = optim.AdamConfig(),
  disc_channels: int = 32,
  mesh: partitioning.MeshConfig = partitioning.MeshConfig(),
  train_split: str = "train",
  eval_split: str = "validation",
  eval_every: int = 1000,
  eval_batches: int = 4,
  log_every: int = 50,
  checkpoint_every: int = 1000,
  keep_checkpoints: int = 3,
  vgg_weights: str | None = None,
  tfds_data_dir: str | None = None,
  seed: int = 0,
) -> dict[str, float]:
  """Trains an upsampler; returns the final evaluation (PSNR against bicubic's).

  Args:
    model_dir: where checkpoints, metrics, images and the config go.
    config: the architecture (a `PRESETS` entry, or fields set by gin).
    task: a seqio task yielding `image` (float32 [S, S, 3] in [0, 1], S at least the
      output size) and optionally `image_low` (exactly the input size).
    batch_size: global batch size.
    num_steps: total training steps.
    crop_size: side of the input crops trained on, in input pixels (0: whole images).
    loss_weights: weights of the L1, perceptual and adversarial terms.
    optimizer: the upsampler's Adam.
    disc_optimizer: the discriminator's Adam (with loss_weights.adversarial > 0).
    disc_channels: the discriminator's base width.
    mesh: the device mesh (the batch is split over its data axes).
    train_split: split to train on.
    eval_split: held-out split for the PSNR.
    eval_every: steps between evaluations.
    eval_batches: batches per evaluation.
    log_every: steps between metric lines.
    checkpoint_every: steps between checkpoints.
    keep_checkpoints: checkpoints kept.
    vgg_weights: VGG16 .npz for the perceptual loss (see parti/tokenizer/vgg.py).
    tfds_data_dir: where TFDS datasets are prepared (default: TFDS's).
    seed: the seed of initialization, data order and crops.
  """
  import seqio

  from parti.tasks import input_pipeline, registry  # noqa: F401  (registers the tasks)

  crop = crop_size or config.input_size
  if not 0 <= crop_size <= config.input_size:
    raise ConfigError(f"crop_size {crop_size} must lie in [0, input_size={config.input_size}].")
  model_dir = pathlib.Path(model_dir)
  schedule = loop.Schedule(num_steps, log_every, eval_every, checkpoint_every)
  device_mesh, rules = loop.start_mesh(mesh, batch_size, tfds_data_dir)
  perceptual = None
  if loss_weights.perceptual > 0:
    if not vgg_weights:
      raise ConfigError(
        "loss_weights.perceptual > 0 needs train_upsampler.vgg_weights, a VGG16 .npz "
        "(see parti/tokenizer/vgg.py); set the weight to 0 to train without it."
      )
    perceptual = partitioning.replicate(vgg.load_vgg16(vgg_weights), device_mesh)
  # Without the adversarial term the discriminator is never updated: no schedule to check.
  disc_adam = optim.adam(disc_optimizer, num_steps) if loss_weights.adversarial > 0 else None
  trainer = trainer_lib.Trainer(
    config, loss_weights, optim.adam(optimizer, num_steps), disc_adam or optax.identity(),
    disc_channels,
  )  # fmt: skip
  state, state_shardings = partitioning.init_sharded(
    lambda: trainer.init(jax.random.key(seed), crop), device_mesh, rules
  )
  features = seqio.get_mixture_or_task(task).output_features
  if "image" not in features:
    raise ConfigError(f"Task {task!r} yields no `image` feature (it has {sorted(features)}).")

  dataset = input_pipeline.split_reader(
    task,
    # seqio trims features to these lengths along their first axis; images keep theirs.
    task_feature_lengths={name: 1 << 16 for name in features if name.startswith("image")},
    feature_converter=seqio.PassThroughFeatureConverter(),
    global_batch_size=batch_size,
    seed=seed,
  )

  resumed = loop.resume(
    model_dir, state, state_shardings, dataset(train_split, None), keep=keep_checkpoints,
    save_every=checkpoint_every, config=config, config_file=checkpoint_io.CONFIG_FILE,
  )  # fmt: skip
  images = partitioning.logical_sharding(device_mesh, ("batch", None, None, None), rules)
  replicated = jax.sharding.NamedSharding(device_mesh, jax.sharding.PartitionSpec())
  make_pairs = PairMaker(config, task)
  step_counter = iter(range(resumed.start, num_steps + 1))

  def next_batch():
    low, high = make_pairs(next(resumed.iterator))
    low, high = random_crops(low, high, crop, config.scale, seed, next(step_counter))
    return tuple(jax.make_array_from_process_local_data(images, x) for x in (low, high))

  evaluate_batch = jax.jit(trainer.eval_step, out_shardings=replicated)

  def evaluate(step: int, state, writer) -> dict[str, float]:
    ours, bicubic, shown = [], [], None
    for batch in dataset(eval_split, 1).take(eval_batches).as_numpy_iterator():
      if batch["image"].shape[0] * jax.process_count() != batch_size:
        continue  # A last, partial batch would need another compilation.
      low, high = make_pairs(batch)
      with partitioning.activate(device_mesh, rules):
        upsampled, psnr, psnr_bicubic = evaluate_batch(
          state.params, *(jax.make_array_from_process_local_data(images, x) for x in (low, high))
        )
      ours.append(float(psnr))
      bicubic.append(float(psnr_bicubic))
      if shown is None:
        shown = comparison_grid(low, np.asarray(upsampled), high, config.scale)
    if not ours:
      raise ConfigError(
        f"The {eval_split!r} split has fewer than {batch_size} examples to evaluate."
      )
    writer.images(step, {"eval/low_bicubic_upsampled_high": shown})
    return {
      "eval/psnr": float(np.mean(ours)),
      "eval/psnr_bicubic": float(np.mean(bicubic)),
      "eval/psnr_gain_over_bicubic": float(np.mean(ours) - np.mean(bicubic)),
    }

  gan_start = loss_weights.adversarial_start_step if loss_weights.adversarial > 0 else None
  hooks = loop.Hooks(
    step=gan.gan_schedule_step(
      trainer.train_step, gan_start, state_shardings, (images, images), replicated, perceptual
    ),
    next_batch=next_batch,
    loss_key="loss/total",
    metric_prefix="",
    evaluate=evaluate,
  )
  return loop.run(
    hooks, resumed, schedule=schedule, mesh=device_mesh, rules=rules, model_dir=model_dir,
    examples_per_step=batch_size,
  )  # fmt: skip


class PairMaker:
  """A task's batch -> (low, high) float32 numpy pairs at the config's two sizes.

  Raises:
    ConfigError: the task's images are smaller than the output size, or its
      `image_low` is not the input size (or beside an `image` not the output size).
  """

  def __init__(self, config: UpsamplerConfig, task: str):
    self.config, self.task = config, task
    self._downscale = jax.jit(trainer_lib.downscale, static_argnums=1)

  def __call__(self, batch) -> tuple[np.ndarray, np.ndarray]:
    cfg = self.config
    high = np.asarray(batch["image"], np.float32)
    side = high.shape[1]
    if side < cfg.output_size:
      raise ConfigError(
        f"Task {self.task!r} yields {side}x{side} images, smaller than the upsampler's output "
        f"size {cfg.output_size}: it cannot teach {cfg.input_size} -> {cfg.output_size}. Use "
        "a task of larger images, or a smaller config."
      )
    if "image_low" in batch:
      low = np.asarray(batch["image_low"], np.float32)
      if low.shape[1] != cfg.input_size or side != cfg.output_size:
        raise ConfigError(
          f"Task {self.task!r} pairs {low.shape[1]} px with {side} px images; the upsampler "
          f"maps {cfg.input_size} -> {cfg.output_size}."
        )
      return low, high
    if side > cfg.output_size:
      high = np.asarray(self._downscale(high, cfg.output_size))
    return np.asarray(self._downscale(high, cfg.input_size)), high


def random_crops(low, high, crop: int, scale: int, seed: int, step: int, candidates: int = 8):
  """Aligned crops of `crop` input pixels (and crop * scale output pixels) per image, at
  places drawn from (seed, step, host): a resumed run crops as the first run did.

  Of `candidates` random places, each image keeps the one whose input crop varies
  most: a crop of flat background teaches nothing bicubic does not already do right,
  and under L1 its many exactly-right pixels hold the output at bicubic's.
  """
  if crop == low.shape[1]:
    return low, high
  rng = np.random.default_rng([seed, step, jax.process_index()])
  corners = rng.integers(0, low.shape[1] - crop + 1, size=(low.shape[0], candidates, 2))
  lows, highs = [], []
  for image_low, image_high, places in zip(low, high, corners, strict=True):
    spread = [image_low[i : i + crop, j : j + crop].std(axis=(0, 1)).sum() for i, j in places]
    i, j = places[int(np.argmax(spread))]
    lows.append(image_low[i : i + crop, j : j + crop])
    highs.append(image_high[i * scale : (i + crop) * scale, j * scale : (j + crop) * scale])
  return np.stack(lows), np.stack(highs)


def comparison_grid(low, upsampled, high, scale: int, count: int = 4) -> np.ndarray:
  """Rows of [low (nearest) | bicubic | upsampled | high] for the first `count` images."""
  low = low[:count]
  nearest = low.repeat(scale, axis=1).repeat(scale, axis=2)
  bicubic = np.clip(np.asarray(model.bicubic(low, scale)), 0, 1)
  rows = [np.concatenate(parts, axis=1) for parts in zip(nearest, bicubic, upsampled[:count],
                                                        high[:count], strict=True)]  # fmt: skip
  return np.concatenate(rows, axis=0)


configured_train = gin.external_configurable(train, name="train_upsampler")
gin.external_configurable(UpsamplerConfig, module="upsampler")
gin.external_configurable(UpsamplerLossWeights, module="upsampler")


@gin.configurable(module="upsampler")
def preset(name: str) -> UpsamplerConfig:
  """A named config of `PRESETS` (gin: `train_upsampler.config = @upsampler.preset()`)."""
  if name not in PRESETS:
    raise ConfigError(f"Unknown upsampler preset {name!r}; known: {sorted(PRESETS)}.")
  logging.info("Upsampler preset %s: %s", name, PRESETS[name])
  return PRESETS[name]


if __name__ == "__main__":
  gin_utils.run(configured_train)
