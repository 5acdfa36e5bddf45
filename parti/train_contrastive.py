"""Trains the contrastive dual encoder that reranks Parti's samples (t5x-style job).

    python -m parti.train_contrastive --gin_file=gin/runs/contrastive_shapes.gin \
      --gin.MODEL_DIR=runs/reranker --gin.TFDS_DATA_DIR=runs/tfds

The same machinery as `parti.train`: a seqio task of captions and raw images
(the `parti_shapes_*` and `coco_captions_*` tasks, or your own registered with
`parti.tasks.registry.register_image_text_task`), the device mesh and logical
rules, orbax checkpoints that resume (input position included), SIGTERM saves and exits 75.
MODEL_DIR receives contrastive_config.json (what `parti.sampling.rerank.Reranker` reads),
checkpoints/, metrics.jsonl, TensorBoard summaries and config.gin. The periodic
evaluation reports the held-out loss and in-batch retrieval accuracy.
"""

from __future__ import annotations

import pathlib

import gin
import jax
import numpy as np

from parti import partitioning
from parti.modeling.contrastive import CONFIG_FILE, ContrastiveConfig
from parti.runtime import gin_utils
from parti.runtime.errors import ConfigError
from parti.training import loop, optim
from parti.training.contrastive_trainer import ContrastiveTrainer

FEATURES = ("encoder_input_tokens", "images")


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

  from parti.tasks import feature_converters, input_pipeline, registry  # noqa: F401

  model_dir = pathlib.Path(model_dir)
  schedule = loop.Schedule(num_steps, log_every, eval_every, checkpoint_every)
  if batch_size < 2:
    raise ConfigError(f"A contrastive batch needs at least 2 pairs, got batch_size {batch_size}.")
  device_mesh, rules = loop.start_mesh(mesh, batch_size, tfds_data_dir)
  _check_task(mixture_or_task_name, model)
  trainer = ContrastiveTrainer(model, optim.adam(optimizer, num_steps))
  state, state_shardings = partitioning.init_sharded(lambda: trainer.init(seed), device_mesh, rules)

  dataset = input_pipeline.split_reader(
    mixture_or_task_name,
    task_feature_lengths={"inputs": model.text_length, "image": model.image_size},
    feature_converter=feature_converters.ImageTextFeatureConverter(),
    global_batch_size=batch_size,
    seed=seed,
  )

  resumed = loop.resume(
    model_dir, state, state_shardings, dataset(train_split, None), keep=keep_checkpoints,
    save_every=checkpoint_every, config=model, config_file=CONFIG_FILE,
  )  # fmt: skip

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

  def evaluate(step: int, state, writer) -> dict[str, float]:
    del step, writer  # The loop logs and writes what this returns.
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
    return {f"eval/{k}": float(np.mean(v)) for k, v in totals.items()}

  hooks = loop.Hooks(
    step=lambda step, state, batch: train_step(state, batch),
    next_batch=lambda: to_global(next(resumed.iterator)),
    loss_key="train/loss",
    evaluate=evaluate if eval_split else None,
  )
  return loop.run(
    hooks, resumed, schedule=schedule, mesh=device_mesh, rules=rules, model_dir=model_dir,
    examples_per_step=batch_size, unit="pairs",
  )  # fmt: skip


def _check_task(name: str, model: ContrastiveConfig) -> None:
  """The task yields captions and raw images, in a vocabulary the text tower can read."""
  import seqio

  try:
    features = seqio.get_mixture_or_task(name).output_features
  except ValueError as error:
    raise ConfigError(f"Unknown seqio task or mixture {name!r}: {error}") from None
  if not {"inputs", "image"} <= set(features):
    raise ConfigError(
      f"Task {name!r} must yield 'inputs' (text) and 'image' (raw images); it "
      f"has {sorted(features)}."
    )
  vocab_size = features["inputs"].vocabulary.vocab_size
  if vocab_size > model.text_vocab_size:
    raise ConfigError(
      f"Task {name!r}'s vocabulary has {vocab_size} pieces; the model's "
      f"text_vocab_size is {model.text_vocab_size}."
    )


configured_train = gin.external_configurable(train_contrastive)
gin.external_configurable(ContrastiveConfig, module="contrastive")

if __name__ == "__main__":
  gin_utils.run(configured_train)
