"""Scores images against their prompts with a trained contrastive model.

    reranker = Reranker.from_checkpoint("runs/reranker")
    cosine = reranker.score(images, prompts)      # [N] in [-1, 1]
    best = np.argsort(-cosine)[:k]

Used by `parti.infer` to keep the best k of n samples (Parti reranks with CoCa,
DALL-E with CLIP) and by the evaluations as a CLIP-score-style metric
(`parti.modeling.contrastive.clip_score`). The model is small and scores each host's own
images, so it runs replicated on the host's first device, needing no mesh.
Runs without TensorFlow.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn

from parti.modeling.contrastive import CONFIG_FILE, ContrastiveConfig, DualEncoder
from parti.runtime.errors import ConfigError
from parti.sampling.prompts import Prompt, PromptEncoder
from parti.training import checkpoints


class Reranker:
  """A trained dual encoder and the text encoding it was trained with."""

  def __init__(
    self,
    config: ContrastiveConfig,
    params,
    vocabulary: str | pathlib.Path | None = None,
    step: int | None = None,
  ):
    self.config = config
    self.params = params
    self.step = step
    self.encoder = PromptEncoder(config.text_length, vocabulary)
    if self.encoder.vocab_size > config.text_vocab_size:
      raise ConfigError(
        f"The vocabulary {self.encoder.path} has {self.encoder.vocab_size} pieces; the "
        f"reranker reads {config.text_vocab_size}."
      )
    model = DualEncoder(config)

    def cosine(params, tokens, images):
      text, image, _ = model.apply({"params": params}, tokens, images)
      return jnp.sum(text * image, axis=-1)

    self._cosine = jax.jit(cosine)

  @classmethod
  def from_checkpoint(
    cls,
    model_dir: str | pathlib.Path,
    vocabulary: str | pathlib.Path | None = None,
    step: int | None = None,
  ) -> Reranker:
    """Loads a `parti.train_contrastive` run (its latest step that restores, or `step`).

    Raises:
      ConfigError: the folder is not a contrastive run, or has no checkpoint that restores.
    """
    folder = pathlib.Path(model_dir)
    config = ContrastiveConfig.load(folder / CONFIG_FILE)
    model = DualEncoder(config)
    boxed = jax.eval_shape(
      lambda: model.init(
        jax.random.key(0),
        jnp.ones((1, config.text_length), jnp.int32),
        jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32),
      )["params"]
    )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nn.meta.unbox(boxed)
    )
    try:
      found, params = checkpoints.restore_params(folder, abstract, step)
    except FileNotFoundError as error:
      raise ConfigError(f"Reranker: {error}") from error
    logging.info("Reranking with %s (step %d).", folder, found)
    return cls(config, params, vocabulary, found)

  def score(self, images: np.ndarray, prompts: Sequence[Prompt | str]) -> np.ndarray:
    """Cosine similarity [N] of each image [N, H, W, 3] (in [0, 1]) to its prompt."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(prompts):
      raise ValueError(
        f"Need images [N, H, W, 3] and N prompts; got {images.shape} and {len(prompts)}."
      )
    if not len(images):
      return np.zeros((0,), np.float32)
    tokens = np.stack([self.encoder.encode(p) for p in prompts])
    return np.asarray(self._cosine(self.params, tokens, images))
