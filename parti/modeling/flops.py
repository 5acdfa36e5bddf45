"""Measured matmul throughput: the peak that model FLOP utilization (MFU) is quoted against.

Vendor peaks do not exist for a CPU, and even on accelerators the achievable
peak differs from the data sheet, so benchmarks measure it in the same run as
the workload they report.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class MatmulPeak:
  """The best observed throughput of square matmuls on one device.

  Attributes:
    flops_per_second: best over the trials.
    size: side of the square matrices.
    dtype: their dtype.
    device: the device measured, as a string.
  """

  flops_per_second: float
  size: int
  dtype: str
  device: str


def measure_matmul_peak(
  size: int = 1024,
  dtype: str = "float32",
  matmuls_per_trial: int = 8,
  trials: int = 5,
  device: jax.Device | None = None,
) -> MatmulPeak:
  """Times chains of `size`×`size` matmuls on `device` and returns the best rate.

  A chain runs inside one jitted `fori_loop`, so dispatch overhead is paid once
  per trial rather than per matmul. The best trial stands for the peak: slower
  ones measure interference from whatever else the machine runs.

  Args:
    size: side of the square matrices.
    dtype: a jnp dtype name such as "float32" or "bfloat16".
    matmuls_per_trial: matmuls chained inside one timed call.
    trials: timed calls; the fastest is kept.
    device: where to run (default: the first device).

  Returns:
    The measured peak.
  """
  if size < 1 or matmuls_per_trial < 1 or trials < 1:
    raise ValueError("size, matmuls_per_trial and trials must all be positive.")
  device = device or jax.devices()[0]
  dtype = jnp.dtype(dtype)
  rng = np.random.default_rng(0)
  # An orthogonal matrix keeps the chained product's scale constant.
  q, _ = np.linalg.qr(rng.standard_normal((size, size)))
  x = jax.device_put(jnp.asarray(rng.standard_normal((size, size)), dtype), device)
  w = jax.device_put(jnp.asarray(q, dtype), device)

  @jax.jit
  def chain(x, w):
    return jax.lax.fori_loop(0, matmuls_per_trial, lambda _, y: y @ w, x)

  chain(x, w).block_until_ready()  # Compile and warm up.
  best = float("inf")
  for _ in range(trials):
    start = time.perf_counter()
    chain(x, w).block_until_ready()
    best = min(best, time.perf_counter() - start)
  flops = 2.0 * size**3 * matmuls_per_trial
  return MatmulPeak(flops / best, size, dtype.name, str(device))


def parti_forward_flops(config, text_length: int | None = None) -> float:
  """Model FLOPs of one example's teacher-forced forward pass through Parti.

  Counts the matmuls (projections, MLPs, attention scores and mixing, logits) at
  2 FLOPs per multiply-add; full (not causal-halved) attention, as PaLM's MFU
  does. Norms, softmax and embedding lookups are negligible and left out. The
  editing head's image context lengthens what the encoder reads and the decoder
  attends to.
  """
  t = (text_length or config.text_length) + (config.image_length if config.edit_context else 0)
  n = config.image_length
  d, m, hd = config.embed_dim, config.mlp_dim, config.num_heads * config.per_head_dim
  kvd = config.kv_heads * config.per_head_dim  # Keys' and values' width (grouped: less).
  mlp_mats = 3 if config.gated_mlp else 2
  encoder_layer = 2 * (2 * t * d * (hd + kvd) + mlp_mats * t * d * m + 2 * t * t * hd)
  decoder_layer = 2 * (
    2 * n * d * (hd + kvd)  # self-attention projections
    + 2 * n * d * hd
    + 2 * t * d * kvd  # cross-attention: q, out on images; k, v on text
    + mlp_mats * n * d * m
    + 2 * n * n * hd  # self-attention scores and mixing
    + 2 * n * t * hd  # cross-attention scores and mixing
  )
  logits = 2 * n * d * config.image_vocab_size
  return float(
    config.num_encoder_layers * encoder_layer + config.num_decoder_layers * decoder_layer + logits
  )


def parti_train_flops(config, batch_size: int, text_length: int | None = None) -> float:
  """Model FLOPs of one training step: forward plus backward (3x), rematerialization excluded."""
  return 3.0 * batch_size * parti_forward_flops(config, text_length)
