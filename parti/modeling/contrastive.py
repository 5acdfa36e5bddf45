"""A CLIP-style contrastive image-text dual encoder: Parti's reranker and CLIP-score model.

    text tokens [B, T] -> transformer -> mean over tokens -> projection -> l2-normalize
    images [B, S, S, 3] in [0, 1] -> patches -> ViT -> mean over patches -> projection
      -> l2-normalize
    loss: symmetric InfoNCE over the global batch, logits = scale * cosine

Parti reranks its samples with CoCa and DALL-E with CLIP; both score an image by
the cosine similarity of its embedding to the prompt's. This is the same recipe
at a size that trains on the shapes data in minutes (`parti.train_contrastive`),
built from the transformer blocks Parti's encoder uses, so it is sharded by the
same logical axes. Mean pooling (rather than CLIP's EOS token) keeps the text
tower independent of where the EOS falls after truncation.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from parti.modeling import layers
from parti.modeling.layers import l2_normalize, patchify
from parti.runtime.config_files import JsonConfig
from parti.runtime.errors import ConfigError
from parti.runtime.validation import check_types

CONFIG_FILE = "contrastive_config.json"
_EMBED_INIT = nn.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig(JsonConfig):
  """Both towers' sizes; the defaults suit the 64x64 shapes.

  Attributes:
    text_vocab_size: SentencePiece vocabulary size (0 is padding).
    text_length: text tokens read (longer prompts are truncated).
    image_size: side of the square images read; others are resized to it.
    patch_size: side of the image patches.
    width: both towers' residual width.
    mlp_dim: both towers' MLP width.
    num_heads: attention heads.
    text_layers: text transformer blocks.
    image_layers: image transformer blocks.
    embed_dim: width of the shared, l2-normalized embedding.
    initial_temperature: the softmax temperature the learned logit scale starts at (CLIP: 0.07).
    max_logit_scale: the learned scale is clipped here (CLIP: 100).
    dtype: compute dtype of projections and MLPs.
  """

  text_vocab_size: int = 1024
  text_length: int = 32
  image_size: int = 64
  patch_size: int = 8
  width: int = 128
  mlp_dim: int = 512
  num_heads: int = 4
  text_layers: int = 2
  image_layers: int = 3
  embed_dim: int = 128
  initial_temperature: float = 0.07
  max_logit_scale: float = 100.0
  dtype: str = "float32"

  def __post_init__(self):
    check_types(self)
    positive = (
      "text_vocab_size", "text_length", "image_size", "patch_size", "width", "mlp_dim",
      "num_heads", "text_layers", "image_layers", "embed_dim",
    )  # fmt: skip
    for field in positive:
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise ConfigError(f"ContrastiveConfig.{field} must be a positive int, got {value!r}.")
    if self.image_size % self.patch_size:
      raise ConfigError(
        f"ContrastiveConfig.image_size {self.image_size} is not a multiple of patch_size "
        f"{self.patch_size}."
      )
    if self.width % self.num_heads or self.width % 4:
      raise ConfigError(
        f"ContrastiveConfig.width {self.width} must divide by num_heads {self.num_heads} and by 4."
      )
    if not 0 < self.initial_temperature < 1 or self.max_logit_scale <= 1:
      raise ConfigError("ContrastiveConfig needs 0 < initial_temperature < 1 < max_logit_scale.")
    if self.dtype not in ("float32", "bfloat16"):
      raise ConfigError(f"ContrastiveConfig.dtype must be float32 or bfloat16, not {self.dtype!r}.")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @classmethod
  def load(cls, path: str | pathlib.Path) -> ContrastiveConfig:
    path = pathlib.Path(path)
    if not path.is_file():
      raise ConfigError(f"{path.parent} is not a contrastive model run: {path} is missing.")
    return super().load(path)


class DualEncoder(nn.Module):
  """Text and image towers into one l2-normalized embedding space, and the logit scale."""

  config: ContrastiveConfig

  def _blocks(self, x, mask, name):
    cfg = self.config
    count = cfg.text_layers if name == "text" else cfg.image_layers
    for i in range(count):
      x = layers.EncoderBlock(
        cfg.num_heads, cfg.mlp_dim, jnp.dtype(cfg.dtype), name=f"{name}_block_{i}"
      )(x, mask)
    return layers.Norm(name=f"{name}_final_norm")(x)

  def _project(self, pooled, name):
    projection = layers.dense(
      self.config.embed_dim, ("embed", "mlp"), self.config.dtype, name=f"{name}_projection"
    )
    return l2_normalize(projection(pooled).astype(jnp.float32))

  @nn.compact
  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """[B, T] token ids (0: padding) -> [B, embed_dim] unit vectors."""
    cfg = self.config
    tokens = tokens[:, : cfg.text_length]
    x = nn.Embed(
      cfg.text_vocab_size,
      cfg.width,
      embedding_init=nn.with_logical_partitioning(_EMBED_INIT, ("vocab", "embed")),
      name="token_embedding",
    )(jnp.clip(tokens, 0, cfg.text_vocab_size - 1))
    positions = self.param(
      "text_positions",
      nn.with_logical_partitioning(_EMBED_INIT, ("length", "embed")),
      (cfg.text_length, cfg.width),
      jnp.float32,
    )
    x = x + positions[None, : tokens.shape[1]]
    valid = tokens > 0
    x = self._blocks(x, valid[:, None, None, :], "text")
    weights = valid.astype(jnp.float32)[..., None]
    pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return self._project(pooled, "text")

  @nn.compact
  def encode_image(self, images: jax.Array) -> jax.Array:
    """[B, S, S, 3] in [0, 1] (any S; resized to image_size) -> [B, embed_dim] unit vectors."""
    cfg = self.config
    images = images.astype(jnp.float32)
    if images.shape[1:3] != (cfg.image_size, cfg.image_size):
      images = jax.image.resize(
        images, (images.shape[0], cfg.image_size, cfg.image_size, 3), "bilinear"
      )
    x = layers.dense(cfg.width, (None, "embed"), cfg.dtype, use_bias=True, name="patch_embedding")(
      patchify(images * 2.0 - 1.0, cfg.patch_size)
    )
    x = x.astype(jnp.float32) + layers.sincos_2d(cfg.grid, cfg.grid, cfg.width)[None]
    x = self._blocks(x, None, "image")
    return self._project(jnp.mean(x, axis=1), "image")

  @nn.compact
  def logit_scale(self) -> jax.Array:
    """exp(learned log-scale), clipped at max_logit_scale."""
    log_scale = self.param(
      "log_logit_scale",
      nn.with_logical_partitioning(
        nn.initializers.constant(math.log(1.0 / self.config.initial_temperature)), ()
      ),
      (),
      jnp.float32,
    )
    return jnp.minimum(jnp.exp(log_scale), self.config.max_logit_scale)

  def __call__(self, tokens: jax.Array, images: jax.Array):
    """(text embeddings, image embeddings, logit scale)."""
    return self.encode_text(tokens), self.encode_image(images), self.logit_scale()


def contrastive_loss(
  text: jax.Array, image: jax.Array, scale: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE: each image against every caption in the batch, and back.

  Returns the mean loss and metrics: the loss, image-to-text and text-to-image
  top-1 retrieval accuracy in the batch, and the scale.
  """
  logits = scale * image @ text.T  # [images, texts]
  labels = jnp.arange(logits.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  loss = 0.5 * (jnp.mean(image_to_text) + jnp.mean(text_to_image))
  metrics = {
    "loss": loss,
    "image_to_text_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == labels),
    "text_to_image_accuracy": jnp.mean(jnp.argmax(logits, axis=0) == labels),
    "logit_scale": scale,
  }
  return loss, metrics


def clip_score(cosine: jax.Array) -> jax.Array:
  """The CLIP-score convention (Hessel et al. 2021, as torchmetrics reports it): 100 * max(cos, 0)."""
  return 100.0 * jnp.maximum(cosine, 0.0)
