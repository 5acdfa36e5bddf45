"""Trains the ViT-VQGAN tokenizer (generator and discriminator together).

    python -m parti.tokenizer.train --gin_file=gin/tokenizer/tiny.gin --gin.MODEL_DIR=runs/tokenizer

MODEL_DIR receives tokenizer_config.json (what `ImageTokenizer.from_checkpoint`
reads), checkpoints/, metrics.jsonl and TensorBoard summaries (losses, PSNR,
codebook usage and perplexity), images/ (inputs beside reconstructions) and the
operative config.gin. A rerun resumes from the latest checkpoint; SIGTERM saves
one and exits with status 75. Stage two (Parti) starts from a trained tokenizer with
`init_from` and `freeze=("encoder", "quantizer")` and trains a larger decoder.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from parti import partitioning
from parti.runtime import gin_utils
from parti.runtime.errors import ConfigError
from parti.tokenizer import checkpoint_io, losses, vgg
from parti.tokenizer import trainer as trainer_lib
from parti.tokenizer.config import TokenizerConfig
from parti.training import gan, loop, optim

CONFIG_FILE = checkpoint_io.CONFIG_FILE


def _image_grid(images: np.ndarray, reconstructions: np.ndarray, count: int = 8) -> np.ndarray:
  """Rows of [input | reconstruction] for the first `count` examples."""
  rows = [
    np.concatenate([a, b], axis=1)
    for a, b in zip(images[:count], reconstructions[:count], strict=True)
  ]
  return np.concatenate(rows, axis=0)


def train(
  *,
  model_dir: str,
  config: TokenizerConfig,
  task: str,
  batch_size: int,
  num_steps: int,
  loss_weights: losses.LossWeights = losses.LossWeights(),
  optimizer: optim.AdamConfig = optim.AdamConfig(),
  disc_optimizer: optim.AdamConfig = optim.AdamConfig(),
  disc_channels: int = 64,
  mesh: partitioning.MeshConfig = partitioning.MeshConfig(),
  train_split: str = "train",
  eval_split: str = "validation",
  eval_every: int = 1000,
  eval_batches: int = 8,
  log_every: int = 50,
  checkpoint_every: int = 1000,
  keep_checkpoints: int = 3,
  vgg_weights: str | None = None,
  dead_code_restart_every: int = 0,
  dead_code_restart_until: int | None = None,
  init_from: str | None = None,
  freeze: Sequence[str] = (),
  group_views: Sequence[str] = (),
  tfds_data_dir: str | None = None,
  seed: int = 0,
) -> dict[str, float]:
  """Trains a tokenizer; returns the final evaluation (PSNR, codebook usage, perplexity).

  Args:
    model_dir: where checkpoints, metrics, images and the config go.
    config: the architecture.
    task: a seqio task yielding `image` (float32 [S, S, 3] in [0, 1]), e.g.
      "parti_shapes_64_10k_images".
    batch_size: global batch size.
    num_steps: total training steps.
    loss_weights: weights of each loss term, and when the GAN starts.
    optimizer: the generator's Adam.
    disc_optimizer: the discriminator's Adam.
    disc_channels: the discriminator's base width.
    mesh: the device mesh (the batch is split over its data axes).
    train_split: split to train on.
    eval_split: held-out split for PSNR and usage.
    eval_every: steps between evaluations.
    eval_batches: batches per evaluation.
    log_every: steps between metric lines.
    checkpoint_every: steps between checkpoints.
    keep_checkpoints: checkpoints kept.
    vgg_weights: VGG16 .npz for the perceptual loss (see tokenizer/vgg.py); None: off.
    dead_code_restart_every: restart codes unused for this many steps (0: never).
    dead_code_restart_until: the last step that may restart codes (None: the last
      step). A restarted code takes over the encoder outputs it lands on, and the
      decoder then has to learn to draw it; stopping earlier leaves it the steps.
    init_from: a tokenizer MODEL_DIR whose parameters start this run (stage two).
    freeze: top-level parameter groups not to train ("encoder", "quantizer", "decoder").
    group_views: empty, or per codebook group the task feature holding a view of each
      image that changes only what that group should code ("" for none): every other
      group is trained to code the view as it codes the image
      (`LossWeights.view_invariance`; `parti.tokenizer.trainer`). The palette tokenizer
      on the shapes: ("image_recolored", "image_reshaped") of a `_views` task.
    tfds_data_dir: where TFDS datasets are prepared (default: TFDS's).
    seed: the seed of initialization, data order and dead-code restarts.

  Returns:
    The final evaluation metrics.
  """
  import seqio

  from parti.tasks import input_pipeline, registry  # noqa: F401  (registers the tasks)

  model_dir = pathlib.Path(model_dir)
  schedule = loop.Schedule(num_steps, log_every, eval_every, checkpoint_every)
  bad = set(freeze) - {"encoder", "quantizer", "decoder"}
  if bad:
    raise ConfigError(f"freeze may name encoder, quantizer and decoder, not {sorted(bad)}.")
  if dead_code_restart_every < 0 or (dead_code_restart_until or 0) < 0:
    raise ConfigError(
      "dead_code_restart_every and dead_code_restart_until must not be negative, got "
      f"{dead_code_restart_every} and {dead_code_restart_until}."
    )
  views = _check_group_views(group_views, config)
  device_mesh, rules = loop.start_mesh(mesh, batch_size, tfds_data_dir)
  perceptual = partitioning.replicate(_perceptual_weights(vgg_weights, loss_weights), device_mesh)

  features = ["image", *views]
  dataset = input_pipeline.split_reader(
    task,
    task_feature_lengths={name: config.image_size for name in features},
    feature_converter=seqio.PassThroughFeatureConverter(),
    global_batch_size=batch_size,
    seed=seed,
  )
  train_data = dataset(train_split, None)
  missing = [name for name in features if name not in train_data.element_spec]
  if missing:
    raise ConfigError(
      f"Task {task!r} yields {sorted(train_data.element_spec)}, not the view feature(s) "
      f"{missing} that group_views names (the shapes' views are in a `_views` task)."
    )
  # A task of another image size is refused before the model is built, where its
  # static shape says so; `to_global` checks every batch for the tasks it does not.
  for name in features:
    if None not in (static := train_data.element_spec[name].shape[1:]):
      _check_image_shape(tuple(static), task, config)

  trainer = _make_trainer(
    config, loss_weights, optimizer, disc_optimizer, disc_channels, freeze, num_steps,
    group_views,
  )  # fmt: skip
  state, state_shardings = partitioning.init_sharded(
    lambda: trainer.init(jax.random.key(seed)), device_mesh, rules
  )
  if init_from:
    state = state.replace(
      params=_load_start(init_from, config, state.params, state_shardings.params)
    )

  resumed = loop.resume(
    model_dir, state, state_shardings, train_data, keep=keep_checkpoints,
    save_every=checkpoint_every, config=config, config_file=CONFIG_FILE,
  )  # fmt: skip

  batch_sharding = partitioning.logical_sharding(device_mesh, ("batch", None, None, None), rules)
  replicated = jax.sharding.NamedSharding(device_mesh, jax.sharding.PartitionSpec())

  def global_images(batch, name: str = "image") -> jax.Array:
    images = np.asarray(batch[name], np.float32)
    _check_image_shape(images.shape[1:], task, config)
    return jax.make_array_from_process_local_data(batch_sharding, images)

  def to_global(batch):
    """The step's batch: the images, or with views a dict of them and the views."""
    if not views:
      return global_images(batch)
    return {name: global_images(batch, name) for name in features}

  evaluate = _evaluator(
    jax.jit(trainer.eval_step, out_shardings=replicated),
    lambda: dataset(eval_split, 1).take(eval_batches), global_images, config, batch_size,
    eval_split, device_mesh, rules,
  )  # fmt: skip
  step_batch_sharding = {name: batch_sharding for name in features} if views else batch_sharding

  gan_start = loss_weights.adversarial_start_step if loss_weights.adversarial > 0 else None
  hooks = loop.Hooks(
    step=gan.gan_schedule_step(
      trainer.train_step, gan_start, state_shardings, step_batch_sharding, replicated, perceptual
    ),
    next_batch=lambda: to_global(next(resumed.iterator)),
    loss_key="loss/total",
    metric_prefix="",
    evaluate=evaluate,
    after_step=_dead_code_restarts(
      trainer, dead_code_restart_every, dead_code_restart_until, seed, num_steps
    ),
  )
  return loop.run(
    hooks, resumed, schedule=schedule, mesh=device_mesh, rules=rules, model_dir=model_dir,
    examples_per_step=batch_size,
  )  # fmt: skip


def _check_image_shape(shape: tuple, task: str, config: TokenizerConfig) -> None:
  expected = (config.image_size, config.image_size, 3)
  if tuple(shape) != expected:
    raise ConfigError(
      f"Task {task!r} yields images of shape {tuple(shape)}, but the tokenizer expects {expected}."
    )


def _check_group_views(group_views: Sequence[str], config: TokenizerConfig) -> list[str]:
  """The view features `group_views` names (none when it is empty)."""
  if not group_views:
    return []
  if config.codebook_groups < 2:
    raise ConfigError(
      "group_views trains a tokenizer's codebook groups apart, so it needs at least 2 "
      f"codebook groups; this one has {config.codebook_groups}."
    )
  if len(group_views) != config.codebook_groups:
    raise ConfigError(
      f"group_views names {len(group_views)} view(s), one per codebook group is needed: "
      f"the tokenizer has codebook_groups = {config.codebook_groups}."
    )
  views = [name for name in group_views if name]
  if not views:
    raise ConfigError(f"group_views {tuple(group_views)} must name at least one view.")
  if len(set(views)) != len(views) or "image" in views:
    raise ConfigError(
      f"group_views {tuple(group_views)} must name distinct features other than 'image'."
    )
  return views


def _make_trainer(
  config, loss_weights, optimizer, disc_optimizer, disc_channels, freeze, num_steps,
  group_views=(),
) -> trainer_lib.Trainer:  # fmt: skip
  return trainer_lib.Trainer(
    config,
    loss_weights,
    trainer_lib.freeze_groups(optim.adam(optimizer, num_steps), freeze),
    optim.adam(disc_optimizer, num_steps),
    disc_channels,
    views=group_views,
  )


def _perceptual_weights(vgg_weights: str | None, loss_weights: losses.LossWeights):
  """The perceptual loss's VGG16 weights when its file is given and the loss is on."""
  if vgg_weights and loss_weights.perceptual > 0:
    return vgg.load_vgg16(vgg_weights)
  if loss_weights.perceptual > 0:
    logging.info("Perceptual loss off: no VGG16 weights file given (train.vgg_weights).")
  return None


def _dead_code_restarts(trainer, every: int, until: int | None, seed: int, num_steps: int):
  """Every `every` steps (0: never) up to step `until` (None: no end), moves the codes
  unused since the last restart; never at the last step, where a restarted code would
  take over the encoder outputs it lands on with no step left for the decoder to learn
  to draw it (a 1500-step run restarted at its end kept 26% of the test scenes, against
  100% for 2000 steps: bench/README.md)."""
  restart = jax.jit(trainer.restart_dead_codes, donate_argnums=0)

  def after_step(step: int, state, images, writer):
    del writer  # Restarts log a line, not a metric.
    if not (every and step % every == 0) or (until is not None and step > until):
      return state, False
    if step >= num_steps:
      return state, False
    state, restarted = restart(state, images, jax.random.fold_in(jax.random.key(seed), step))
    logging.info("Step %d: restarted %d dead codes.", step, int(restarted))
    return state, False

  return after_step


def _evaluator(evaluate_batch, batches, to_global, config, batch_size, split, mesh, rules):
  """Held-out PSNR, codebook usage and perplexity over full batches; writes the first
  batch's inputs beside their reconstructions."""

  def evaluate(step: int, state, writer) -> dict[str, float]:
    psnrs, counts, shown = [], np.zeros(config.codebook_size, np.int64), None
    for batch in batches().as_numpy_iterator():
      if batch["image"].shape[0] * jax.process_count() != batch_size:
        continue  # A last, partial batch would need another compilation.
      with partitioning.activate(mesh, rules):
        psnr, batch_counts, reconstruction = evaluate_batch(state.params, to_global(batch))
      psnrs.append(float(psnr))
      counts += np.asarray(batch_counts)
      if shown is None:
        shown = _image_grid(np.asarray(batch["image"]), np.asarray(reconstruction))
    if not psnrs:
      raise ConfigError(f"The {split!r} split has fewer than {batch_size} examples to evaluate.")
    probs = counts / counts.sum()
    writer.images(step, {"eval/input_vs_reconstruction": shown})
    return {
      "eval/psnr": float(np.mean(psnrs)),
      "eval/codebook_usage": float(np.mean(counts > 0)),
      "eval/codebook_perplexity": float(
        np.exp(-np.sum(probs[probs > 0] * np.log(probs[probs > 0])))
      ),
    }

  return evaluate


def _load_start(init_from: str, config: TokenizerConfig, params, shardings):
  """Parameters of another tokenizer run, for every group whose shapes match ours."""
  source_config, source_params, _ = checkpoint_io.load_params(init_from)

  def codebook(c: TokenizerConfig) -> str:
    return f"{c.codebook_size}x{c.code_dim} codebook in {c.codebook_groups} group(s)"

  if codebook(source_config) != codebook(config):
    raise ConfigError(
      f"{init_from} has a {codebook(source_config)}; this run needs a {codebook(config)}."
    )
  merged = dict(params)
  for group in ("encoder", "quantizer", "decoder"):
    ours = jax.tree_util.tree_map(jnp.shape, params[group])
    theirs = jax.tree_util.tree_map(jnp.shape, source_params[group])
    if ours == theirs:
      merged[group] = jax.device_put(source_params[group], shardings[group])
      logging.info("Initialized the %s from %s.", group, init_from)
    else:
      logging.info("Kept a fresh %s: its shapes differ from %s's.", group, init_from)
  return merged


# Named train_tokenizer so that it and parti.train can be configured in one process.
configured_train = gin.external_configurable(train, name="train_tokenizer")
gin.external_configurable(TokenizerConfig, module="tokenizer")
gin.external_configurable(losses.LossWeights, module="tokenizer")

if __name__ == "__main__":
  gin_utils.run(configured_train)
