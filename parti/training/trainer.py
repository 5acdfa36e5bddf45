"""The Parti train and eval steps: pure functions of (state, batch), jitted by the job.

A batch holds t5x's encoder-decoder features (`encoder_input_tokens`,
`decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights`), or
`encoder_input_tokens` and raw `images`, which a frozen image tokenizer turns
into those features inside the step.

Gradients are accumulated over microbatches with `lax.scan`: the loss is
normalized by the whole batch's weight, so any number of microbatches gives the
same update as one. Dropout randomness is `fold_in(seed, step)`, so a resumed
run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from parti import partitioning
from parti.modeling import model as model_lib
from parti.modeling.config import PartiConfig
from parti.modeling.model import Parti
from parti.runtime.errors import ConfigError
from parti.training import edit_masks as edit_masks_lib
from parti.training import losses

Batch = dict[str, jax.Array]
# Logical axes of every feature a step may be fed; the rules shard "batch" over the data axes.
FEATURE_AXES = {
  "encoder_input_tokens": ("batch", None),
  "decoder_input_tokens": ("batch", None),
  "decoder_target_tokens": ("batch", None),
  "decoder_loss_weights": ("batch", None),
  "images": ("batch", None, None, None),
}
# A batch of pre-encoded image tokens; a raw-image batch is RAW_IMAGE_FEATURES.
TOKEN_FEATURES = (
  "encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"
)  # fmt: skip
RAW_IMAGE_FEATURES = ("encoder_input_tokens", "images")
# The edit masks' key is the step's key folded with this (its microbatches' dropout
# keys are folded with 0, 1, ...), so that runs without edit masks draw as before.
_MASK_STREAM = 0x6D61736B
# (tokenizer params, images [B, H, W, 3]) -> image token ids [B, h, w]
ImageEncoder = Callable[[Any, jax.Array], jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds besides the input position."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 key data: the seed of every step's dropout.


class PartiTrainer:
  """The model, optimizer and objective of one run, as jittable functions."""

  def __init__(
    self,
    config: PartiConfig,
    optimizer: optax.GradientTransformation,
    *,
    microbatches: int = 1,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    image_encoder: ImageEncoder | None = None,
    edit_masks: edit_masks_lib.EditMaskConfig | None = None,
  ):
    if microbatches < 1:
      raise ConfigError(f"microbatches must be positive, got {microbatches}.")
    if edit_masks is not None and not config.edit_context:
      raise ConfigError(
        "edit_masks trains the editing head, which this model lacks: set "
        "PartiConfig.edit_context = True (gin/editing/ does)."
      )
    self.config = config
    self.model = Parti(config)
    self.optimizer = optimizer
    self.microbatches = microbatches
    self.label_smoothing = label_smoothing
    self.z_loss = z_loss
    self.image_encoder = image_encoder
    self.edit_masks = edit_masks

  # --- Initialization ------------------------------------------------------------------------

  def dummy_batch(self, batch_size: int = 1) -> Batch:
    cfg = self.config
    text = jnp.ones((batch_size, cfg.text_length), jnp.int32)
    image = jnp.zeros((batch_size, cfg.image_length), jnp.int32)
    return {
      "encoder_input_tokens": text,
      "decoder_input_tokens": image,
      "decoder_target_tokens": image,
      "decoder_loss_weights": jnp.ones_like(image),
    }

  def init_params(self, rng: jax.Array):
    """Boxed (logically partitioned) parameters."""
    return model_lib.init_params(self.config, rng)

  def init(self, seed: int) -> TrainState:
    """The initial state (boxed leaves: use with `partitioning.init_sharded`)."""
    rng = jax.random.key(seed)
    params = self.init_params(jax.random.fold_in(rng, 0))
    opt_state = self.optimizer.init(nn.meta.unbox(params))
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=partitioning.box_optimizer_state(self.optimizer, opt_state, params),
      rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
    )

  # --- Steps ---------------------------------------------------------------------------------

  def to_model_features(self, batch: Batch, tokenizer_params=None, rng=None) -> Batch:
    """Raw images -> image tokens with the frozen tokenizer; token batches pass through.
    With `edit_masks`, each example also gets a random region to redraw, drawn from
    `rng` (see `edit_masks.edit_features`)."""
    batch = self._image_tokens(batch, tokenizer_params)
    if self.edit_masks is None:
      return batch
    return edit_masks_lib.edit_features(batch, rng, self.config, self.edit_masks)

  def _image_tokens(self, batch: Batch, tokenizer_params) -> Batch:
    if "images" not in batch:
      return batch
    if self.image_encoder is None:
      raise ConfigError("The batch has raw images but the run has no image tokenizer.")
    ids = jax.lax.stop_gradient(self.image_encoder(tokenizer_params, batch["images"]))
    targets = ids.reshape(ids.shape[0], -1).astype(jnp.int32)
    if targets.shape[1] != self.config.image_length:
      raise ConfigError(
        f"The tokenizer makes {targets.shape[1]} tokens per image; the model's image_grid "
        f"{self.config.image_grid} has {self.config.image_length}."
      )
    bos = jnp.full((targets.shape[0], 1), self.config.bos_id, jnp.int32)
    return {
      "encoder_input_tokens": batch["encoder_input_tokens"],
      "decoder_input_tokens": jnp.concatenate([bos, targets[:, :-1]], axis=1),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": jnp.ones_like(targets),
    }

  def _sums(self, params, batch: Batch, rng: jax.Array | None) -> dict[str, jax.Array]:
    logits = self.model.apply(
      {"params": params},
      batch["encoder_input_tokens"],
      batch["decoder_input_tokens"],
      enable_dropout=rng is not None,
      edit_context=batch.get("edit_context_tokens"),
      rngs={"dropout": rng} if rng is not None else None,
    )
    return self._objective(logits, batch)

  def _objective(self, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    return losses.cross_entropy(
      logits,
      batch["decoder_target_tokens"],
      batch["decoder_loss_weights"],
      self.label_smoothing,
      self.z_loss,
    )

  def _split_microbatches(self, batch: Batch) -> Batch:
    """[B, ...] -> [microbatches, B / microbatches, ...], each microbatch spread over
    every data shard (row j of microbatch i is example j * microbatches + i)."""
    m = self.microbatches

    def split(x):
      if x.shape[0] % m:
        raise ConfigError(f"Batch of {x.shape[0]} does not split into {m} microbatches.")
      x = x.reshape(x.shape[0] // m, m, *x.shape[1:])
      x = jnp.swapaxes(x, 0, 1)
      return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree_util.tree_map(split, batch)

  def gradients(self, params, batch: Batch, rng: jax.Array):
    """(gradients of the mean loss, summed metrics), accumulated over microbatches."""
    total_weight = jnp.maximum(jnp.sum(batch["decoder_loss_weights"]).astype(jnp.float32), 1.0)

    def loss_fn(p, micro, micro_rng):
      sums = self._sums(p, micro, micro_rng)
      return sums["loss"] / total_weight, sums

    grad_fn = jax.grad(loss_fn, has_aux=True)
    if self.microbatches == 1:
      return grad_fn(params, batch, rng)

    def accumulate(carry, inputs):
      index, micro = inputs
      grads, sums = grad_fn(params, micro, jax.random.fold_in(rng, index))
      return jax.tree_util.tree_map(jnp.add, carry, (grads, sums)), None

    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    zero_sums = jax.tree_util.tree_map(
      jnp.zeros_like, jax.eval_shape(lambda: self._sums(params, self._first(batch), None))
    )
    micro = self._split_microbatches(batch)
    (grads, sums), _ = jax.lax.scan(
      accumulate, (zero_grads, zero_sums), (jnp.arange(self.microbatches), micro)
    )
    return grads, sums

  def _first(self, batch: Batch) -> Batch:
    size = batch["decoder_target_tokens"].shape[0] // self.microbatches
    return jax.tree_util.tree_map(lambda x: x[:size], batch)

  def train_step(
    self, state: TrainState, batch: Batch, tokenizer_params=None
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    batch = self.to_model_features(batch, tokenizer_params, jax.random.fold_in(rng, _MASK_STREAM))
    grads, sums = self.gradients(state.params, batch, rng)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = summarize(sums)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  def eval_sums(self, params, batch: Batch, tokenizer_params=None) -> dict[str, jax.Array]:
    """Summed loss, nll, correct and weight over a batch, without dropout, and how much
    the text helps: the nll of the same targets on the null condition (`nll_null`),
    and both nlls over the object tokens alone (see `object_token_weights`). Edit masks
    are drawn from a fixed key, so every evaluation scores the same regions."""
    batch = self.to_model_features(batch, tokenizer_params, jax.random.key(0))
    text, inputs = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    context = batch.get("edit_context_tokens")
    with_text = self._logits(params, text, inputs, null=False, context=context)
    without_text = self._logits(params, text, inputs, null=True, context=context)
    sums = self._objective(with_text, batch)
    objects = weights * object_token_weights(
      targets, self.config.image_vocab_size, self.config.tokens_per_patch
    )
    sums["nll_null"] = losses.cross_entropy(without_text, targets, weights)["nll"]
    sums["object_nll"] = losses.cross_entropy(with_text, targets, objects)["nll"]
    sums["object_nll_null"] = losses.cross_entropy(without_text, targets, objects)["nll"]
    sums["object_weight_sum"] = jnp.sum(objects.astype(jnp.float32))
    return sums

  def _logits(self, params, text, inputs, null: bool, context=None) -> jax.Array:
    """Teacher-forced logits without dropout, on the text or on the null condition."""

    def forward(model: Parti):
      condition = jnp.full((text.shape[0],), null)
      encoded, mask = model.encode(text, enable_dropout=False, null=condition, edit_context=context)
      return model.decode(inputs, encoded, mask, enable_dropout=False)

    return self.model.apply({"params": params}, method=forward)


def object_token_weights(
  targets: jax.Array, vocab_size: int, tokens_per_patch: int = 1
) -> jax.Array:
  """1 where a target's patch is not its image's most frequent one, else 0: [B, N] float32.

  On the shapes the most frequent patch is the flat background (objects never cover
  most of an image), so these are the tokens that draw objects: the ones a prompt
  decides. Elsewhere it is only a cheap proxy for "not background". With several
  tokens per patch (`PartiConfig.tokens_per_patch`), the background is the most
  frequent code of each of the patch's groups, and a patch is an object's when any
  of its tokens differs from its group's; all of its tokens then count.
  """
  # Counts [B, vocab] by a scatter-add per row; a one-hot [B, N, vocab] would be the
  # largest array of the eval step at Parti's sizes.
  counts = jax.vmap(lambda row: jnp.bincount(row, length=vocab_size))(targets)
  patches = targets.reshape(targets.shape[0], -1, tokens_per_patch)
  # Group g's codes are its own id range, so each group's most frequent code is found
  # among that range's counts.
  per_group = counts.reshape(counts.shape[0], tokens_per_patch, -1)
  modes = jnp.argmax(per_group, axis=-1) + jnp.arange(tokens_per_patch) * per_group.shape[-1]
  drawn = jnp.any(patches != modes[:, None, :], axis=-1, keepdims=True)
  return jnp.broadcast_to(drawn, patches.shape).reshape(targets.shape).astype(jnp.float32)


def batch_shardings(
  mesh: jax.sharding.Mesh,
  rules: partitioning.LogicalRules,
  names: tuple[str, ...] = TOKEN_FEATURES,
) -> dict[str, jax.sharding.NamedSharding]:
  """The shardings of a batch with features `names` (default: the token features)."""
  return {name: partitioning.logical_sharding(mesh, FEATURE_AXES[name], rules) for name in names}


def jit_train_step(
  trainer: PartiTrainer,
  mesh: jax.sharding.Mesh,
  state_shardings,
  shardings: dict[str, jax.sharding.NamedSharding],
):
  """`trainer.train_step` jitted with in and out shardings and the state donated.

  The tokenizer's parameters (raw-image batches only) are replicated.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(
    trainer.train_step,
    in_shardings=(state_shardings, shardings, replicated),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )


def summarize(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-token means of summed metrics (loss, accuracy, z-loss, nll).

  With `eval_sums`' text-use sums it adds `nll_null` and `text_gap` (the null
  condition's nll minus the text's: nats per token that the prompt is worth), and
  the same over object tokens (`object_nll`, `object_nll_null`, `object_text_gap`).
  A run that ignores its prompt shows a gap near 0 within its first evaluations.
  """
  weight = jnp.maximum(sums["weight_sum"], 1.0)
  means = {
    "loss": sums["loss"] / weight,
    "nll": sums["nll"] / weight,
    "z_loss": sums["z_loss"] / weight,
    "accuracy": sums["correct"] / weight,
    "tokens": sums["weight_sum"],
  }
  if "nll_null" in sums:
    means["nll_null"] = sums["nll_null"] / weight
    means["text_gap"] = means["nll_null"] - means["nll"]
  if "object_weight_sum" in sums:
    objects = jnp.maximum(sums["object_weight_sum"], 1.0)
    means["object_nll"] = sums["object_nll"] / objects
    means["object_nll_null"] = sums["object_nll_null"] / objects
    means["object_text_gap"] = means["object_nll_null"] - means["object_nll"]
    means["object_token_share"] = sums["object_weight_sum"] / weight
  return means
