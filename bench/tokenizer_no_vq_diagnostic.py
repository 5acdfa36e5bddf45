"""Diagnostic: the tiny tokenizer's encoder and decoder with no quantizer, on the quality budget.

    python bench/tokenizer_no_vq_diagnostic.py --data_dir=runs/tfds

If this plain autoencoder reconstructs no better than the tokenizer, the codebook is
not what limits quality. Prepare the shapes first (gin/data/prepare_shapes.gin).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio
from absl import app, flags
from flax import linen as nn

from parti.tasks import input_pipeline, registry  # noqa: F401  (registers the tasks)
from parti.tokenizer import model
from parti.tokenizer.config import TokenizerConfig

_DATA_DIR = flags.DEFINE_string("data_dir", "runs/tfds", "TFDS data dir with parti_shapes/64_10k.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps of batch 16.")

cfg = TokenizerConfig(
  image_size=64, patch_size=4, encoder="tiny", decoder="tiny", codebook_size=512, dtype="float32"
)


class AE(nn.Module):
  """Encoder -> l2-normalized 32-d codes (not quantized) -> decoder."""

  @nn.compact
  def __call__(self, x):
    return model.Decoder(cfg)(model.l2_normalize(model.Encoder(cfg)(x)))


def _shapes_images(split: str, batch: int, shuffle: bool, num_epochs: int | None = None):
  return input_pipeline.get_dataset(
    "parti_shapes_64_10k_images",
    split=split,
    task_feature_lengths={"image": 64},
    feature_converter=seqio.PassThroughFeatureConverter(),
    global_batch_size=batch,
    shuffle=shuffle,
    seed=0,
    num_epochs=num_epochs,
    shard_info=seqio.ShardInfo(0, 1),
  )


def main(argv):
  del argv
  seqio.set_tfds_data_dir_override(_DATA_DIR.value)
  ae = AE()
  params = nn.meta.unbox(ae.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  tx = optax.adamw(
    optax.warmup_cosine_decay_schedule(
      0, 2e-3, min(30, max(1, _STEPS.value // 10)), _STEPS.value, 1e-4
    ),
    b1=0.9,
    b2=0.99,
    weight_decay=1e-4,
  )
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x):
    loss, g = jax.value_and_grad(lambda p: jnp.mean((ae.apply(p, x) - x) ** 2))(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, loss

  it = _shapes_images("train", batch=16, shuffle=True).as_numpy_iterator()
  t = time.time()
  for i in range(_STEPS.value):
    params, opt, loss = step(params, opt, next(it)["image"])
    if (i + 1) % 100 == 0:
      print(i + 1, float(loss), f"{time.time() - t:.0f}s", flush=True)
  ps = []
  for b in _shapes_images("test", batch=50, shuffle=False, num_epochs=1).as_numpy_iterator():
    r = np.clip(np.asarray(ae.apply(params, b["image"])), 0, 1)
    ps.append(-10 * np.log10(np.mean((r - b["image"]) ** 2, axis=(1, 2, 3))))
  print("no-VQ held-out PSNR", float(np.mean(np.concatenate(ps))))


if __name__ == "__main__":
  app.run(main)
