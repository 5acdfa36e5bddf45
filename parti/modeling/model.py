"""The Parti encoder-decoder: text tokens in, image-token logits out.

  encoder_input_tokens [B, T] -> embed (+ learned positions, or T5 relative bias)
    -> pre-norm self-attention blocks -> final norm -> encoded [B, T, D]
  decoder_input_tokens [B, N] (BOS = image_vocab_size, then image codes)
    -> embed + row and column embeddings of each token's place in the grid
    -> pre-norm blocks (causal self-attention, cross-attention, MLP) -> final norm
    -> float32 logits over the image codes [B, N, image_vocab_size]

Classifier-free guidance is trained here: with probability `cfg_dropout_rate` an
example's text is replaced by the null condition (see `Parti.encode`).
Decoding hooks: `encode()` once, then `decode(..., use_cache=True)` with a mutable
`cache` collection, one or more positions per call (see `layers.Attention`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from parti.modeling import layers
from parti.modeling.config import PartiConfig

_EMBED_INIT = nn.initializers.normal(stddev=1.0)
# Input embedding tables are padded to a multiple of this, so that they split evenly
# over any model axis a real mesh has.
_VOCAB_PAD = 128


def _token_embedding(vocab_size: int, embed_dim: int) -> nn.Embed:
  """A tower's token embedding (called inside its compact `__call__`). It computes in
  float32 whatever the weights' dtype (t5x restores them in bfloat16 for inference):
  the scanned layers' carry must keep one dtype."""
  return nn.Embed(
    padded_vocab(vocab_size),
    embed_dim,
    dtype=jnp.float32,
    embedding_init=nn.with_logical_partitioning(_EMBED_INIT, ("vocab", "embed")),
    name="token_embedding",
  )


def _grid_embedding(module: nn.Module, config: PartiConfig):
  """Declares `module`'s learned row and column tables (called inside its compact
  `__call__`); returns positions [N] (raster order) -> their embeddings [N, D]."""
  rows, cols = config.image_grid

  def table(name: str, size: int) -> jax.Array:
    init = nn.with_logical_partitioning(_EMBED_INIT, ("abspos_buckets", "embed"))
    return module.param(name, init, (size, config.embed_dim), jnp.float32)

  row, col = table("row_embedding", rows), table("col_embedding", cols)
  return lambda positions: row[positions // cols] + col[positions % cols]


def padded_vocab(size: int) -> int:
  return -(-size // _VOCAB_PAD) * _VOCAB_PAD


def _remat_policy(name: str):
  return {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[name]


def relative_position_bucket(relative_position: jax.Array, num_buckets: int, max_distance: int):
  """T5's bidirectional buckets: exact for small distances, logarithmic up to max_distance."""
  num_buckets //= 2
  bucket = (relative_position > 0).astype(jnp.int32) * num_buckets
  distance = jnp.abs(relative_position)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(
    max_distance / max_exact
  )
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(is_small, distance, large)


def embeddings_from_codebook(codebook: jax.Array, embed_dim: int, seed: int = 0) -> jax.Array:
  """Image-token embeddings [codes, embed_dim] that start where the tokenizer's codes are.

  Each code vector is l2-normalized and mapped into the model's width by one random
  orthonormal map, at _EMBED_INIT's scale (norm sqrt(embed_dim)). Inner products are
  kept: codes that draw alike (an object a pixel to the left) start alike, so what
  the model learns of one code reaches its neighbours from the first step, rather than
  each of thousands of codes being learned alone. With tied logits it is also where
  the output layer starts. Codebooks wider than the model are cut to its width.
  """
  codebook = jnp.asarray(codebook, jnp.float32)
  codes = codebook * jax.lax.rsqrt(jnp.maximum(jnp.sum(codebook**2, -1, keepdims=True), 1e-12))
  width = min(codebook.shape[1], embed_dim)
  gaussian = jax.random.normal(jax.random.key(seed), (embed_dim, codebook.shape[1]))
  basis, _ = jnp.linalg.qr(gaussian)  # [embed_dim, width], orthonormal columns.
  return codes[:, :width] @ basis[:, :width].T * math.sqrt(embed_dim)


def with_image_embeddings(params, embeddings: jax.Array):
  """`params` whose first rows of the decoder's token embedding are `embeddings`
  (the rows after them, BOS and padding, are kept), laid out as before."""
  table = params["decoder"]["token_embedding"]["embedding"]
  rows = embeddings.shape[0]
  replace = jax.jit(
    lambda t: t.at[:rows].set(embeddings.astype(t.dtype)), out_shardings=table.sharding
  )
  decoder = {**params["decoder"], "token_embedding": {"embedding": replace(table)}}
  return {**params, "decoder": decoder}


def with_edit_context(params, shardings=None):
  """A text-to-image model's `params` with the editing head added (`PartiConfig.
  edit_context`), its tables copies of the decoder's: the context then starts out
  reading each code, and each place in the grid, as the decoder already embeds them
  (its mask id starts as the decoder's BOS). `shardings`: the new tree's, else the
  copies keep the decoder tables' own."""
  decoder = params["decoder"]
  head = {
    "token_embedding": {"embedding": decoder["token_embedding"]["embedding"]},
    "row_embedding": decoder["row_embedding"],
    "col_embedding": decoder["col_embedding"],
  }
  if shardings is not None:
    out = shardings["encoder"]["image_context"]
  else:
    out = jax.tree_util.tree_map(lambda x: x.sharding, head)
  # Copies, not the same buffers twice: the train step donates its state.
  head = jax.jit(lambda tree: jax.tree_util.tree_map(jnp.copy, tree), out_shardings=out)(head)
  return {**params, "encoder": {**params["encoder"], "image_context": head}}


def unstack_layers(params, config: PartiConfig) -> tuple[dict, PartiConfig]:
  """Scanned parameters as the unrolled model's: ({... "layers_0": ..., ...}, config).

  Each tower's stacked `layers` subtree (leading axis: the layer) becomes one
  subtree per layer, named as `_stack` names unrolled layers. Decoding uses this:
  inside a scan over layers, every decoding step would copy each layer's slice of
  the stacked KV cache out and back in, which costs a full cache copy per token.
  """
  if not config.scan_layers:
    return params, config
  out = dict(params)
  for tower, count in (
    ("encoder", config.num_encoder_layers),
    ("decoder", config.num_decoder_layers),
  ):
    tree = dict(params[tower])
    stacked = tree.pop("layers")
    for i in range(count):
      tree[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    out[tower] = tree
  return out, config.replace(scan_layers=False)


class RelativePositionBias(nn.Module):
  """T5's learned per-head bias over relative-position buckets, [1, heads, q, k]."""

  num_heads: int
  num_buckets: int
  max_distance: int

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    positions = jnp.arange(length)
    buckets = relative_position_bucket(
      positions[None, :] - positions[:, None], self.num_buckets, self.max_distance
    )
    table = self.param(
      "rel_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(0.1), ("heads", "relpos_buckets")),
      (self.num_heads, self.num_buckets),
      jnp.float32,
    )
    return jnp.take(table, buckets, axis=1)[None]


class EncoderLayer(nn.Module):
  """A text encoder block, shaped (carry, *broadcast) -> (carry, None) for `nn.scan`."""

  config: PartiConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask, bias):
    cfg = self.config
    x = layers.EncoderBlock(
      cfg.num_heads,
      cfg.mlp_dim,
      jnp.dtype(cfg.dtype),
      cfg.norm,
      cfg.gated_mlp,
      cfg.dropout_rate,
      head_dim=cfg.per_head_dim,
      num_kv_heads=cfg.kv_heads,
      name="block",
    )(x, mask, bias, self.deterministic)
    return x, None


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention, cross-attention to the text, and an MLP."""

  config: PartiConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x, encoded, encoder_mask, self_mask):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)

    def dropout(y):
      return nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)

    x = nn.with_logical_constraint(x, layers.ACTIVATION_AXES)
    y = layers.Norm(cfg.norm, name="pre_self_attention_norm")(x)
    y = layers.Attention(
      cfg.num_heads,
      cfg.per_head_dim,
      dtype,
      cfg.dropout_rate,
      max_length=cfg.image_length,
      transposed_key_cache=cfg.transposed_key_cache,
      num_kv_heads=cfg.kv_heads,
      name="self_attention",
    )(y, y, self_mask, None, self.deterministic, self.decode)
    x = x + dropout(y)
    y = layers.Norm(cfg.norm, name="pre_cross_attention_norm")(x)
    y = layers.Attention(
      cfg.num_heads, cfg.per_head_dim, dtype, cfg.dropout_rate, cross=True,
      transposed_key_cache=cfg.transposed_key_cache, num_kv_heads=cfg.kv_heads,
      name="cross_attention",
    )(y, encoded, encoder_mask, None, self.deterministic, self.decode)  # fmt: skip
    x = x + dropout(y)
    y = layers.Norm(cfg.norm, name="pre_mlp_norm")(x)
    y = layers.Mlp(cfg.mlp_dim, dtype, cfg.gated_mlp, cfg.dropout_rate, name="mlp")(
      y, self.deterministic
    )
    x = x + dropout(y)
    return nn.with_logical_constraint(x.astype(jnp.float32), layers.ACTIVATION_AXES), None


def _stack(layer_cls, config: PartiConfig, num_layers: int, name: str, **attributes):
  """`num_layers` layers as one scanned module, or as a Python loop of named ones."""
  if config.remat_policy != "none":
    layer_cls = nn.remat(
      layer_cls, policy=_remat_policy(config.remat_policy), prevent_cse=not config.scan_layers
    )
  if config.scan_layers:
    scanned = nn.scan(
      layer_cls,
      variable_axes={"params": 0, "cache": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=nn.broadcast,
      length=num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )(config, name=name, **attributes)
    return lambda x, *args: scanned(x, *args)[0]

  def loop(x, *args):
    for i in range(num_layers):
      x, _ = layer_cls(config, name=f"{name}_{i}", **attributes)(x, *args)
    return x

  return loop


class TextEncoder(nn.Module):
  """SentencePiece tokens (and, with `edit_context`, the image being edited) -> encoded
  [B, L, D] and its key mask [B, 1, 1, L]: L is the text's length, plus image_length."""

  config: PartiConfig

  @nn.compact
  def __call__(
    self, tokens: jax.Array, context: jax.Array | None = None, deterministic: bool = True
  ):
    cfg = self.config
    embed = _token_embedding(cfg.text_vocab_size, cfg.embed_dim)
    x = embed(tokens)
    length = tokens.shape[1]
    if cfg.text_positions == "learned":
      if length > cfg.text_length:
        raise ValueError(f"{length} text tokens exceed text_length {cfg.text_length}.")
      positions = self.param(
        "position_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
        (cfg.text_length, cfg.embed_dim),
        jnp.float32,
      )
      x = x + positions[None, :length]
    mask = tokens > 0
    if cfg.edit_context:
      if context is None:  # No image: every token to draw, i.e. plain generation.
        context = jnp.full((tokens.shape[0], cfg.image_length), cfg.mask_id, jnp.int32)
      x = jnp.concatenate([x, ImageContext(cfg, name="image_context")(context)], axis=1)
      mask = jnp.concatenate([mask, jnp.ones(context.shape, bool)], axis=1)
    elif context is not None:
      raise ValueError("An image context was given to a model without edit_context.")
    bias = None
    if cfg.text_positions == "relative":
      bias = RelativePositionBias(
        cfg.num_heads, cfg.relative_buckets, cfg.relative_max_distance, name="relative_bias"
      )(x.shape[1])
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    mask = mask[:, None, None, :]
    x = _stack(EncoderLayer, cfg, cfg.num_encoder_layers, "layers", deterministic=deterministic)(
      x, mask, bias
    )
    return layers.Norm(cfg.norm, name="final_norm")(x), mask


class ImageContext(nn.Module):
  """The editing head's input: the image's tokens, `mask_id` where to redraw, embedded
  with their row and column in the grid: [B, N] -> [B, N, D]. `with_edit_context`
  starts these tables from the decoder's, so that fine-tuning starts from codes and
  places the model already knows."""

  config: PartiConfig

  @nn.compact
  def __call__(self, context: jax.Array) -> jax.Array:
    cfg = self.config
    embed = _token_embedding(cfg.image_vocab_size + 1, cfg.embed_dim)  # + the mask id
    return embed(context) + _grid_embedding(self, cfg)(jnp.arange(context.shape[1]))


class ImageDecoder(nn.Module):
  """Image tokens (BOS first) and encoded text -> float32 logits over the image codes."""

  config: PartiConfig

  @nn.compact
  def __call__(
    self,
    tokens: jax.Array,
    encoded: jax.Array | None,
    encoder_mask: jax.Array,
    deterministic: bool = True,
    decode: bool = False,
  ) -> jax.Array:
    cfg = self.config
    embed = _token_embedding(cfg.image_vocab_size + 1, cfg.embed_dim)  # + BOS
    length = tokens.shape[1]
    positions = jnp.arange(length)
    if decode:
      # Where this call's tokens sit in the image: after all previously decoded ones.
      start = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      positions = positions + start.value
      start.value = start.value + length
    previous = tokens  # Token t - 1 at each position t, BOS first.
    tokens = self._shift_by_patch(tokens, decode)
    # At the scale of the token embeddings they are added to (_EMBED_INIT): at 0.02
    # a token's place in the grid was 2% of its input and, after the pre-norm, near
    # invisible, so small runs learned where objects go (and so what the prompt
    # asks for there) very late.
    x = embed(tokens) + _grid_embedding(self, cfg)(positions)
    if cfg.tokens_per_patch > 1:
      x = x + self._token_before(embed, previous, positions)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    causal = nn.make_causal_mask(tokens, dtype=jnp.bool_)
    x = _stack(
      DecoderLayer,
      cfg,
      cfg.num_decoder_layers,
      "layers",
      deterministic=deterministic,
      decode=decode,
    )(x, encoded, encoder_mask, causal)
    x = layers.Norm(cfg.norm, name="final_norm")(x)
    if cfg.tie_image_embeddings:
      # Only the codes' rows (not BOS or the padding) make logits, so the logits come
      # out at their final width: slicing [B, N, padded vocab] logits instead costs a
      # copy of the largest activation of the model, forward and backward. The input
      # is scaled (T5's 1/sqrt(embed_dim), so that tied logits start at the scale of
      # an untied projection) rather than the 30x larger logits.
      codes = embed.embedding[: cfg.image_vocab_size].astype(jnp.float32)
      scaled = x.astype(jnp.float32) / jnp.sqrt(cfg.embed_dim).astype(jnp.float32)
      logits = jnp.dot(
        scaled.reshape(-1, cfg.embed_dim), codes.T, preferred_element_type=jnp.float32
      ).reshape(*x.shape[:-1], cfg.image_vocab_size)
    else:
      logits = layers.dense(
        cfg.image_vocab_size, ("embed", "vocab"), jnp.float32, name="logits"
      )(x)  # fmt: skip
    if cfg.tokens_per_patch > 1:
      # A position draws only among its own group's codes.
      per_group = cfg.image_vocab_size // cfg.tokens_per_patch
      group = jnp.arange(cfg.image_vocab_size) // per_group
      own = group[None, :] == (positions % cfg.tokens_per_patch)[:, None]
      logits = jnp.where(own[None], logits, _OTHER_GROUP_LOGIT)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def _token_before(self, embed, previous: jax.Array, positions: jax.Array) -> jax.Array:
    """With several tokens per patch, the token just before each patch's first
    position, which ends the previous patch: the shift alone would hide it from that
    position. The patch's later positions get nothing more: the token before them is
    of their own patch. (A learned 1-dimensional view of it, which could have said
    "this patch draws something" without the color, carried the color: bench/README.md.)
    """
    first = (positions % self.config.tokens_per_patch == 0)[None, :, None]
    return jnp.where(first, embed(previous), 0.0)

  def _shift_by_patch(self, tokens: jax.Array, decode: bool) -> jax.Array:
    """Inputs shifted by one token (BOS first: what training, the feature converter
    and the samplers feed) -> shifted by a whole patch, so that position t reads
    token t - tokens_per_patch and none of its own patch's tokens.

    Position t is fed token t - 1 by its callers; it must read the one fed
    tokens_per_patch - 1 positions earlier. In decoding, which feeds a few positions
    per call, the last tokens_per_patch - 1 fed tokens wait in the cache.
    """
    delay = self.config.tokens_per_patch - 1
    if not delay:
      return tokens
    bos = self.config.bos_id
    if decode:
      waiting = self.variable(
        "cache", "waiting_tokens", lambda: jnp.full((tokens.shape[0], delay), bos, jnp.int32)
      )
      fed = jnp.concatenate([waiting.value, tokens], axis=1)
      waiting.value = fed[:, -delay:]
    else:
      fed = jnp.concatenate([jnp.full((tokens.shape[0], delay), bos, tokens.dtype), tokens], axis=1)
    return fed[:, : tokens.shape[1]]


# Logits of codes outside a position's group (tokens_per_patch > 1): finite, so that
# guidance's cond - uncond stays 0 there instead of inf - inf.
_OTHER_GROUP_LOGIT = -1e9


class Parti(nn.Module):
  """The encoder-decoder. `__call__` is the teacher-forced forward of training."""

  config: PartiConfig

  def setup(self):
    cfg = self.config
    self.encoder = TextEncoder(cfg)
    self.decoder = ImageDecoder(cfg)
    if cfg.null_condition == "learned":
      self.null_embedding = self.param(
        "null_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
        (1, cfg.embed_dim),
        jnp.float32,
      )

  def null_tokens(self, batch: int, length: int) -> jax.Array:
    """The tokens of an empty prompt: EOS (1), then padding."""
    return jnp.zeros((batch, length), jnp.int32).at[:, 0].set(1)

  def condition_dropout(self, batch: int) -> jax.Array:
    """Which examples train on the null condition: bool [batch], each with cfg_dropout_rate."""
    return jax.random.bernoulli(self.make_rng("dropout"), self.config.cfg_dropout_rate, (batch,))

  def encode(
    self,
    encoder_input_tokens: jax.Array,
    enable_dropout: bool = False,
    null: jax.Array | None = None,
    edit_context: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    """Text tokens [B, T] -> (encoded [B, L, D], key mask [B, 1, 1, L]); L = T, plus
    image_length with the editing head.

    Args:
      encoder_input_tokens: padded SentencePiece ids (0 = padding).
      enable_dropout: training mode (dropout, and null-condition dropout if
        `null` is not given and cfg_dropout_rate > 0).
      null: bool [B]: examples to encode as the null condition instead. The
        sampler passes all-True for the unconditional half of guidance.
      edit_context: with `config.edit_context`, the image tokens [B, N] to edit, with
        `config.mask_id` where to redraw (None: all of them). The null condition
        drops the text only: guidance then weighs the prompt against the image alone.
    """
    cfg = self.config
    tokens = encoder_input_tokens
    if null is None and enable_dropout and cfg.cfg_dropout_rate > 0:
      null = self.condition_dropout(tokens.shape[0])
    if null is not None and (cfg.null_condition == "empty" or cfg.edit_context):
      # With an image context the learned null vector below replaces the text's outputs,
      # but the image's are encoded with the text too: an empty prompt keeps them clean.
      tokens = jnp.where(null[:, None], self.null_tokens(*tokens.shape), tokens)
    encoded, mask = self.encoder(tokens, edit_context, deterministic=not enable_dropout)
    if null is not None and cfg.null_condition == "learned":
      # The learned null condition is one encoder output vector, at position 0; the
      # image context's positions (after the text) are kept.
      text = jnp.arange(encoded.shape[1]) < tokens.shape[1]
      learned = jnp.zeros_like(encoded).at[:, 0].set(self.null_embedding[0])
      null_rows = null[:, None, None] & text[None, :, None]
      encoded = jnp.where(null_rows, learned, encoded)
      null_mask = (jnp.arange(encoded.shape[1]) == 0) | ~text
      mask = jnp.where(null[:, None, None, None], null_mask[None, None, None, :], mask)
    return encoded, mask

  def decode(
    self,
    decoder_input_tokens: jax.Array,
    encoded: jax.Array | None,
    encoder_mask: jax.Array,
    enable_dropout: bool = False,
    use_cache: bool = False,
  ) -> jax.Array:
    """Image tokens -> logits. With `use_cache=True`, reads and extends the KV cache;
    after the first (prefill) call `encoded` may be None: cross-attention reads
    its cached keys and values."""
    return self.decoder(
      decoder_input_tokens,
      encoded,
      encoder_mask,
      deterministic=not enable_dropout,
      decode=use_cache,
    )

  def __call__(
    self,
    encoder_input_tokens: jax.Array,
    decoder_input_tokens: jax.Array,
    enable_dropout: bool = False,
    edit_context: jax.Array | None = None,
  ) -> jax.Array:
    encoded, mask = self.encode(encoder_input_tokens, enable_dropout, edit_context=edit_context)
    return self.decode(decoder_input_tokens, encoded, mask, enable_dropout)


def dummy_inputs(config: PartiConfig, batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
  """(text, image tokens) of the model's shapes, for initialization and shape tracing."""
  return (
    jnp.ones((batch_size, config.text_length), jnp.int32),
    jnp.zeros((batch_size, config.image_length), jnp.int32),
  )


def init_params(config: PartiConfig, rng: jax.Array, batch_size: int = 1):
  """The model's initial parameters, boxed with their logical axes."""
  return Parti(config).init(rng, *dummy_inputs(config, batch_size))["params"]


def abstract_params(config: PartiConfig):
  """The parameter tree's shapes and dtypes, without allocating it (boxed with logical axes)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
