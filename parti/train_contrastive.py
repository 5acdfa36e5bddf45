"""Trains the contrastive dual encoder that reranks Parti's samples (t5x-style job).

    python -m parti.train_contrastive --gin_file=gin/runs/contrastive_shapes.gin \
      --gin.MODEL_DIR=runs/reranker --gin.TFDS_DATA_DIR=runs/tfds

The same machinery as `parti.train`: a seqio task of captions and raw images
(the `parti_shapes_*` and `coco_captions_*` tasks, or your own registered with
`parti.tasks.registry.register_image_text_task`), the device mesh and logical
rules, orbax checkpoints that resume (input position included), SIGTERM saves.
MODEL_DIR receives contrastive_config.json (what `parti.rerank.Reranker` reads),
checkpoints/, metrics.jsonl, TensorBoard summaries and config.gin. The periodic
evaluation reports the held-out loss and in-batch retrieval accuracy.
"""

from __future__ import annotations

import pathlib
from typing import Any

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn

from parti import checkpoints, gin_utils, metric_logging, optim, partitioning
from parti.contrastive import CONFIG_FILE, ContrastiveConfig, DualEncoder, contrastive_loss
from parti.errors import ConfigError

FEATURES = ("encoder_input_tokens", "images")


@flax.struct.dataclass
class ContrastiveState:
  step: jax.Array
  params: Any
  opt_state: Any


class ContrastiveTrainer:
  """The jitted steps of one configuration; `train_contrastive` drives them."""

  def __init__(self, config: ContrastiveConfig, optimizer: optax.GradientTransformation):
    self.config = config
    self.model = DualEncoder(config)
    self.optimizer = optimizer

  def init(self, seed: int) -> ContrastiveState:
    """The initial state, with boxed leaves (for `partitioning.init_sharded`)."""
    cfg = self.config
    params = self.model.init(
      jax.random.key(seed),
      jnp.ones((1, cfg.text_length), jnp.int32),
      jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32),
    )["params"]
    opt_state = self.optimizer.init(nn.meta.unbox(params))
    return ContrastiveState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=partitioning.box_optimizer_state(self.optimizer, opt_state, params),
    )

  def loss(self, params, batch):
    text, image, scale = self.model.apply(
      {"params": params}, batch["encoder_input_tokens"], batch["images"]
    )
    return contrastive_loss(text, image, scale)

  def train_step(self, state: ContrastiveState, batch) -> tuple[ContrastiveState, dict]:
    (_, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(state.params, batch)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return ContrastiveState(state.step + 1, params, opt_state), metrics

  def eval_step(self, params, batch) -> dict:
    return self.loss(params, batch)[1]


def train_contrastive(
  *,
  model_dir: str,
  model: ContrastiveConfig,
  mixture_or_task_name: str,
  batch_size: int,
  num_steps: int,
  optimizer: optim.AdamConfig = optim.AdamConfig(),
  mesh: partitioning.MeshConfig = partitioning.MeshConfig(),
  train_split: str = "train",
  eval_split: str | None = "validation",
  eval_every: int = 500,
  eval_batches: int = 8,
  log_every: int = 50,
  checkpoint_every: int = 500,
  keep_checkpoints: int = 2,
  tfds_data_dir: str | None = None,
  seed: int = 0,
) -> dict[str, float]:
  """Trains the dual encoder; returns the last evaluation (or training metrics).

  Args:
    model_dir: where checkpoints, metrics and the config go.
    model: both towers' sizes.
    mixture_or_task_name: a seqio task yielding `inputs` (text) and `image` (raw images).
    batch_size: global batch size; every image is contrasted with every caption in it.
    num_steps: the step at which training stops.
    optimizer: AdamW and its warmup-cosine schedule.
    mesh: device mesh and logical-axis rules.
    train_split: the split to train on.
    eval_split: the split for periodic held-out loss and retrieval accuracy (None: none).
    eval_every: steps between evaluations.
    eval_batches: batches per evaluation.
    log_every: steps between metric lines.
    checkpoint_every: steps between checkpoints.
    keep_checkpoints: checkpoints kept.
    tfds_data_dir: where TFDS datasets are prepared.
    seed: seed of initialization and data order.
  """
  import seqio

  from parti.tasks import feature_converters, input_pipeline, registry  # noqa: F401

  model_dir = pathlib.Path(model_dir)
  if tfds_data_dir:
    seqio.set_tfds_data_dir_override(tfds_data_dir)
  if min(num_steps, log_every, checkpoint_every, eval_every) < 1:
    raise ConfigError("num_steps, log_every, checkpoint_every and eval_every must be positive.")
  if batch_size < 2:
    raise ConfigError(f"A contrastive batch needs at least 2 pairs, got batch_size {batch_size}.")
  try:
    features = seqio.get_mixture_or_task(mixture_or_task_name).output_features
  except ValueError as error:
    raise ConfigError(f"Unknown seqio task or mixture {mixture_or_task_name!r}: {error}") from None
  if not {"inputs", "image"} <= set(features):
    raise ConfigError(
      f"Task {mixture_or_task_name!r} must yield 'inputs' (text) and 'image' (raw images); it "
      f"has {sorted(features)}."
    )
  vocab_size = features["inputs"].vocabulary.vocab_size
  if vocab_size > model.text_vocab_size:
    raise ConfigError(
      f"Task {mixture_or_task_name!r}'s vocabulary has {vocab_size} pieces; the model's "
      f"text_vocab_size is {model.text_vocab_size}."
    )
  device_mesh = partitioning.create_mesh(mesh)
  rules = partitioning.rules_for(mesh)
  partitioning.check_batch_size(batch_size, device_mesh)

  trainer = ContrastiveTrainer(model, optim.adam(optimizer, num_steps))
  state, state_shardings = partitioning.init_sharded(lambda: trainer.init(seed), device_mesh, rules)

  def dataset(split: str, epochs: int | None):
    return input_pipeline.get_dataset(
      mixture_or_task_name,
      split=split,
      task_feature_lengths={"inputs": model.text_length, "image": model.image_size},
      feature_converter=feature_converters.ImageTextFeatureConverter(),
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
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save(model_dir / CONFIG_FILE)
  gin_utils.write_operative_config(model_dir if jax.process_index() == 0 else None)

  shardings = {
    "encoder_input_tokens": partitioning.logical_sharding(device_mesh, ("batch", None), rules),
    "images": partitioning.logical_sharding(device_mesh, ("batch", None, None, None), rules),
  }
  replicated = jax.sharding.NamedSharding(device_mesh, jax.sharding.PartitionSpec())

  def to_global(batch) -> dict[str, jax.Array]:
    images = np.asarray(batch["images"], np.float32)
    if images.shape[1:] != (model.image_size, model.image_size, 3):
      raise ConfigError(
        f"Task {mixture_or_task_name!r} yields images of shape {images.shape[1:]}; the model "
        f"reads {(model.image_size, model.image_size, 3)}."
      )
    batch = {**batch, "images": images}
    return {
      name: jax.make_array_from_process_local_data(shardings[name], np.asarray(batch[name]))
      for name in FEATURES
    }

  train_step = jax.jit(
    trainer.train_step,
    in_shardings=(state_shardings, shardings),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )
  eval_step = jax.jit(trainer.eval_step, out_shardings=replicated)

  def evaluate(step: int) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for batch in dataset(eval_split, 1).take(eval_batches).as_numpy_iterator():
      if len(batch["images"]) * jax.process_count() != batch_size:
        continue  # A last, partial batch would need another compilation.
      with partitioning.activate(device_mesh, rules):
        metrics = jax.device_get(eval_step(state.params, to_global(batch)))
      for key, value in metrics.items():
        totals.setdefault(key, []).append(float(value))
    if not totals:
      raise ConfigError(f"The {eval_split!r} split has fewer than {batch_size} examples.")
    result = {f"eval/{k}": float(np.mean(v)) for k, v in totals.items()}
    writer.scalars(step, result)
    logging.info("Evaluation at step %d: %s", step, result)
    return result

  writer = metric_logging.MetricLogger(model_dir)
  progress = metric_logging.Progress(num_steps, start, unit="pairs", every=log_every)
  preemption = checkpoints.Preemption()
  result: dict[str, float] = {}
  step = start
  try:
    with preemption.watching():
      while step < num_steps:
        batch = to_global(next(train_iterator))
        with partitioning.activate(device_mesh, rules):
          state, metrics = train_step(state, batch)
        step += 1
        if step % log_every == 0 or step == num_steps:
          scalars = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
          if not np.isfinite(scalars["train/loss"]):
            raise FloatingPointError(
              f"Loss is {scalars['train/loss']} at step {step}; stopping. The last good "
              f"checkpoint is in {checkpointer.directory} (steps {checkpointer.steps()})."
            )
          writer.scalars(step, scalars)
          progress.update(step, log_every * batch_size)
          result = scalars
        if eval_split and (step % eval_every == 0 or step == num_steps):
          result = evaluate(step)
        if checkpointer.should_save(step) or step == num_steps or preemption.requested:
          checkpoints.save_train_state(checkpointer, step, state, input_iterator=train_iterator)
        if preemption.requested:
          logging.warning("Stopped at step %d after SIGTERM; rerun to resume.", step)
          break
  finally:
    checkpointer.close()
    writer.flush()
  return result


configured_train = gin.external_configurable(train_contrastive)
gin.external_configurable(ContrastiveConfig, module="contrastive")

if __name__ == "__main__":
  gin_utils.run(configured_train)
