"""Parti training throughput: image tokens/s and MFU against the matmul peak measured in the same run.

    python bench/parti_train_throughput.py [--configs=tiny,small,matched] [--steps=10]
    python bench/parti_train_throughput.py --configs=350m --dtype=bfloat16 --batch=32  # on a GPU

One device, synthetic batches (the input pipeline is not what is measured), the
full train step: forward, backward, Parti's Adafactor update. MFU = model FLOPs
(parti.modeling.flops: 3x the forward's matmuls, rematerialization not counted) per second
over the measured peak of square matmuls in the same dtype.

Configs:
  tiny     gin/models/parti_tiny.gin (2 + 4 layers, width 128, 256 image tokens)
  small    4 + 8 layers, width 512, 8 heads, MLP 2048, 256 image tokens, 32 text tokens
  matched  parti-pytorch 0.2.0's decoder (bench/peer.py): 4 layers, width 256, 4 query
           heads of 64 sharing one key and value head (multi-query, num_kv_heads=1, as
           the peer's), MLP 1024, 512 codes, 256 image and 32 text tokens, batch 16. The
           text side is as close as the two allow: the peer reads a frozen T5's
           256-wide output; ours has 1 encoder layer over a 128-piece vocabulary (about
           3% of the step's FLOPs). The peer also adds a learned null key and value.
  matched_mha  the same with 4 key and value heads (the matched shape until
           2026-12-03), to measure what multi-query attention changes
  350m     the paper's 350M (gin/models/parti_350m.gin), for accelerators
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import peer
from absl import app, flags
from flax import linen as nn

from parti.modeling import flops
from parti.modeling.config import PartiConfig
from parti.training import optim
from parti.training.trainer import PartiTrainer

_CONFIGS = flags.DEFINE_list("configs", ["tiny", "small", "matched"], "Configs to measure.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per config (after 2 warm-up steps).")
_BATCH = flags.DEFINE_integer("batch", None, "Batch size (default: per config).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype: float32 or bfloat16.")
_REMAT = flags.DEFINE_string("remat", "none", "Remat policy: none, full, save_dots.")
_SCAN = flags.DEFINE_bool(
  "scan_layers",
  None,
  "Scan over layers (default: on accelerators only). Scanning compiles one block, which "
  "big models need; on CPU, unrolled layers train ~20% faster, because XLA:CPU copies "
  "every layer's activations into and out of the scan's stacked buffers.",
)

CONFIGS: dict[str, tuple[PartiConfig, int]] = {
  "tiny": (
    PartiConfig(
      text_vocab_size=128, text_length=32, image_vocab_size=512, image_grid=(16, 16),
      num_encoder_layers=2, num_decoder_layers=4, embed_dim=128, mlp_dim=512, num_heads=4,
    ),
    32,
  ),
  "small": (
    PartiConfig(
      text_vocab_size=16384, text_length=32, image_vocab_size=8192, image_grid=(16, 16),
      num_encoder_layers=4, num_decoder_layers=8, embed_dim=512, mlp_dim=2048, num_heads=8,
    ),
    16,
  ),
  "matched": (
    PartiConfig(
      text_vocab_size=128, text_length=32, image_vocab_size=512, image_grid=(16, 16),
      num_encoder_layers=1, num_decoder_layers=4, embed_dim=256, mlp_dim=1024, num_heads=4,
      num_kv_heads=1,
    ),
    16,
  ),
  "350m": (PartiConfig(), 32),
}  # fmt: skip
CONFIGS["matched_mha"] = (CONFIGS["matched"][0].replace(num_kv_heads=None), 16)


def measure(name: str, peak: float) -> dict[str, float]:
  config, batch = CONFIGS[name]
  scan = _SCAN.value if _SCAN.value is not None else jax.devices()[0].platform != "cpu"
  config = config.replace(
    dtype=_DTYPE.value, remat_policy=_REMAT.value, cfg_dropout_rate=0.1, scan_layers=scan
  )
  batch = _BATCH.value or batch
  trainer = PartiTrainer(config, optim.adafactor(optim.AdafactorConfig()), z_loss=1e-4)
  state = jax.jit(lambda: nn.meta.unbox(trainer.init(0)))()
  rng = np.random.default_rng(0)
  targets = rng.integers(0, config.image_vocab_size, (batch, config.image_length), np.int32)
  data = {
    "encoder_input_tokens": jnp.asarray(
      rng.integers(2, config.text_vocab_size, (batch, config.text_length), np.int32)
    ),
    "decoder_input_tokens": jnp.asarray(
      np.concatenate([np.full((batch, 1), config.bos_id, np.int32), targets[:, :-1]], 1)
    ),
    "decoder_target_tokens": jnp.asarray(targets),
    "decoder_loss_weights": jnp.ones_like(jnp.asarray(targets)),
  }
  step = jax.jit(trainer.train_step, donate_argnums=0)
  for _ in range(2):
    state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / _STEPS.value
  model_flops = flops.parti_train_flops(config, batch)
  return {
    "batch": batch,
    "step_s": seconds,
    "tokens_per_s": batch * config.image_length / seconds,
    "model_gflops_per_s": model_flops / seconds / 1e9,
    "mfu": model_flops / seconds / peak,
    "parameters_m": sum(x.size for x in jax.tree_util.tree_leaves(state.params)) / 1e6,
  }


def main(argv):
  del argv
  device = jax.devices()[0]
  peak = flops.measure_matmul_peak(
    size=1024 if device.platform == "cpu" else 8192, dtype=_DTYPE.value
  )
  print(
    f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; "
    f"{_DTYPE.value} matmul peak {peak.flops_per_second / 1e9:.1f} GFLOP/s"
  )
  print("| config | params | batch | step | image tokens/s | model GFLOP/s | MFU |")
  print("|---|---|---|---|---|---|---|")
  for name in _CONFIGS.value:
    r = measure(name, peak.flops_per_second)
    print(
      f"| {name} | {r['parameters_m']:.1f}M | {r['batch']} | {r['step_s'] * 1e3:.0f} ms | "
      f"{r['tokens_per_s']:.0f} | {r['model_gflops_per_s']:.1f} | {100 * r['mfu']:.1f}% |",
      flush=True,
    )
    if name == "matched":
      _print_peer(r, batch=r["batch"], ours_config=CONFIGS[name][0])


def _print_peer(ours: dict[str, float], batch: int, ours_config: PartiConfig) -> None:
  """The peer's step at the matched shape, just after ours, and the ratio of the two."""
  if not peer.available():
    print(f"  ({peer.PEER} is not installed, so no ratio: pip install -e .[peer])")
    return
  shape = peer.PeerShape()
  print(
    "  model forward FLOPs per image token: "
    f"ours {flops.parti_forward_flops(ours_config) / ours_config.image_length / 1e6:.2f}M, "
    f"{peer.PEER} {shape.forward_flops() / shape.image_length / 1e6:.2f}M"
  )
  theirs = peer.train_step_seconds(shape, batch, _STEPS.value)
  torch_peak = peer.matmul_peak()
  print(
    f"| {peer.PEER}, matched | {theirs['parameters_m']:.1f}M | {batch} | "
    f"{theirs['step_s'] * 1e3:.0f} ms | {theirs['tokens_per_s']:.0f} | "
    f"{theirs['model_gflops_per_s']:.1f} | {theirs['model_gflops_per_s'] * 1e9 / torch_peak:.1%} "
    f"of torch's {torch_peak / 1e9:.0f} GFLOP/s |",
    flush=True,
  )
  print(
    f"  matched, same run: ours / {peer.PEER} = "
    f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x image tokens/s, "
    f"{ours['model_gflops_per_s'] / theirs['model_gflops_per_s']:.2f}x model GFLOP/s"
  )


if __name__ == "__main__":
  app.run(main)
