"""The Parti transformer's architecture as a frozen dataclass; gin sets its fields.

The defaults are the paper's 350M model (Yu et al. 2022, Table 1): 16k SentencePiece
text vocabulary, 128 text tokens, 8192 image codes, a 32x32 grid of image tokens.
The paper's other sizes, and tiny CPU sizes, are gin files in gin/models/.
"""

from __future__ import annotations

import dataclasses

from parti.runtime.config_files import JsonConfig
from parti.runtime.errors import ConfigError
from parti.runtime.validation import check_types

NORMS = ("layernorm", "rmsnorm")
TEXT_POSITIONS = ("relative", "learned")
NULL_CONDITIONS = ("empty", "learned")
REMAT_POLICIES = ("none", "full", "save_dots")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class PartiConfig(JsonConfig):
  """An encoder-decoder from text tokens to image tokens.

  Attributes:
    text_vocab_size: SentencePiece vocabulary size (id 0 is padding, 1 is EOS).
    text_length: text tokens the encoder reads.
    image_vocab_size: codes of the image tokenizer; the decoder's BOS is this id.
    image_grid: (rows, cols) of image tokens; the decoder models rows*cols tokens.
    embed_dim: model (residual) width.
    mlp_dim: MLP hidden width.
    num_heads: attention heads.
    num_kv_heads: key and value heads in every attention layer, a divisor of num_heads
      (default num_heads): fewer share each key and value head among a group of query
      heads (grouped-query attention; one head is multi-query attention, as
      parti-pytorch's). The decoding caches shrink by num_heads / num_kv_heads.
    num_encoder_layers: text encoder blocks.
    num_decoder_layers: image decoder blocks.
    head_dim: per-head width (default embed_dim // num_heads).
    norm: "layernorm" (Parti) or "rmsnorm".
    gated_mlp: gated-GELU MLP (three matrices) instead of Parti's plain two-matrix MLP.
    text_positions: "relative" (T5 bias buckets) or "learned" absolute embeddings.
    relative_buckets: T5 relative-position buckets.
    relative_max_distance: distance beyond which T5 buckets saturate.
    tie_image_embeddings: the decoder's logits reuse its input embedding matrix.
    dtype: compute dtype of projections and MLPs; norms, softmax and logits are float32.
    scan_layers: stack each tower's blocks with `nn.scan` (one compiled block).
    remat_policy: "none", "full" (recompute each block) or "save_dots" (keep matmul outputs).
    dropout_rate: dropout in attention and MLP blocks.
    cfg_dropout_rate: probability of training an example on the null condition
      (classifier-free guidance).
    null_condition: "empty" (the encoding of an empty prompt) or "learned" (a
      learned encoder output).
    edit_context: the editing head (GLIDE's fine-tuned inpainting, for tokens): the
      encoder also reads the image being edited, its image_length tokens after the
      text, with the ones to redraw replaced by `mask_id`. Without an image it reads
      all of them masked, which is plain text-to-image generation. Trained by
      `parti.train` with `edit_masks` (gin/editing/), from a text-to-image run.
    transposed_key_cache: decoding keeps the attention key caches as [batch, heads,
      head_dim, length] instead of [batch, heads, length, head_dim]: faster on
      XLA:CPU when each decoder call feeds several positions (the Jacobi sampler
      sets it), slower at one position per call. No effect on parameters or training.
    tokens_per_patch: image tokens per tokenizer patch (the tokenizer's
      `codebook_groups`, which lays a patch's sub-codes side by side on the grid).
      Above 1, the decoder draws a patch's tokens independently of each other: each
      from the patches before it and the text, among its own group's codes (the
      inputs are shifted by a whole patch, not by one token). So a patch's color code
      does not condition its shape code, and a combination never seen in training
      (the shapes' held-out color-shape pairs) is as reachable as its parts.
    stacked_groups: patch grids the token grid holds one after another (the tokenizer's
      `codebook_groups` when its `group_layout` is "stacked"; 1 otherwise). Only editing's
      random regions read it: a region is drawn on one patch grid and covers every
      group's tokens of those patches, as an edit request's region does.
  """

  text_vocab_size: int = 16_384
  text_length: int = 128
  image_vocab_size: int = 8192
  image_grid: tuple[int, int] = (32, 32)
  embed_dim: int = 1024
  mlp_dim: int = 4096
  num_heads: int = 16
  num_kv_heads: int | None = None
  num_encoder_layers: int = 12
  num_decoder_layers: int = 12
  head_dim: int | None = None
  norm: str = "layernorm"
  gated_mlp: bool = False
  text_positions: str = "relative"
  relative_buckets: int = 32
  relative_max_distance: int = 128
  tie_image_embeddings: bool = True
  dtype: str = "bfloat16"
  scan_layers: bool = True
  remat_policy: str = "none"
  dropout_rate: float = 0.0
  cfg_dropout_rate: float = 0.1
  null_condition: str = "empty"
  edit_context: bool = False
  transposed_key_cache: bool = False
  tokens_per_patch: int = 1
  stacked_groups: int = 1

  def __post_init__(self):
    if isinstance(self.image_grid, list):  # From JSON.
      object.__setattr__(self, "image_grid", tuple(self.image_grid))
    check_types(self)
    choices = {
      "norm": NORMS,
      "text_positions": TEXT_POSITIONS,
      "null_condition": NULL_CONDITIONS,
      "remat_policy": REMAT_POLICIES,
      "dtype": DTYPES,
    }
    for field, allowed in choices.items():
      if getattr(self, field) not in allowed:
        raise ConfigError(
          f"PartiConfig.{field} is {getattr(self, field)!r}; expected one of {allowed}."
        )
    positive = (
      "text_vocab_size", "text_length", "image_vocab_size", "embed_dim", "mlp_dim", "num_heads",
      "num_encoder_layers", "num_decoder_layers", "tokens_per_patch", "stacked_groups",
    )  # fmt: skip
    for field in positive:
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
        raise ConfigError(
          f"PartiConfig.{field} must be a positive int, got {getattr(self, field)!r}."
        )
    if len(self.image_grid) != 2 or min(self.image_grid) < 1:
      raise ConfigError(f"PartiConfig.image_grid must be (rows, cols), got {self.image_grid!r}.")
    if self.image_grid[0] % self.stacked_groups:
      raise ConfigError(
        f"PartiConfig.stacked_groups {self.stacked_groups} must divide the image grid's "
        f"{self.image_grid[0]} rows: each group's patch grid is a block of whole rows."
      )
    if self.image_grid[1] % self.tokens_per_patch or self.image_vocab_size % self.tokens_per_patch:
      raise ConfigError(
        f"PartiConfig.tokens_per_patch {self.tokens_per_patch} must divide the image grid's "
        f"columns {self.image_grid[1]} and image_vocab_size {self.image_vocab_size} (one "
        "codebook per token of a patch)."
      )
    if self.head_dim is None and self.embed_dim % self.num_heads:
      raise ConfigError(
        f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; "
        "set head_dim explicitly."
      )
    if self.num_kv_heads is not None and (
      self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads
    ):
      raise ConfigError(
        f"PartiConfig.num_kv_heads must be a positive divisor of num_heads {self.num_heads}, "
        f"got {self.num_kv_heads!r}."
      )
    for field in ("dropout_rate", "cfg_dropout_rate"):
      if not 0.0 <= getattr(self, field) < 1.0:
        raise ConfigError(f"PartiConfig.{field} must be in [0, 1), got {getattr(self, field)}.")

  @property
  def image_length(self) -> int:
    return self.image_grid[0] * self.image_grid[1]

  @property
  def bos_id(self) -> int:
    """The decoder's start token: one past the last image code."""
    return self.image_vocab_size

  @property
  def mask_id(self) -> int:
    """The encoder's image-context id of a token to redraw (`edit_context`): one past
    the last image code, in the context's own embedding table."""
    return self.image_vocab_size

  @property
  def encoder_length(self) -> int:
    """Positions the encoder reads: the text's, and the image context's if any."""
    return self.text_length + (self.image_length if self.edit_context else 0)

  @property
  def per_head_dim(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def kv_heads(self) -> int:
    """Key and value heads per attention layer."""
    return self.num_kv_heads or self.num_heads

  def replace(self, **changes) -> PartiConfig:
    return dataclasses.replace(self, **changes)
