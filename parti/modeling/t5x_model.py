"""Parti behind t5x's `BaseModel` interface, without depending on t5x.

With t5x installed from source, t5x's own jobs (t5x.train, t5x.eval, t5x.infer in
predict and score modes) run it from gin/t5x/'s files; docs/t5x.md has the install,
the commands, the t5x commit they were checked against and what they gave. In a t5x
gin file:

    MODEL = @t5x_model.PartiT5xModel()
    t5x_model.PartiT5xModel.config = @parti_config.PartiConfig()
    t5x_model.PartiT5xModel.optimizer_def = %OPTIMIZER  # t5x's own optimizer
    adafactor.Adafactor.logical_factor_rules = @t5x_model.adafactor_factor_rules()

`optimizer_def`, `input_vocabulary` and `output_vocabulary` are the constructor
arguments of t5x's models: t5x builds its train state from `model.optimizer_def` and
checks the task's vocabularies against the model's. Packing is not supported (Parti's
examples are one caption and one whole image each): set `train/utils.DatasetConfig.pack
= False` in the t5x gin file.

The method signatures are those of `t5x.models.BaseModel` (loss_fn, eval_fn,
score_batch, predict_batch, predict_batch_with_aux, get_initial_variables); the
batch features are seqio.EncDecFeatureConverter's names; and the initial
variables carry a `params_axes` collection (flax's `AxisMetadata`, `<name>_axes`
leaves), which is where t5x's partitioner reads logical axis names. Sampling takes
t5x's raw uint32 keys (threefry's or the hardware RNG's) as well as typed ones.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import clu.metrics
import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import partitioning as flax_partitioning

from parti.modeling import model
from parti.modeling.config import PartiConfig
from parti.modeling.model import Parti
from parti.sampling import decoding
from parti.training import losses

Batch = Mapping[str, jax.Array]

# The sampler options `decoder_params` and `decode_options` may set.
DECODER_PARAMS = ("temperature", "top_k", "top_p", "plausibility", "guidance_scale")


def params_axes(boxed_params) -> dict[str, Any]:
  """t5x's `params_axes` collection: for each parameter `p`, `p_axes` = AxisMetadata(names)."""

  def convert(tree):
    out = {}
    for key, value in tree.items():
      if isinstance(value, nn.LogicallyPartitioned):
        out[f"{key}_axes"] = flax_partitioning.AxisMetadata(names=tuple(value.names))
      elif isinstance(value, Mapping):
        out[key] = convert(value)
    return out

  return convert(flax.core.unfreeze(boxed_params))


def adafactor_factor_rules():
  """t5x's Adafactor factor rules, plus the one logical axis of ours they lack.

  t5x's `standard_logical_factor_rules` has no entry for `abspos_buckets` (the grid
  position embeddings' first axis), and t5x's Adafactor needs one for every axis
  name. Bind it in gin: `adafactor.Adafactor.logical_factor_rules =
  @t5x_model.adafactor_factor_rules()`. Imports t5x, so only call it under t5x.
  """
  from t5x import adafactor  # Here: t5x is there only when t5x runs us.

  rules = flax.core.unfreeze(adafactor.standard_logical_factor_rules())
  rules["abspos_buckets"] = adafactor.FactorDim.NONE
  return flax.core.freeze(rules)


def _sampler_options(options: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
  """`options` as a dict, refused by name if it sets anything but DECODER_PARAMS."""
  options = dict(options or {})
  unknown = set(options) - set(DECODER_PARAMS)
  if unknown:
    raise ValueError(f"Unknown {name} {sorted(unknown)}; Parti's sampler takes {DECODER_PARAMS}.")
  return options


class PartiT5xModel:
  """The t5x `BaseModel` methods over `parti.modeling.model.Parti`.

  Attributes:
    config: the architecture.
    label_smoothing: as t5x's `loss_fn`.
    z_loss: weight of log(Z)^2.
    decode_options: defaults for `predict_batch_with_aux` (any of DECODER_PARAMS);
      `decoder_params` overrides them per call, as in t5x.
  """

  def __init__(
    self,
    config: PartiConfig,
    optimizer_def: Any = None,
    input_vocabulary: Any = None,
    output_vocabulary: Any = None,
    label_smoothing: float = 0.0,
    z_loss: float = 1e-4,
    decode_options: Mapping[str, Any] | None = None,
  ):
    self.config = config
    self.optimizer_def = optimizer_def
    self._input_vocabulary = input_vocabulary
    self._output_vocabulary = output_vocabulary
    self.module = Parti(config)
    self.label_smoothing = label_smoothing
    self.z_loss = z_loss
    self.decode_options = _sampler_options(decode_options, "decode_options")

  @property
  def input_vocabulary(self):
    """The text's seqio vocabulary (default: the shapes SentencePiece model; imports TF)."""
    if self._input_vocabulary is None:
      from parti.tasks import vocabularies

      self._input_vocabulary = vocabularies.text_vocabulary()
    return self._input_vocabulary

  @property
  def output_vocabulary(self):
    """The image tokens' vocabulary, as the pre-encoded tasks declare it (imports TF)."""
    if self._output_vocabulary is None:
      from parti.tasks import vocabularies

      self._output_vocabulary = vocabularies.ImageVocabulary(self.config.image_vocab_size)
    return self._output_vocabulary

  @property
  def FEATURE_CONVERTER_CLS(self):
    """The seqio feature converter t5x builds the model features with (imports TF)."""
    from parti.tasks.feature_converters import ImageTokensFeatureConverter

    return functools.partial(ImageTokensFeatureConverter, bos_id=self.config.bos_id)

  # --- Initialization ------------------------------------------------------------------------

  def get_initial_variables(
    self,
    rng: jax.Array,
    input_shapes: Mapping[str, tuple[int, ...]],
    input_types: Mapping[str, jnp.dtype] | None = None,
  ) -> dict[str, Any]:
    """{"params": plain arrays, "params_axes": their logical axis names}.

    The parameters' shapes come from the config alone; t5x's input shapes and types
    change nothing in them, so they are accepted and not read.
    """
    del input_shapes, input_types
    boxed = model.init_params(self.config, rng)
    return {"params": nn.meta.unbox(boxed), "params_axes": params_axes(boxed)}

  # --- Training and evaluation ---------------------------------------------------------------

  def _sums(self, params, batch: Batch, dropout_rng: jax.Array | None) -> dict[str, jax.Array]:
    logits = self.module.apply(
      {"params": params},
      batch["encoder_input_tokens"],
      batch["decoder_input_tokens"],
      enable_dropout=dropout_rng is not None,
      rngs={"dropout": dropout_rng} if dropout_rng is not None else None,
    )
    weights = batch.get("decoder_loss_weights")
    if weights is None:
      weights = jnp.ones_like(batch["decoder_target_tokens"])
    return losses.cross_entropy(
      logits, batch["decoder_target_tokens"], weights, self.label_smoothing, self.z_loss
    )

  def loss_fn(
    self, params, batch: Batch, dropout_rng: jax.Array | None
  ) -> tuple[jax.Array, dict[str, clu.metrics.Metric]]:
    """(loss summed over weighted tokens, metrics): t5x's EncoderDecoderModel with
    loss_normalizing_factor=None."""
    sums = self._sums(params, batch, dropout_rng)
    weight = sums["weight_sum"]
    metrics = {
      "loss": clu.metrics.Average.from_model_output(sums["loss"] / jnp.maximum(weight, 1.0)),
      "accuracy": clu.metrics.Average.from_model_output(sums["correct"] / jnp.maximum(weight, 1.0)),
      "z_loss": clu.metrics.Average.from_model_output(sums["z_loss"] / jnp.maximum(weight, 1.0)),
    }
    return sums["loss"], metrics

  def eval_fn(self, params, batch: Batch) -> tuple[jax.Array, dict[str, clu.metrics.Metric]]:
    return self.loss_fn(params, batch, dropout_rng=None)

  def score_batch(
    self, params, batch: Batch, return_intermediates: bool = False
  ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Each example's log-likelihood of its image tokens given its text, [B]."""
    logits = self.module.apply(
      {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    )
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    targets = batch["decoder_target_tokens"]
    token_scores = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    weights = batch.get("decoder_loss_weights")
    if weights is not None:
      token_scores = token_scores * weights
    scores = jnp.sum(token_scores, axis=-1)
    if return_intermediates:
      return scores, {"token_scores": token_scores}
    return scores

  # --- Inference -----------------------------------------------------------------------------

  def predict_batch(self, params, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
    return self.predict_batch_with_aux(params, batch, rng)[0]

  def predict_batch_with_aux(
    self,
    params,
    batch: Batch,
    rng: jax.Array | None = None,
    decoder_params: Mapping[str, Any] | None = None,
    return_all_decodes: bool = False,
    num_decodes: int = 1,
    prompt_with_targets: bool = False,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Samples image tokens for each text, as t5x's EncoderDecoderModel returns them.

    `num_decodes` independent samples per text are drawn (t5x's temperature-sampling
    meaning; there is no beam search) and sorted by their log-likelihood under the
    guided model, best last. With `return_all_decodes`: tokens [B, num_decodes, N] and
    {"scores": [B, num_decodes]}; without: the best, [B, N] and {"scores": [B]}.
    `decoder_params` may set DECODER_PARAMS (temperature, top_k, top_p, plausibility,
    guidance_scale), over the model's `decode_options`. Deviations from t5x: no
    `prompt_with_targets` (an image is decoded whole; prefixes are the infer job's),
    and `rng` may be omitted (key 0).
    """
    if prompt_with_targets:
      raise NotImplementedError(
        "Parti decodes whole images; prompting with targets is not supported."
      )
    if num_decodes < 1:
      raise ValueError(f"num_decodes must be at least 1, got {num_decodes}.")
    options = {
      "temperature": 1.0,
      **self.decode_options,
      **_sampler_options(decoder_params, "decoder_params"),
    }
    rng = jax.random.key(0) if rng is None else rng
    text = batch["encoder_input_tokens"]
    batch_size = text.shape[0]
    repeated = jnp.repeat(text, num_decodes, axis=0)
    tokens, log_probs = decoding.sample(self.config, params, repeated, rng, **options)
    tokens = tokens.reshape(batch_size, num_decodes, -1)
    scores = jnp.sum(log_probs, axis=-1).reshape(batch_size, num_decodes)
    order = jnp.argsort(scores, axis=1)  # Ascending, as t5x's decoders return them.
    tokens = jnp.take_along_axis(tokens, order[:, :, None], axis=1)
    scores = jnp.take_along_axis(scores, order, axis=1)
    if return_all_decodes:
      return tokens, {"scores": scores}
    return tokens[:, -1], {"scores": scores[:, -1]}
