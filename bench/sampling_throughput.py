"""Sampling throughput: image tokens/s of KV-cached decoding with classifier-free guidance.

    python bench/sampling_throughput.py [--configs=tiny,small,matched] [--batch=8]
    python bench/sampling_throughput.py --configs=350m --dtype=bfloat16   # on a GPU

One device, random parameters, one prompt batch, guidance on (scale 1.2, so both
streams run as one doubled batch), top-k 64 sampling. For each config it times
the whole `decoding.sample` call (encoder, prefill, every decoder step) at a
16x16 (256) and a 32x32 (1024) token grid and reports how per-image time grows:
with a KV cache each step costs O(position), so 4x the tokens costs about 4x at
small grids (the attention share grows with length, so somewhat more), where
re-running the whole prefix at every step costs about 16x.

Configs (256 / 1024 tokens):
  tiny     gin/models/parti_tiny.gin's shape (2 + 4 layers, width 128, 512 codes)
  small    4 + 8 layers, width 512, 8 heads, MLP 2048, 8192 codes
  matched  parti-pytorch 0.2.0's decoder (bench/peer.py): width 256, 4 decoder layers,
           4 query heads of 64 sharing one key and value head (multi-query, as the
           peer's), 512 codes, batch 4, 256 tokens; 1 text-encoder layer over a
           128-piece vocabulary where the peer reads T5 embeddings. When the peer is
           installed (pip install -e .[peer]) it samples the same batch just after
           ours: it has no KV cache and runs guidance as two passes.
  matched_mha  the same with 4 key and value heads (the matched shape until 2026-12-03)
  350m     the paper's 350M, for accelerators
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import peer
from absl import app, flags
from flax import linen as nn

from parti.modeling import model
from parti.modeling.config import PartiConfig
from parti.sampling import decoding

_CONFIGS = flags.DEFINE_list("configs", ["tiny", "small", "matched"], "Configs to measure.")
_BATCH = flags.DEFINE_integer("batch", 8, "Prompts per batch (matched uses 4).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_REPEATS = flags.DEFINE_integer(
  "repeats",
  2,
  "Timed calls per measurement, at least (the best is kept; short calls repeat "
  "until 5 s are timed).",
)

MIN_SECONDS = 5.0
GUIDANCE_SCALE = 1.2  # Not 1, so that both streams run (ours: one doubled batch).

BASE = dict(text_vocab_size=16384, text_length=32, cfg_dropout_rate=0.1)
CONFIGS = {
  "tiny": dict(
    text_vocab_size=128, image_vocab_size=512, num_encoder_layers=2, num_decoder_layers=4,
    embed_dim=128, mlp_dim=512, num_heads=4,
  ),
  "small": dict(
    image_vocab_size=8192, num_encoder_layers=4, num_decoder_layers=8, embed_dim=512,
    mlp_dim=2048, num_heads=8,
  ),
  "matched": dict(
    text_vocab_size=128, image_vocab_size=512, num_encoder_layers=1, num_decoder_layers=4,
    embed_dim=256, mlp_dim=1024, num_heads=4, num_kv_heads=1,
  ),
  "350m": dict(text_length=128),
}  # fmt: skip
CONFIGS["matched_mha"] = {**CONFIGS["matched"], "num_kv_heads": None}


def measure(name: str, grid: tuple[int, int], batch: int) -> float:
  """Seconds per `decoding.sample` call (the best timed call, after a compiling one)."""
  fields = {**BASE, **CONFIGS[name], "image_grid": grid, "dtype": _DTYPE.value}
  config = (
    PartiConfig(**fields) if name != "350m" else PartiConfig(**CONFIGS[name], image_grid=grid)
  )
  params = jax.jit(lambda: nn.meta.unbox(model.init_params(config, jax.random.key(0))))()
  text = jnp.asarray(
    np.random.default_rng(0).integers(2, config.text_vocab_size, (batch, config.text_length)),
    jnp.int32,
  )
  sample = jax.jit(
    functools.partial(decoding.sample, config, top_k=64, guidance_scale=GUIDANCE_SCALE)
  )
  jax.block_until_ready(sample(params, text, jax.random.key(0)))
  # Short calls are repeated until MIN_SECONDS have been timed: on a shared machine
  # one call of half a second moves by 10% from run to run.
  best, timed, repeat = float("inf"), 0.0, 0
  while repeat < _REPEATS.value or timed < MIN_SECONDS:
    start = time.perf_counter()
    jax.block_until_ready(sample(params, text, jax.random.key(repeat + 1)))
    seconds = time.perf_counter() - start
    best, timed, repeat = min(best, seconds), timed + seconds, repeat + 1
  return best


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; {_DTYPE.value}")
  print("| config | batch | tokens | call | image tokens/s | s per image | 1024 vs 256 per image |")
  print("|---|---|---|---|---|---|---|")
  for name in _CONFIGS.value:
    matched = name.startswith("matched")
    batch = 4 if matched else _BATCH.value
    grids = [(16, 16)] if matched else [(16, 16), (32, 32)]
    per_image = {}
    for grid in grids:
      seconds = measure(name, grid, batch)
      tokens = grid[0] * grid[1]
      per_image[tokens] = seconds / batch
      growth = f"{per_image[1024] / per_image[256]:.1f}x" if tokens == 1024 else ""
      print(
        f"| {name} | {batch} | {tokens} | {seconds:.2f} s | {batch * tokens / seconds:.0f} | "
        f"{seconds / batch:.3f} | {growth} |",
        flush=True,
      )
      if name == "matched":
        _print_peer(batch * tokens / seconds, batch)


def _print_peer(ours_tokens_per_s: float, batch: int) -> None:
  """The peer samples the matched batch just after ours; prints its rate and the ratio."""
  if not peer.available():
    print(f"  ({peer.PEER} is not installed, so no ratio: pip install -e .[peer])")
    return
  shape = peer.PeerShape()
  seconds = peer.generate_seconds(shape, batch, cond_scale=GUIDANCE_SCALE)
  theirs = batch * shape.image_length / seconds
  print(
    f"| {peer.PEER}, matched | {batch} | {shape.image_length} | {seconds:.2f} s | "
    f"{theirs:.1f} | {seconds / batch:.3f} | |",
    flush=True,
  )
  print(
    f"  matched, same run: ours / {peer.PEER} = {ours_tokens_per_s / theirs:.0f}x image tokens/s"
  )


if __name__ == "__main__":
  app.run(main)
