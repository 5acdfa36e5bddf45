"""Trains the ViT-VQGAN tokenizer (generator and discriminator together).

    python -m parti.tokenizer.train --gin_file=gin/tokenizer/tiny.gin --gin.MODEL_DIR=runs/tokenizer

MODEL_DIR receives tokenizer_config.json (what `ImageTokenizer.from_checkpoint`
reads), checkpoints/, metrics.jsonl and TensorBoard summaries (losses, PSNR,
codebook usage and perplexity), images/ (inputs beside reconstructions) and the
operative config.gin. A rerun resumes from the latest checkpoint; SIGTERM saves
one and exits. Stage two (Parti) starts from a trained tokenizer with
`init_from` and `freeze=("encoder", "quantizer")` and trains a larger decoder.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence
from typing import Any

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from parti import checkpoints, gin_utils, metric_logging, optim, partitioning
from parti.errors import ConfigError
from parti.tokenizer import checkpoint_io, discriminator, losses, model, vgg
from parti.tokenizer.config import TokenizerConfig

CONFIG_FILE = checkpoint_io.CONFIG_FILE


@flax.struct.dataclass
class TokenizerState:
  """Everything a checkpoint holds."""

  step: jax.Array
  params: Any
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any
  code_counts: jax.Array  # Codes chosen since the last dead-code restart.


class Trainer:
  """The jitted steps of one configuration; `train` drives them."""

  def __init__(
    self,
    config: TokenizerConfig,
    weights: losses.LossWeights,
    optimizer: optax.GradientTransformation,
    disc_optimizer: optax.GradientTransformation,
    disc_channels: int,
    perceptual_weights: dict | None,
  ):
    self.config = config
    self.weights = weights
    self.model = model.VitVQGAN(config)
    self.disc = discriminator.Discriminator(base_channels=disc_channels)
    self.optimizer = optimizer
    self.disc_optimizer = disc_optimizer
    self.perceptual_weights = perceptual_weights

  def init(self, rng: jax.Array) -> TokenizerState:
    images = jnp.zeros((1, self.config.image_size, self.config.image_size, 3), jnp.float32)
    g_rng, d_rng = jax.random.split(rng)
    params = self.model.init(g_rng, images)["params"]
    disc_params = self.disc.init(d_rng, images)["params"]
    return TokenizerState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=self.optimizer.init(params),
      disc_params=disc_params,
      disc_opt_state=self.disc_optimizer.init(disc_params),
      code_counts=jnp.zeros((self.config.codebook_size,), jnp.int32),
    )

  def _generator_loss(self, params, disc_params, images, with_gan: bool):
    cfg, w = self.config, self.weights
    raw, ids, vq = self.model.apply({"params": params}, images)
    reconstruction = model.to_image(raw, cfg)
    rgb = raw[..., :3] if not cfg.logit_laplace else reconstruction
    terms = {
      "l2": losses.l2(rgb, images),
      "codebook": vq["codebook"],
      "commitment": vq["commitment"],
    }
    total = (
      w.l2 * terms["l2"] + w.codebook * vq["codebook"] + cfg.commitment_cost * vq["commitment"]
    )
    if cfg.logit_laplace:
      terms["logit_laplace"] = losses.logit_laplace_nll(raw, images)
      total += w.logit_laplace * terms["logit_laplace"]
    if self.perceptual_weights is not None and w.perceptual > 0:
      terms["perceptual"] = vgg.perceptual_distance(self.perceptual_weights, reconstruction, images)
      total += w.perceptual * terms["perceptual"]
    if with_gan:
      fake = self.disc.apply({"params": disc_params}, reconstruction)
      terms["adversarial"] = losses.generator_adversarial(fake, w.gan_loss)
      total += w.adversarial * terms["adversarial"]
    terms["total"] = total
    return total, (terms, reconstruction, ids)

  def train_step(self, state: TokenizerState, images: jax.Array, with_gan: bool):
    """One generator update (and, with the GAN on, one discriminator update)."""
    grad_fn = jax.value_and_grad(self._generator_loss, has_aux=True)
    (_, (terms, reconstruction, ids)), grads = grad_fn(
      state.params, state.disc_params, images, with_gan
    )
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {f"loss/{k}": v for k, v in terms.items()}
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["psnr"] = losses.psnr(reconstruction, images)
    metrics.update(
      {f"codebook/{k}": v for k, v in losses.codebook_stats(ids, self.config.codebook_size).items()}
    )
    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    if with_gan:
      disc_loss, disc_grads = jax.value_and_grad(self._disc_loss)(
        state.disc_params, images, jax.lax.stop_gradient(reconstruction)
      )
      disc_updates, disc_opt_state = self.disc_optimizer.update(
        disc_grads, state.disc_opt_state, state.disc_params
      )
      disc_params = optax.apply_updates(state.disc_params, disc_updates)
      metrics["loss/discriminator"] = disc_loss
    counts = state.code_counts + jnp.bincount(ids.reshape(-1), length=self.config.codebook_size)
    state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      disc_params=disc_params,
      disc_opt_state=disc_opt_state,
      code_counts=counts,
    )
    return state, metrics

  def _disc_loss(self, disc_params, real, fake):
    def discriminate(x):
      return self.disc.apply({"params": disc_params}, x)

    loss = losses.discriminator_loss(discriminate(real), discriminate(fake), self.weights.gan_loss)
    if self.weights.r1_gamma > 0:
      loss += self.weights.r1_gamma / 2 * losses.r1_penalty(discriminate, real)
    return loss

  def restart_dead_codes(self, state: TokenizerState, images: jax.Array, rng: jax.Array):
    """Moves codes unused since the last restart onto current encoder outputs.

    Outputs are drawn with probability proportional to their squared distance to the
    nearest code (k-means++ seeding), not uniformly: in images that are mostly flat
    background, uniform picks land on patches the codebook already serves and the
    restarted codes die again, while the rarer edge patches stay coarsely coded.
    """

    def encode(module, x):
      z = module.encoder(x).reshape(-1, self.config.code_dim)
      nearest = module.quantizer.embed(module.quantizer.lookup(z))
      if self.config.l2_normalize:
        z = model.l2_normalize(z)
      return z, jnp.sum((z - nearest) ** 2, axis=-1)

    z, distance = self.model.apply({"params": state.params}, images, method=encode)
    logits = jnp.log(jnp.maximum(distance, 1e-12))
    picks = jax.random.categorical(rng, logits, shape=(self.config.codebook_size,))
    dead = state.code_counts == 0
    codebook = state.params["quantizer"]["codebook"]
    codebook = jnp.where(dead[:, None], z[picks], codebook)
    params = flax.core.copy(state.params, {"quantizer": {"codebook": codebook}})
    restarted = jnp.sum(dead)
    return state.replace(params=params, code_counts=jnp.zeros_like(state.code_counts)), restarted

  def eval_step(self, params, images):
    raw, ids, _ = self.model.apply({"params": params}, images)
    reconstruction = model.to_image(raw, self.config)
    counts = jnp.bincount(ids.reshape(-1), length=self.config.codebook_size)
    return losses.psnr(reconstruction, images), counts, reconstruction


def _freeze(optimizer: optax.GradientTransformation, frozen: Sequence[str]):
  """Zero updates for the top-level parameter groups in `frozen` (stage two)."""
  if not frozen:
    return optimizer

  def labels(params):
    return {
      name: jax.tree_util.tree_map(
        lambda _, label="frozen" if name in frozen else "trained": label, sub
      )
      for name, sub in params.items()
    }

  return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)


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
  init_from: str | None = None,
  freeze: Sequence[str] = (),
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
    init_from: a tokenizer MODEL_DIR whose parameters start this run (stage two).
    freeze: top-level parameter groups not to train ("encoder", "quantizer", "decoder").
    tfds_data_dir: where TFDS datasets are prepared (default: TFDS's).
    seed: the seed of initialization, data order and dead-code restarts.

  Returns:
    The final evaluation metrics.
  """
  import seqio

  from parti.tasks import input_pipeline, registry  # noqa: F401  (registers the tasks)

  model_dir = pathlib.Path(model_dir)
  if tfds_data_dir:
    seqio.set_tfds_data_dir_override(tfds_data_dir)
  bad = set(freeze) - {"encoder", "quantizer", "decoder"}
  if bad:
    raise ConfigError(f"freeze may name encoder, quantizer and decoder, not {sorted(bad)}.")
  device_mesh = partitioning.create_mesh(mesh)
  rules = partitioning.rules_for(mesh)
  partitioning.check_batch_size(batch_size, device_mesh)

  perceptual = None
  if vgg_weights and loss_weights.perceptual > 0:
    perceptual = vgg.load_vgg16(vgg_weights)
  elif loss_weights.perceptual > 0:
    logging.info("Perceptual loss off: no VGG16 weights file given (train.vgg_weights).")
  trainer = Trainer(
    config,
    loss_weights,
    _freeze(optim.adam(optimizer, num_steps), freeze),
    optim.adam(disc_optimizer, num_steps),
    disc_channels,
    perceptual,
  )
  state, state_shardings = partitioning.init_sharded(
    lambda: trainer.init(jax.random.key(seed)), device_mesh, rules
  )
  if init_from:
    state = state.replace(
      params=_load_start(init_from, config, state.params, state_shardings.params)
    )

  def dataset(split: str, epochs: int | None):
    return input_pipeline.get_dataset(
      task,
      split=split,
      task_feature_lengths={"image": config.image_size},
      feature_converter=seqio.PassThroughFeatureConverter(),
      global_batch_size=batch_size,
      shuffle=epochs is None,
      seed=seed,
      num_epochs=epochs,
    )

  train_iterator = input_pipeline.ResumableIterator(dataset(train_split, None))
  checkpointer = checkpoints.Checkpointer(
    model_dir, keep=keep_checkpoints, save_every=checkpoint_every
  )
  state, start, _ = checkpoints.restore_train_state(
    checkpointer, state, state_shardings, train_iterator
  )
  if not start and jax.process_index() == 0:
    config.save(model_dir / CONFIG_FILE)
  gin_utils.write_operative_config(model_dir if jax.process_index() == 0 else None)

  batch_sharding = partitioning.logical_sharding(device_mesh, ("batch", None, None, None), rules)
  replicated = jax.sharding.NamedSharding(device_mesh, jax.sharding.PartitionSpec())

  def jit_step(with_gan: bool):
    return jax.jit(
      functools.partial(trainer.train_step, with_gan=with_gan),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0,
    )

  steps = {False: jit_step(False), True: jit_step(True)}
  restart = jax.jit(trainer.restart_dead_codes, donate_argnums=0)
  evaluate_batch = jax.jit(trainer.eval_step, out_shardings=replicated)

  def to_global(batch) -> jax.Array:
    images = np.asarray(batch["image"], np.float32)
    if images.shape[1:] != (config.image_size, config.image_size, 3):
      raise ConfigError(
        f"Task {task!r} yields images of shape {images.shape[1:]}, but the tokenizer expects "
        f"{(config.image_size, config.image_size, 3)}."
      )
    return jax.make_array_from_process_local_data(batch_sharding, images)

  def evaluate(step: int) -> dict[str, float]:
    psnrs, counts, shown = [], np.zeros(config.codebook_size, np.int64), None
    for batch in dataset(eval_split, 1).take(eval_batches).as_numpy_iterator():
      if batch["image"].shape[0] * jax.process_count() != batch_size:
        continue  # A last, partial batch would need another compilation.
      images = to_global(batch)
      with partitioning.activate(device_mesh, rules):
        psnr, batch_counts, reconstruction = evaluate_batch(state.params, images)
      psnrs.append(float(psnr))
      counts += np.asarray(batch_counts)
      if shown is None:
        shown = _image_grid(np.asarray(batch["image"]), np.asarray(reconstruction))
    if not psnrs:
      raise ConfigError(
        f"The {eval_split!r} split has fewer than {batch_size} examples to evaluate."
      )
    probs = counts / counts.sum()
    result = {
      "eval/psnr": float(np.mean(psnrs)),
      "eval/codebook_usage": float(np.mean(counts > 0)),
      "eval/codebook_perplexity": float(
        np.exp(-np.sum(probs[probs > 0] * np.log(probs[probs > 0])))
      ),
    }
    writer.scalars(step, result)
    writer.images(step, {"eval/input_vs_reconstruction": shown})
    logging.info("Evaluation at step %d: %s", step, result)
    return result

  writer = metric_logging.MetricLogger(model_dir)
  progress = metric_logging.Progress(num_steps, start, unit="images", every=log_every)
  preemption = checkpoints.Preemption()
  result: dict[str, float] = {}
  step = start
  with preemption.watching():
    while step < num_steps:
      images = to_global(next(train_iterator))
      with_gan = loss_weights.adversarial > 0 and step >= loss_weights.adversarial_start_step
      with partitioning.activate(device_mesh, rules):
        state, metrics = steps[with_gan](state, images)
      step += 1
      if dead_code_restart_every and step % dead_code_restart_every == 0:
        with partitioning.activate(device_mesh, rules):
          state, restarted = restart(state, images, jax.random.fold_in(jax.random.key(seed), step))
        logging.info("Step %d: restarted %d dead codes.", step, int(restarted))
      if step % log_every == 0 or step == num_steps:
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(scalars["loss/total"]):
          checkpointer.close()
          raise FloatingPointError(
            f"Loss is {scalars['loss/total']} at step {step}; stopping. The last good "
            f"checkpoint is in {checkpointer.directory} (steps {checkpointer.steps()})."
          )
        writer.scalars(step, scalars)
        progress.update(step, log_every * batch_size)
      if step % eval_every == 0 or step == num_steps:
        result = evaluate(step)
      if checkpointer.should_save(step) or step == num_steps or preemption.requested:
        checkpoints.save_train_state(checkpointer, step, state, input_iterator=train_iterator)
      if preemption.requested:
        logging.warning("Stopped at step %d after SIGTERM; rerun to resume.", step)
        break
  checkpointer.close()
  writer.flush()
  return result


def _load_start(init_from: str, config: TokenizerConfig, params, shardings):
  """Parameters of another tokenizer run, for every group whose shapes match ours."""
  source_config, source_params, _ = checkpoint_io.load_params(init_from)
  if (source_config.codebook_size, source_config.code_dim) != (
    config.codebook_size,
    config.code_dim,
  ):
    raise ConfigError(
      f"{init_from} has a {source_config.codebook_size}x{source_config.code_dim} codebook; this run "
      f"needs {config.codebook_size}x{config.code_dim}."
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
