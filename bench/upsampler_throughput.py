"""Upsampler throughput (images/s) at the shapes' 64 -> 256 and the paper's 256 -> 512 and
256 -> 1024, with the model GFLOP/s each reaches.

    python bench/upsampler_throughput.py [--presets=shapes_4x,paper_2x,paper_4x]
      [--batch=4] [--repeats=3] [--dtype=float32]

Parameters are random (throughput does not depend on them). FLOPs per image are XLA's
count of the compiled forward pass. Compare the GFLOP/s against
`python bench/matmul_peak.py` measured in the same sitting.
"""

import dataclasses

import jax
from absl import app, flags
from flax import linen as nn
from timing import best_time

from parti.upsampling import model
from parti.upsampling.config import PRESETS

_PRESETS = flags.DEFINE_list("presets", ["shapes_4x", "paper_2x", "paper_4x"], "Configs to time.")
_BATCH = flags.DEFINE_integer("batch", 4, "Images per call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls; the best is kept.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype (bfloat16 on accelerators).")


def main(argv):
  del argv
  device = jax.devices()[0].device_kind
  print(f"device: {device} x{jax.device_count()}, batch {_BATCH.value}, {_DTYPE.value}")
  print("| preset | sizes | parameters | GFLOP/image | images/s | GFLOP/s |")
  print("|---|---|---|---|---|---|")
  for name in _PRESETS.value:
    config = dataclasses.replace(PRESETS[name], dtype=_DTYPE.value)
    wdsr = model.WDSR(config)
    side = config.input_size
    images = jax.random.uniform(jax.random.key(0), (_BATCH.value, side, side, 3))
    params = nn.meta.unbox(jax.jit(wdsr.init)(jax.random.key(1), images[:1]))["params"]
    count = sum(x.size for x in jax.tree_util.tree_leaves(params))
    forward = jax.jit(lambda p, x, wdsr=wdsr: wdsr.apply({"params": p}, x))
    cost = forward.lower(params, images).compile().cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost)["flops"]) / _BATCH.value
    seconds = best_time(forward, params, images, repeats=_REPEATS.value)
    rate = _BATCH.value / seconds
    print(f"| {name} | {side} -> {config.output_size} | {count / 1e6:.2f}M | {flops / 1e9:.1f} | "
          f"{rate:.2f} | {rate * flops / 1e9:.0f} |")  # fmt: skip


if __name__ == "__main__":
  app.run(main)
