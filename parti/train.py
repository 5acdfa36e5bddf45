"""Trains the Parti transformer (t5x-style job).

    python -m parti.train --gin_file=gin/runs/pretrain_tiny_shapes.gin --gin.MODEL_DIR=runs/parti

MODEL_DIR receives parti_config.json, checkpoints/ (the last `keep_checkpoints`),
best/ (the lowest eval loss so far), metrics.jsonl and TensorBoard summaries, and
the operative config.gin. A rerun resumes from the latest checkpoint that
restores (model, optimizer, step, RNG and input position); SIGTERM saves one
and exits with status 75; a NaN or Inf loss stops the job and leaves the last good checkpoint.

Data: a seqio task or mixture (`MIXTURE_OR_TASK_NAME`) yielding `inputs` (text)
and either `targets` (pre-encoded image ids, see `parti.tokenizer.encode`) or
`image` (raw images, tokenized in the step by the frozen tokenizer in
`tokenizer_dir`). Multi-host: pass --coordinator_address, --num_processes and
--process_id (or --multihost on TPU pods and SLURM); each host feeds its shard.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from parti import partitioning
from parti.modeling import checkpoint_io, flops
from parti.modeling.config import PartiConfig
from parti.modeling.model import embeddings_from_codebook, with_edit_context, with_image_embeddings
from parti.runtime import gin_utils
from parti.runtime.errors import ConfigError
from parti.training import checkpoints, loop, optim
from parti.training import samples as samples_lib
from parti.training.edit_masks import EditMaskConfig
from parti.training.samples import SampleConfig
from parti.training.trainer import (
  RAW_IMAGE_FEATURES,
  TOKEN_FEATURES,
  PartiTrainer,
  batch_shardings,
  jit_train_step,
  summarize,
)

BEST_DIR = "best"


def _yields_raw_images(name: str) -> bool:
  """True if the task yields raw images (tokenized in the step), False for image ids."""
  import seqio

  try:
    provider = seqio.get_mixture_or_task(name)
  except ValueError as error:
    raise ConfigError(f"Unknown seqio task or mixture {name!r}: {error}") from error
  features = provider.output_features
  if "inputs" not in features:
    raise ConfigError(f"Task {name!r} has no 'inputs' (text) feature.")
  if "targets" in features:
    return False
  if "image" in features:
    return True
  raise ConfigError(f"Task {name!r} has neither 'targets' (image ids) nor 'image' features.")


def _load_tokenizer(tokenizer_dir: str, config: PartiConfig):
  """The frozen tokenizer's (encode function, parameters)."""
  from parti.tokenizer import checkpoint_io
  from parti.tokenizer import model as tokenizer_model

  tok_config, params, step = checkpoint_io.load_for_model(tokenizer_dir, config)
  logging.info("Tokenizing images in the step with %s (step %d).", tokenizer_dir, step)
  vqgan = tokenizer_model.VitVQGAN(tok_config)

  def encode(p, images):
    return vqgan.apply({"params": p}, images, method=tokenizer_model.VitVQGAN.encode)

  return encode, params, tok_config.image_size


def train(
  *,
  model_dir: str,
  model: PartiConfig,
  mixture_or_task_name: str,
  task_feature_lengths: Mapping[str, int],
  batch_size: int,
  num_steps: int,
  optimizer: optim.AdafactorConfig | optim.AdamConfig = optim.AdafactorConfig(),
  mesh: partitioning.MeshConfig = partitioning.MeshConfig(),
  microbatches: int = 1,
  label_smoothing: float = 0.0,
  z_loss: float = 1e-4,
  tokenizer_dir: str | None = None,
  pre_encoded_dir: str | None = None,
  init_from: str | None = None,
  image_embeddings_from_codebook: bool = False,
  train_split: str = "train",
  eval_split: str | None = "validation",
  eval_every: int = 1000,
  eval_batches: int = 8,
  log_every: int = 50,
  checkpoint_every: int = 1000,
  keep_checkpoints: int = 3,
  peak_flops: float | None = None,
  tfds_data_dir: str | None = None,
  shuffle: bool = True,
  in_memory: bool = False,
  samples: SampleConfig = SampleConfig(),
  edit_masks: EditMaskConfig | None = None,
  seed: int = 0,
) -> dict[str, float]:
  """Trains Parti; returns the last evaluation (or the last training metrics).

  Args:
    model_dir: where checkpoints, metrics and configs go.
    model: the architecture.
    mixture_or_task_name: a registered seqio task or mixture (see parti.tasks.registry).
    task_feature_lengths: {"inputs": text tokens, "targets": image tokens} for
      pre-encoded tasks, {"inputs": ..., "image": side} for raw-image tasks.
    batch_size: global batch size (split over hosts and the mesh's data axes).
    num_steps: the step at which training stops.
    optimizer: Parti's Adafactor, or Adam (small runs), and its learning-rate schedule.
    mesh: device mesh and logical-axis rules.
    microbatches: gradient accumulation: each step runs this many microbatches.
    label_smoothing: label smoothing of the cross-entropy.
    z_loss: weight of the log(Z)^2 auxiliary loss.
    tokenizer_dir: a trained tokenizer's MODEL_DIR, required for raw-image tasks.
    pre_encoded_dir: a `parti.tokenizer.encode` output folder; registers
      `mixture_or_task_name` over it.
    init_from: another run's MODEL_DIR whose latest parameters start this run
      (fine-tuning); ignored when this run has checkpoints of its own. A text-to-image
      run may start a model with the editing head (`edit_context`): the head's
      tables start as copies of the decoder's (`model.with_edit_context`).
    image_embeddings_from_codebook: a new run starts its image-token embeddings
      from the codebook of the tokenizer that codes its images (see
      `parti.modeling.model.embeddings_from_codebook`); small runs learn several times faster.
    train_split: the split to train on.
    eval_split: the split for periodic eval loss (None: no eval).
    eval_every: steps between evaluations.
    eval_batches: batches per evaluation.
    log_every: steps between metric lines.
    checkpoint_every: steps between checkpoints.
    keep_checkpoints: how many recent checkpoints to keep (the best is kept apart).
    peak_flops: per-device peak FLOP/s for MFU; None measures float32 matmuls here.
    tfds_data_dir: where TFDS datasets are prepared.
    shuffle: shuffle the training examples. Each host shuffles its own shard, so
      only an unshuffled run sees the same global batches on any number of hosts.
    in_memory: preprocess the training split once and hold it in memory, each epoch
      in a fresh permutation (`parti.tasks.input_pipeline.permuted_epochs`): for a
      small pre-encoded split, whose caption tokenization would otherwise cost as much
      as the step on a CPU. Refused above 1 GiB a host.
    samples: periodic sample images from validation prompts (off by default).
    edit_masks: fine-tunes the editing head (`PartiConfig.edit_context`): each example
      redraws a random region, given the rest of its image (gin/editing/).
    seed: seed of initialization, dropout and data order.
  """

  from parti.tasks import input_pipeline

  started = time.perf_counter()
  model_dir = pathlib.Path(model_dir)
  schedule = loop.Schedule(num_steps, log_every, eval_every, checkpoint_every)
  device_mesh, rules = loop.start_mesh(mesh, batch_size, tfds_data_dir)
  _check_microbatches(batch_size, microbatches, device_mesh)
  raw_images = _check_task(
    mixture_or_task_name, model, task_feature_lengths, pre_encoded_dir, edit_masks is not None
  )
  converter, image_encoder, tokenizer_params = _image_input(
    raw_images, mixture_or_task_name, model, task_feature_lengths, tokenizer_dir
  )

  optimizer_fn, schedule_fn = optim.build(optimizer, num_steps)
  trainer = PartiTrainer(
    model, optimizer_fn, microbatches=microbatches, label_smoothing=label_smoothing,
    z_loss=z_loss, image_encoder=image_encoder, edit_masks=edit_masks,
  )  # fmt: skip
  state, state_shardings = partitioning.init_sharded(lambda: trainer.init(seed), device_mesh, rules)
  replicated = jax.sharding.NamedSharding(device_mesh, jax.sharding.PartitionSpec())
  if tokenizer_params is not None:
    tokenizer_params = partitioning.replicate(tokenizer_params, device_mesh)

  dataset = input_pipeline.split_reader(
    mixture_or_task_name,
    task_feature_lengths=task_feature_lengths,
    feature_converter=converter,
    global_batch_size=batch_size,
    seed=seed,
    shuffle=shuffle,
    in_memory=in_memory,
  )

  resumed = loop.resume(
    model_dir, state, state_shardings, dataset(train_split, None), keep=keep_checkpoints,
    save_every=checkpoint_every,
    config=model, config_file=checkpoint_io.CONFIG_FILE,
  )  # fmt: skip
  if not resumed.start:
    resumed.state = _initial_state(
      resumed.state, state_shardings, model, init_from=init_from, seed=seed,
      codebook_from=(tokenizer_dir, pre_encoded_dir) if image_embeddings_from_codebook else None,
    )  # fmt: skip

  shardings = batch_shardings(
    device_mesh, rules, RAW_IMAGE_FEATURES if raw_images else TOKEN_FEATURES
  )

  def to_global(batch) -> dict[str, jax.Array]:
    return {
      name: jax.make_array_from_process_local_data(sharding, np.asarray(batch[name]))
      for name, sharding in shardings.items()
    }

  train_step = jit_train_step(trainer, device_mesh, state_shardings, shardings)

  evaluate = _evaluator(
    jax.jit(trainer.eval_sums, out_shardings=replicated),
    lambda: dataset(eval_split, 1).take(eval_batches), to_global, tokenizer_params, batch_size,
    eval_split, device_mesh, rules,
  )  # fmt: skip

  sampler = None if not samples.every else _training_samples(
    model, samples, dataset(eval_split or train_split, 1), mixture_or_task_name,
    samples_lib.tokenizer_checkpoint(tokenizer_dir, pre_encoded_dir), device_mesh,
  )  # fmt: skip
  best = _BestCheckpoint(model_dir, resumed.meta)

  hooks = loop.Hooks(
    step=lambda step, state, batch: train_step(state, batch, tokenizer_params),
    next_batch=lambda: to_global(next(resumed.iterator)),
    loss_key="train/loss",
    evaluate=evaluate if eval_split else None,
    extra_scalars=_throughput(model, batch_size, task_feature_lengths, schedule_fn, peak_flops),
    after_step=_sample_hook(sampler, num_steps),
    after_evaluation=best.after_evaluation,
    checkpoint_meta=best.meta,
  )
  logging.info("Set-up took %.1fs.", time.perf_counter() - started)
  return loop.run(
    hooks, resumed, schedule=schedule, mesh=device_mesh, rules=rules, model_dir=model_dir,
    examples_per_step=batch_size, also_close=(best.checkpointer,),
  )  # fmt: skip


def _check_microbatches(batch_size: int, microbatches: int, mesh) -> None:
  if batch_size % microbatches or (batch_size // microbatches) % partitioning.batch_divisor(mesh):
    raise ConfigError(
      f"Batch {batch_size} in {microbatches} microbatches does not split over the "
      f"{partitioning.batch_divisor(mesh)}-way data axes."
    )


def _check_task(
  name: str, model: PartiConfig, lengths: dict[str, int], pre_encoded_dir, editing: bool
) -> bool:
  """Registers a pre-encoded task, checks its features and lengths against the model;
  returns whether it yields raw images (else image token ids)."""
  from parti.tasks import registry, token_records
  from parti.tokenizer.checkpoint_io import check_token_layout

  if pre_encoded_dir:
    registry.register_pre_encoded_task(name, pre_encoded_dir)
    provenance = token_records.read_provenance(pre_encoded_dir)
    check_token_layout(
      model, provenance.codebook_groups, pre_encoded_dir, provenance.group_layout, editing
    )
  raw_images = _yields_raw_images(name)
  expected = {"inputs", "image"} if raw_images else {"inputs", "targets"}
  if set(lengths) != expected:
    raise ConfigError(
      f"task_feature_lengths for {name!r} must have keys {sorted(expected)}, got {sorted(lengths)}."
    )
  if lengths["inputs"] > model.text_length and model.text_positions == "learned":
    raise ConfigError(
      f"inputs length {lengths['inputs']} exceeds the model's learned "
      f"text_length {model.text_length}."
    )
  if not raw_images and lengths["targets"] != model.image_length:
    raise ConfigError(
      f"targets length {lengths['targets']} differs from the model's "
      f"{model.image_length} image tokens (image_grid {model.image_grid})."
    )
  _check_vocabulary(name, model)
  return raw_images


def _image_input(raw_images: bool, name: str, model: PartiConfig, lengths, tokenizer_dir):
  """(feature converter, image encoder, tokenizer parameters): raw images are tokenized
  in the step by the frozen tokenizer; token ids need neither."""
  from parti.tasks import feature_converters

  if not raw_images:
    return feature_converters.ImageTokensFeatureConverter(bos_id=model.bos_id), None, None
  if not tokenizer_dir:
    raise ConfigError(
      f"Task {name!r} yields raw images: set train.tokenizer_dir to a "
      "trained tokenizer, or pre-encode the task with parti.tokenizer.encode."
    )
  image_encoder, tokenizer_params, image_size = _load_tokenizer(tokenizer_dir, model)
  if lengths["image"] != image_size:
    raise ConfigError(
      f"The tokenizer reads {image_size}px images; task_feature_lengths['image'] is "
      f"{lengths['image']}."
    )
  return feature_converters.ImageTextFeatureConverter(), image_encoder, tokenizer_params


def _evaluator(eval_step, batches, to_global, tokenizer_params, batch_size, split, mesh, rules):
  """The held-out evaluation: summed NLLs (with the caption and with the null condition)
  over full batches, summarized into eval/ scalars."""

  def evaluate(step: int, state, writer) -> dict[str, float]:
    del step, writer  # The loop logs and writes what this returns.
    totals: dict[str, float] = {}
    for batch in batches().as_numpy_iterator():
      if len(batch["encoder_input_tokens"]) * jax.process_count() != batch_size:
        continue  # A last, partial batch would need another compilation.
      with partitioning.activate(mesh, rules):
        sums = jax.device_get(eval_step(state.params, to_global(batch), tokenizer_params))
      for key, value in sums.items():
        totals[key] = totals.get(key, 0.0) + float(value)
    if not totals:
      raise ConfigError(f"The {split!r} split has fewer than {batch_size} examples.")
    means = summarize({k: jnp.asarray(v) for k, v in totals.items()})
    result = {f"eval/{k}": float(v) for k, v in means.items() if k != "tokens"}
    result["eval/perplexity"] = float(np.exp(result["eval/nll"]))
    return result

  return evaluate


def _throughput(model: PartiConfig, batch_size: int, lengths, schedule_fn, peak_flops):
  """The learning rate, and image tokens/s and MFU of the timed steps."""
  peak = peak_flops or _measured_peak()
  step_flops = flops.parti_train_flops(model, batch_size, lengths["inputs"])
  tokens_per_step = batch_size * model.image_length

  def scalars(step: int, steps_per_second: float | None) -> dict[str, float]:
    found = {"train/learning_rate": float(schedule_fn(step - 1))}
    if steps_per_second is not None:
      found["perf/tokens_per_second"] = steps_per_second * tokens_per_step
      found["perf/mfu"] = steps_per_second * step_flops / (peak * jax.device_count())
    return found

  return scalars


def _sample_hook(sampler, num_steps: int):
  """Draws the sample images when due (and at the last step); that time is not training."""

  def draw(step: int, state, batch, writer):
    del batch
    if not sampler or not (sampler.due(step) or step == num_steps):
      return state, False
    sheet = sampler.draw(state.params)
    if sheet is not None:
      writer.images(step, {"samples": sheet})
    return state, True

  return draw


class _BestCheckpoint:
  """The parameters of the lowest held-out loss so far, kept apart in MODEL_DIR/best."""

  def __init__(self, model_dir: pathlib.Path, meta: dict):
    self.checkpointer = checkpoints.Checkpointer(model_dir, keep=1, save_every=1, subdir=BEST_DIR)
    self.loss = float(meta.get("best_eval_loss", float("inf")))

  def after_evaluation(self, step: int, state, result: dict[str, float]) -> None:
    if result["eval/loss"] < self.loss:
      self.loss = result["eval/loss"]
      self.checkpointer.save(step, {"params": state.params}, meta={"eval_loss": self.loss})

  def meta(self) -> dict:
    return {"best_eval_loss": self.loss}


def _initial_state(state, shardings, model: PartiConfig, *, init_from, seed, codebook_from):
  """A fresh run's parameters: another run's (`init_from`), or image embeddings drawn
  from the codebook of the tokenizer that `codebook_from` (tokenizer_dir,
  pre_encoded_dir) names, or the random initialization as it is."""
  if init_from:
    return state.replace(params=_initial_params(init_from, state.params, shardings.params, model))
  if codebook_from:
    codebook = _tokenizer_codebook(model, *codebook_from)
    embeddings = embeddings_from_codebook(codebook, model.embed_dim, seed)
    return state.replace(params=with_image_embeddings(state.params, embeddings))
  return state


def _initial_params(init_from: str, params, shardings, model: PartiConfig):
  """The latest parameters of the run in `init_from`, laid out like ours; the editing
  head, if ours has one and that run's model has not, is added."""
  config_file = pathlib.Path(init_from) / checkpoint_io.CONFIG_FILE
  source = checkpoint_io.load_config(init_from) if config_file.is_file() else model
  if source.edit_context and not model.edit_context:
    raise ConfigError(
      f"init_from: {init_from} has the editing head and this model has not: set "
      "PartiConfig.edit_context = True to fine-tune it further."
    )
  adds_head = model.edit_context and not source.edit_context
  kept_params, kept_shardings = params, shardings
  if adds_head:
    kept_params, kept_shardings = (
      {**tree, "encoder": {k: v for k, v in tree["encoder"].items() if k != "image_context"}}
      for tree in (params, shardings)
    )
  abstract = partitioning.abstract_with_shardings(kept_params, kept_shardings)
  try:
    step, params = checkpoints.restore_params(init_from, abstract)
  except FileNotFoundError as error:
    raise ConfigError(f"init_from: {error}") from error
  logging.info("Initialized the parameters from %s (step %d).", init_from, step)
  if adds_head:
    logging.info("Added the editing head, its tables copied from the decoder's.")
    return with_edit_context(params, shardings)
  return params


def _tokenizer_codebook(model: PartiConfig, tokenizer_dir, pre_encoded_dir) -> np.ndarray:
  """The codebook of the tokenizer that codes the run's images, checked against the model."""
  from parti.tokenizer import checkpoint_io

  checkpoint = samples_lib.tokenizer_checkpoint(tokenizer_dir, pre_encoded_dir)
  if checkpoint is None:
    raise ConfigError(
      "image_embeddings_from_codebook needs the run's tokenizer: set train.tokenizer_dir, "
      "or pre-encode with a tokenizer whose folder is still where provenance.json says."
    )
  _, params, _ = checkpoint_io.load_for_model(checkpoint[0], model, checkpoint[1])
  return np.asarray(params["quantizer"]["codebook"])


def _training_samples(
  model: PartiConfig, options: SampleConfig, prompts_dataset, task_name: str, checkpoint, mesh
) -> samples_lib.TrainingSamples | None:
  """The sampler of periodic images: the first validation prompts, and the tokenizer."""
  import seqio
  from jax.experimental import multihost_utils

  from parti.tokenizer import checkpoint_io
  from parti.tokenizer.api import ImageTokenizer

  if checkpoint is None:
    logging.warning("No sample images: the run has no image tokenizer to decode them with.")
    return None
  folder, step = checkpoint
  tok_config, tok_params, found = checkpoint_io.load_for_model(folder, model, step)
  tokenizer = ImageTokenizer(tok_config, tok_params, mesh, step=found)
  first = next(prompts_dataset.as_numpy_iterator())["encoder_input_tokens"][: options.count]
  # Every host must feed the same prompts to the (replicated) sampler.
  prompts = multihost_utils.broadcast_one_to_all(first)
  vocabulary = seqio.get_mixture_or_task(task_name).output_features["inputs"].vocabulary
  captions = [vocabulary.decode([int(t) for t in row if t > 0]) for row in prompts]
  logging.info("Sample images every %d steps for %d prompts.", options.every, len(prompts))
  return samples_lib.TrainingSamples(model, options, prompts, captions, tokenizer)


def _check_vocabulary(name: str, model: PartiConfig) -> None:
  import seqio

  vocabulary = seqio.get_mixture_or_task(name).output_features["inputs"].vocabulary
  if vocabulary.vocab_size > model.text_vocab_size:
    raise ConfigError(
      f"Task {name!r}'s text vocabulary has {vocabulary.vocab_size} pieces; the model's "
      f"text_vocab_size is {model.text_vocab_size}."
    )


def _measured_peak() -> float:
  peak = flops.measure_matmul_peak(size=1024, trials=3)
  logging.info("Measured matmul peak: %.1f GFLOP/s per device.", peak.flops_per_second / 1e9)
  return peak.flops_per_second


configured_train = gin.external_configurable(train)
gin.external_configurable(SampleConfig, module="samples")
gin.external_configurable(EditMaskConfig, module="editing")

if __name__ == "__main__":
  gin_utils.run(configured_train)
