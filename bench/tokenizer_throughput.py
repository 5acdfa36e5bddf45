"""Encode and decode throughput (images/s) of the tokenizer at tiny and Small size.

    python bench/tokenizer_throughput.py [--sizes=tiny,small] [--batch=8] [--repeats=3]

Parameters are random (throughput does not depend on them). tiny: 64x64, patch 4,
tiny/tiny ViTs, 512 codes. small: 256x256, patch 8, Small/Small ViTs, 8192x32 codes.
"""

import functools

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import linen as nn
from timing import best_time

from parti.tokenizer import model
from parti.tokenizer.config import TokenizerConfig

_SIZES = flags.DEFINE_list("sizes", ["tiny", "small"], "Configs to time.")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls; the best is kept.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype (bfloat16 on accelerators).")

CONFIGS = {
  "tiny": dict(image_size=64, patch_size=4, encoder="tiny", decoder="tiny", codebook_size=512),
  "small": dict(image_size=256, patch_size=8, encoder="small", decoder="small", codebook_size=8192),
}


def main(argv):
  del argv
  print(
    f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, batch {_BATCH.value}, {_DTYPE.value}"
  )
  print(f"{'config':>7} {'tokens':>7} {'encode img/s':>13} {'decode img/s':>13}")
  for name in _SIZES.value:
    config = TokenizerConfig(**CONFIGS[name], dtype=_DTYPE.value)
    vqgan = model.VitVQGAN(config)
    images = jax.random.uniform(
      jax.random.key(0), (_BATCH.value, config.image_size, config.image_size, 3)
    )
    params = nn.meta.unbox(jax.jit(vqgan.init)(jax.random.key(1), images[:1]))["params"]
    encode = jax.jit(functools.partial(vqgan.apply, method=model.VitVQGAN.encode))
    decode = jax.jit(functools.partial(vqgan.apply, method=model.VitVQGAN.decode))
    variables = {"params": params}
    ids = encode(variables, images)
    encode_rate = _BATCH.value / best_time(encode, variables, images, repeats=_REPEATS.value)
    decode_rate = _BATCH.value / best_time(
      decode, variables, jnp.asarray(ids), repeats=_REPEATS.value
    )
    tokens = config.grid[0] * config.grid[1]
    print(f"{name:>7} {tokens:>7} {encode_rate:>13.1f} {decode_rate:>13.1f}")


if __name__ == "__main__":
  app.run(main)
