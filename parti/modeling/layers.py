"""Transformer layers shared by the tokenizer's ViTs and the Parti encoder-decoder.

Precision follows Parti: parameters are float32; projections and MLPs compute in
`dtype` (bfloat16 on accelerators); norms, softmax and logits stay float32. Every
parameter carries logical axis names, and block outputs are constrained to
(`batch`, `length`, `embed`), so `parti.partitioning` alone decides the layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = jnp.dtype | str
Initializer = Callable[..., jax.Array]

ACTIVATION_AXES = ("batch", "length", "embed")
_LECUN_NORMAL = nn.initializers.lecun_normal()


class DenseGeneral(nn.Module):
  """A linear map over one or more input axes to one or more output axes.

  Written here rather than taken from flax: `nn.DenseGeneral` initializes a
  multi-axis kernel flat and reshapes the boxed value, which breaks logical
  constraints under a mesh. This one creates the kernel at its full shape
  (initialized with the fan-in and fan-out of the flattened matrix) and carries
  `kernel_axes` from the start.
  """

  features: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  axis: tuple[int, ...] = (-1,)
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = _LECUN_NORMAL

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    axis = tuple(a % x.ndim for a in self.axis)
    in_shape = tuple(x.shape[a] for a in axis)
    shape = in_shape + self.features
    if len(self.kernel_axes) != len(shape):
      raise ValueError(f"kernel_axes {self.kernel_axes} do not match the kernel shape {shape}.")

    def init(rng, shape, dtype):
      flat = (math.prod(in_shape), math.prod(self.features))
      return self.kernel_init(rng, flat, dtype).reshape(shape)

    kernel = self.param(
      "kernel", nn.with_logical_partitioning(init, self.kernel_axes), shape, jnp.float32
    )
    if axis == tuple(range(x.ndim - len(axis), x.ndim)):
      # Contracting trailing axes: one 2-D matmul over [positions, inputs]. XLA:CPU
      # runs the backward pass's weight gradient ~20% faster this way than as a
      # dot_general with several contracting axes (which it transposes first).
      batch_shape = x.shape[: x.ndim - len(axis)]
      fan_in, fan_out = math.prod(in_shape), math.prod(self.features)
      y = jnp.dot(
        x.reshape(-1, fan_in).astype(self.dtype),
        kernel.reshape(fan_in, fan_out).astype(self.dtype),
        preferred_element_type=self.dtype,
      ).reshape(*batch_shape, *self.features)
    else:
      contract = (axis, tuple(range(len(axis))))
      y = jax.lax.dot_general(
        x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())),
        preferred_element_type=self.dtype,
      )  # fmt: skip
    if self.use_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[len(axis) :]),
        self.features,
        jnp.float32,
      )
      y = y + bias.astype(self.dtype)
    return y


def dense(
  features: int | Sequence[int],
  axes: tuple[str | None, ...],
  dtype: Dtype,
  axis: int | Sequence[int] = -1,
  init: Initializer = _LECUN_NORMAL,
  use_bias: bool = False,
  name: str | None = None,
) -> DenseGeneral:
  """A DenseGeneral whose kernel has logical `axes` (input axes first)."""
  features = (features,) if isinstance(features, int) else tuple(features)
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  return DenseGeneral(features, tuple(axes), axis, use_bias, jnp.dtype(dtype), init, name=name)


class Norm(nn.Module):
  """LayerNorm (Parti's) or RMSNorm, computed in float32."""

  kind: str = "layernorm"
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ones = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
    zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
    x = x.astype(jnp.float32)
    if self.kind == "layernorm":
      return nn.LayerNorm(
        epsilon=self.epsilon, dtype=jnp.float32, scale_init=ones, bias_init=zeros
      )(x)
    if self.kind == "rmsnorm":
      return nn.RMSNorm(epsilon=self.epsilon, dtype=jnp.float32, scale_init=ones)(x)
    raise ValueError(f"Unknown norm {self.kind!r}; use 'layernorm' or 'rmsnorm'.")


class Mlp(nn.Module):
  """The feed-forward block: two matrices (Parti), or gated-GELU (three) as an option."""

  mlp_dim: int
  dtype: Dtype = jnp.float32
  gated: bool = False
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    embed = x.shape[-1]
    hidden = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, use_bias=not self.gated, name="wi")(
      x
    )
    if self.gated:
      gate = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, name="wi_gate")(x)
      hidden = nn.gelu(gate) * hidden
    else:
      hidden = nn.gelu(hidden)
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
    return dense(embed, ("mlp", "embed"), self.dtype, use_bias=not self.gated, name="wo")(hidden)


class Attention(nn.Module):
  """Multi-head dot-product attention with logical axes; softmax in float32.

  `mask` ([batch, 1 or heads, q_length, kv_length], True = attend) and `bias`
  (added to the logits, e.g. T5's relative position bias) are optional.

  With `decode=True` the layer keeps keys and values in the `cache` collection:
  * self-attention (`cross=False`): the first call writes its n positions into a
    cache of `max_length` and attends causally among them (a prefill); each later
    call appends its positions at the cache index and attends to everything
    written so far. `mask` is then ignored.
  * cross-attention (`cross=True`): the keys and values of `inputs_kv` (the
    encoder output) are computed by the first call and only read afterwards, so a
    decoding step costs nothing per text token but the dot products.

  Both caches keep values as [batch, kv_heads, length, head_dim], and keys in the
  same layout or, with `transposed_key_cache`, as [batch, kv_heads, head_dim,
  length]; see `dot_product_attention` for which suits which decoder.

  `num_kv_heads` below `num_heads` shares each key and value head among
  num_heads / num_kv_heads consecutive query heads: grouped-query attention
  (Ainslie et al. 2023), and multi-query attention (Shazeer 2019) at one. The key
  and value projections and the caches shrink by that factor; the keys' and values'
  head axis is then the logical `kv_heads` (see `parti.partitioning`).
  """

  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  cross: bool = False
  max_length: int = 0
  transposed_key_cache: bool = False
  num_kv_heads: int | None = None  # Default: num_heads.

  @property
  def kv_heads(self) -> int:
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {kv_heads}.")
    return kv_heads

  @nn.compact
  def __call__(
    self,
    inputs_q: jax.Array,
    inputs_kv: jax.Array | None,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    deterministic: bool = True,
    decode: bool = False,
  ) -> jax.Array:
    shape = (self.num_heads, self.head_dim)
    axes = ("embed", "heads", "kv")
    qkv_axes = ("batch", "length", "heads", "kv")
    query = dense(shape, axes, self.dtype, name="query")(inputs_q)
    query = nn.with_logical_constraint(query, qkv_axes)
    if self.kv_heads < self.num_heads:
      shape = (self.kv_heads, self.head_dim)
      axes = ("embed", "kv_heads", "kv")
      qkv_axes = ("batch", "length", "kv_heads", "kv")
    initialized = self.has_variable("cache", "cached_key")
    cached = False  # Keys and values in the caches' layouts (see the class docstring)?
    if decode and self.cross and initialized:
      key = self.get_variable("cache", "cached_key")
      value = self.get_variable("cache", "cached_value")
      cached = True
    else:
      key = dense(shape, axes, self.dtype, name="key")(inputs_kv)
      value = dense(shape, axes, self.dtype, name="value")(inputs_kv)
      key = nn.with_logical_constraint(key, qkv_axes)
      value = nn.with_logical_constraint(value, qkv_axes)
    if decode and self.cross and not initialized:
      self.put_variable("cache", "cached_key", self._cached_key_layout(key))
      self.put_variable("cache", "cached_value", _heads_major(value))
    elif decode and not self.cross:
      key, value, mask, cached = self._update_self_cache(key, value, mask, initialized)
    out = dot_product_attention(
      query, key, value, mask, bias, self.dropout_rate, deterministic, self.make_rng,
      kv_heads_major=cached, keys_transposed=cached and self.transposed_key_cache,
    )  # fmt: skip
    return dense(
      inputs_q.shape[-1], ("heads", "kv", "embed"), self.dtype, axis=(-2, -1), name="out"
    )(out)

  def _update_self_cache(self, key, value, mask, initialized):
    """Writes this call's keys and values into the cache; returns what to attend to.

    The cache is kept heads-major, [batch, heads, max_length, head_dim] (keys
    optionally [batch, heads, head_dim, max_length]), the layouts the attention
    matmuls read: in [batch, length, heads, head_dim] XLA would
    transpose the whole cache at every decoding step, which makes a step cost
    O(max_length) in memory traffic (10x slower sampling at 1024 tokens).
    """
    if self.max_length < key.shape[1]:
      raise ValueError(f"Decoding {key.shape[1]} positions into a cache of {self.max_length}.")
    batch, length = key.shape[:2]
    cache_shape = (batch, self.kv_heads, self.max_length, self.head_dim)
    transposed_shape = (batch, self.kv_heads, self.head_dim, self.max_length)
    key_shape = transposed_shape if self.transposed_key_cache else cache_shape
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key_shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, cache_shape, value.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not initialized:
      # The prefill: attend among this call's positions with the caller's mask.
      start = jnp.zeros((), jnp.int32)
    else:
      start = index.value
      positions = start + jnp.arange(length)
      # The cache may be handed in shorter than max_length (a window holding every
      # position written so far: see `decoding.sample`), so mask by its own length.
      window = cached_value.value.shape[2]
      mask = (jnp.arange(window)[None, :] <= positions[:, None])[None, None]
    key_start = (0, 0, 0, start) if self.transposed_key_cache else (0, 0, start, 0)
    cached_key.value = jax.lax.dynamic_update_slice(
      cached_key.value, self._cached_key_layout(key), key_start
    )
    cached_value.value = jax.lax.dynamic_update_slice(
      cached_value.value, _heads_major(value), (0, 0, start, 0)
    )
    index.value = start + length
    if not initialized:
      return key, value, mask, False
    return cached_key.value, cached_value.value, mask, True

  def _cached_key_layout(self, key: jax.Array) -> jax.Array:
    """Keys [batch, length, heads, head_dim] in the cache's layout."""
    return _keys_transposed(key) if self.transposed_key_cache else _heads_major(key)


def _heads_major(x: jax.Array) -> jax.Array:
  """[batch, length, heads, head_dim] -> [batch, heads, length, head_dim] (any heads)."""
  return jnp.swapaxes(x, 1, 2)


def _keys_transposed(x: jax.Array) -> jax.Array:
  """[batch, length, heads, head_dim] -> [batch, heads, head_dim, length]."""
  return jnp.transpose(x, (0, 2, 3, 1))


def dot_product_attention(
  query, key, value, mask, bias, dropout_rate, deterministic, make_rng,
  kv_heads_major=False, keys_transposed=False,
):  # fmt: skip
  """softmax(q k^T / sqrt(d) + bias, masked) v, the logits and softmax in float32.

  Args are [batch, length, heads, head_dim] (keys and values [batch, heads, length,
  head_dim] if `kv_heads_major`, keys [batch, heads, head_dim, length] if also
  `keys_transposed`); returns [batch, q_length, heads, head_dim]. Keys and values
  may have fewer heads than the query, a divisor of its count (grouped-query
  attention): query head i then reads key and value head i // (heads / kv_heads).

  Which key layout is faster depends on the query's length, on XLA:CPU's matmul
  library: against keys as [.., length, head_dim] it transposes the keys at every
  call once there are several query positions (a Jacobi window of 8 on the tiny
  model: the scores took 6x the value mix's time), while at one position per call
  the transposed layout made the matched sampling benchmark 15% slower.
  """
  depth = query.shape[-1]
  kv_heads = key.shape[1 if kv_heads_major else 2]
  if kv_heads < query.shape[2]:
    return _grouped_attention(
      query, key, value, mask, bias, dropout_rate, deterministic, make_rng,
      kv_heads_major, keys_transposed,
    )  # fmt: skip
  kv = "bhkd" if kv_heads_major else "bkhd"
  key_spec = "bhdk" if keys_transposed else kv
  logits = jnp.einsum(f"bqhd,{key_spec}->bhqk", query, key, preferred_element_type=jnp.float32)
  weights = _attention_weights(logits, depth, mask, bias, dropout_rate, deterministic, make_rng)
  if kv_heads_major:
    # A batched matmul over (batch, heads), then the heads moved back: asked for
    # [b, q, h, d] directly, XLA:CPU ran this with its slow generic dot once q > 1
    # (67 us per layer and call for a 4-token Jacobi window, against 2 us).
    mixed = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(value.dtype), value)
    return jnp.swapaxes(mixed, 1, 2)
  return jnp.einsum(f"bhqk,{kv}->bqhd", weights.astype(value.dtype), value)


def _attention_weights(logits, depth, mask, bias, dropout_rate, deterministic, make_rng):
  """Scaled, biased, masked logits [..., k] -> softmax weights over k (float32)."""
  logits = logits / jnp.sqrt(depth).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0 and not deterministic:
    keep = jax.random.bernoulli(make_rng("dropout"), 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  return weights


def _grouped_attention(
  query, key, value, mask, bias, dropout_rate, deterministic, make_rng,
  kv_heads_major, keys_transposed,
):  # fmt: skip
  """`dot_product_attention` with fewer key and value heads than query heads.

  The query's heads are split as [kv_heads, group], and each key head meets its
  group's queries, every position's, in one matmul: [q_length * group, head_dim] x
  [head_dim, kv_length] per example and key head, as multi-query attention is meant
  to run, rather than the keys copied out to every query head. The logits are laid
  out [batch, kv_heads, q_length, group, kv_length], so that with one key head the
  query and the output are their [batch, length, heads, head_dim] selves reshaped,
  with no transposes.
  """
  batch, length, heads, depth = query.shape
  kv_heads = key.shape[1 if kv_heads_major else 2]
  group = heads // kv_heads

  def grouped(x):
    """[b, 1 or heads, q, k] -> [b, 1 or kv_heads, q, 1 or group, k]."""
    if x.shape[1] == 1:
      return x[:, :, :, None, :]
    x = x.reshape(x.shape[0], kv_heads, group, *x.shape[2:])
    return jnp.swapaxes(x, 2, 3)

  kv = "bgkd" if kv_heads_major else "bkgd"
  key_spec = "bgdk" if keys_transposed else kv
  logits = jnp.einsum(
    f"bqgrd,{key_spec}->bgqrk",
    query.reshape(batch, length, kv_heads, group, depth),
    key,
    preferred_element_type=jnp.float32,
  )
  weights = _attention_weights(
    logits, depth, None if mask is None else grouped(mask), None if bias is None else grouped(bias),
    dropout_rate, deterministic, make_rng,
  )  # fmt: skip
  mixed = jnp.einsum(f"bgqrk,{kv}->bqgrd", weights.astype(value.dtype), value)
  return mixed.reshape(batch, length, heads, depth)


class EncoderBlock(nn.Module):
  """Pre-norm self-attention and MLP, each with a residual connection."""

  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  norm: str = "layernorm"
  gated_mlp: bool = False
  dropout_rate: float = 0.0
  head_dim: int | None = None  # Default: embed // num_heads.
  num_kv_heads: int | None = None  # Default: num_heads (see `Attention`).

  @nn.compact
  def __call__(
    self, x: jax.Array, mask: jax.Array | None = None, bias=None, deterministic: bool = True
  ) -> jax.Array:
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    head_dim = self.head_dim or x.shape[-1] // self.num_heads
    y = Norm(self.norm, name="pre_attention_norm")(x)
    y = Attention(
      self.num_heads, head_dim, self.dtype, self.dropout_rate,
      num_kv_heads=self.num_kv_heads, name="attention",
    )(y, y, mask, bias, deterministic)  # fmt: skip
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = Norm(self.norm, name="pre_mlp_norm")(x)
    y = Mlp(self.mlp_dim, self.dtype, self.gated_mlp, self.dropout_rate, name="mlp")(
      y, deterministic
    )
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    return nn.with_logical_constraint(x.astype(jnp.float32), ACTIVATION_AXES)


def sincos_2d(height: int, width: int, dim: int) -> jax.Array:
  """Fixed 2-D sine-cosine position embeddings, [height * width, dim] (MAE, ViT-VQGAN)."""
  if dim % 4:
    raise ValueError(f"2-D sincos embeddings need a dim divisible by 4, got {dim}.")
  rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
  omega = 1.0 / 10000 ** (jnp.arange(dim // 4) / (dim // 4))
  parts = []
  for grid in (rows, cols):
    angles = grid.reshape(-1, 1).astype(jnp.float32) * omega[None]
    parts += [jnp.sin(angles), jnp.cos(angles)]
  return jnp.concatenate(parts, axis=1)


# --- Images as patch sequences, and unit vectors (the tokenizer's and the reranker's) -----


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], row-major patches."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, grid: tuple[int, int]) -> jax.Array:
  """The inverse of `patchify`."""
  b, _, d = patches.shape
  c = d // (patch * patch)
  x = patches.reshape(b, grid[0], grid[1], patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, grid[0] * patch, grid[1] * patch, c)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
  """x scaled to unit l2 norm along `axis` (eps keeps zero vectors finite)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))
