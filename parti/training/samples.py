"""Sample images during training: a few fixed validation prompts, generated and drawn.

Every `SampleConfig.every` steps the training job generates one image per prompt
with the KV-cached sampler (`parti.sampling.decoding`), decodes the tokens with the image
tokenizer, and writes a contact sheet of images with their captions to
MODEL_DIR/images/samples_STEP.png (and TensorBoard). Without a tokenizer to
decode with, it says so once and draws nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from parti.evaluation import contact_sheet
from parti.modeling.config import PartiConfig
from parti.runtime import images as images_io
from parti.runtime.errors import ConfigError
from parti.runtime.validation import check_types
from parti.sampling import decoding


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """How the training job draws samples.

  Attributes:
    every: steps between sample images; 0 draws none.
    count: prompts sampled, taken from the start of the validation split.
    guidance_scale: classifier-free guidance (Parti reports 1.2 at its best FID).
    temperature: sampling temperature (0: greedy).
    top_k: sample among the k likeliest codes (0: all).
    seed: the sampling seed (the same at every step, so images change with the model only).
  """

  every: int = 0
  count: int = 8
  guidance_scale: float = 1.2
  temperature: float = 1.0
  top_k: int = 0
  seed: int = 0

  def __post_init__(self):
    check_types(self)
    if self.every < 0 or self.count < 1:
      raise ConfigError(f"SampleConfig needs every >= 0 and count >= 1, got {self}.")
    if self.temperature < 0 or self.top_k < 0:
      raise ConfigError(f"SampleConfig needs temperature >= 0 and top_k >= 0, got {self}.")


def tokenizer_checkpoint(tokenizer_dir: str | None, pre_encoded_dir: str | None):
  """(folder, step) of the tokenizer that decodes samples, or None if there is none.

  The run's own tokenizer if it has one; else the one a pre-encoded folder's
  provenance names, if that folder still exists.
  """
  if tokenizer_dir:
    return tokenizer_dir, None
  if not pre_encoded_dir:
    return None
  from parti.tasks import token_records

  folder, _, step = token_records.read_provenance(pre_encoded_dir).tokenizer_checkpoint.rpartition(
    "@"
  )
  if not folder or not pathlib.Path(folder).is_dir():
    logging.warning(
      "No sample images: the tokenizer that encoded %s (%s) is not here; set "
      "train.tokenizer_dir to draw them.",
      pre_encoded_dir,
      folder or "unnamed",
    )
    return None
  return folder, int(step) if step.isdigit() else None


class TrainingSamples:
  """Generates and draws images for fixed prompts with the current parameters."""

  def __init__(
    self,
    config: PartiConfig,
    sample_config: SampleConfig,
    prompts: np.ndarray,
    captions: Sequence[str],
    tokenizer=None,
  ):
    """
    Args:
      config: the model.
      sample_config: sampling options.
      prompts: text tokens [count, text length], the same on every host.
      captions: the prompts as text, for the contact sheet.
      tokenizer: a `parti.tokenizer.api.ImageTokenizer` whose codes the model writes
        (`parti.tokenizer.checkpoint_io.load_for_model` checks that).
    """
    self.config = config
    self.options = sample_config
    self.prompts = jnp.asarray(prompts, jnp.int32)
    self.captions = list(captions)
    self.tokenizer = tokenizer
    # No logical-axis rules are active where this is traced, so the sampler follows
    # the parameters' shardings and the few prompts are replicated.
    self._sample = jax.jit(
      functools.partial(
        decoding.sample,
        config,
        temperature=sample_config.temperature,
        top_k=sample_config.top_k,
        guidance_scale=sample_config.guidance_scale,
      )
    )

  def due(self, step: int) -> bool:
    return self.options.every > 0 and step % self.options.every == 0

  def tokens(self, params) -> np.ndarray:
    """Sampled image tokens [count, rows, cols]."""
    tokens, _ = self._sample(params, self.prompts, jax.random.key(self.options.seed))
    return np.asarray(jax.device_get(tokens)).reshape(-1, *self.config.image_grid)

  def draw(self, params) -> np.ndarray | None:
    """A contact sheet [H, W, 3] in [0, 1] of the samples with their captions."""
    if self.tokenizer is None:
      return None
    images = self.tokenizer.decode(self.tokens(params))
    pixels = images_io.to_uint8(images)
    png = contact_sheet.contact_sheet(list(pixels), self.captions, columns=4, cell=128)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32) / 255.0
