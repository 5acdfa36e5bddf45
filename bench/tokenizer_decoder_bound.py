"""Where does a trained tokenizer lose the shapes: in its codes, or in its decoder?

    python bench/tokenizer_decoder_bound.py --model_dir=runs/demo/tokenizer \
      --data_dir=runs/demo/tfds --dataset=48_20k

Reconstructs held-out scenes three ways and prints, for each, PSNR and the share of
ground-truth scenes the shapes evaluator still scores correct:

1. the tokenizer as trained (its encoder, codes and decoder);
2. its encoder and codes with the best decoder for them: each code decodes to the mean
   of the training patches assigned to it (what an L2-trained decoder that sees only
   one code, as size "patch" does, converges to at best);
3. the codes refined by k-means on the encoder's outputs (spherical when the codebook
   is l2-normalized), with the same cluster-mean decoder.

The gap between 1 and 2 is what the decoder loses; between 2 and 3, what the codebook's
placement loses; bench/tokenizer_kmeans_bound.py gives the bound with no encoder at all.
Only meaningful for decoders without attention blocks, whose patches are decoded alone.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import shapes_reconstruction as shared
from absl import app, flags

from parti.tasks import prepare_shapes
from parti.tasks.shapes import evaluate
from parti.tokenizer import api, model

_MODEL_DIR = flags.DEFINE_string("model_dir", "runs/demo/tokenizer", "A trained tokenizer.")
_DATA_DIR = flags.DEFINE_string(
  "data_dir", "runs/demo/tfds", "TFDS data dir (prepared if missing)."
)
_DATASET = flags.DEFINE_string("dataset", "48_20k", "The parti_shapes config.")
_TRAIN = flags.DEFINE_integer("train_images", 5000, "Training images whose patches set the means.")
_TEST = flags.DEFINE_integer("test_images", 500, "Held-out images reconstructed.")
_ITERATIONS = flags.DEFINE_integer("iterations", 20, "k-means iterations on the codes.")
_BATCH = 250


def main(argv):
  del argv
  shapes = prepare_shapes.prepare_shapes(data_dir=_DATA_DIR.value, config=_DATASET.value)
  tokenizer = api.ImageTokenizer.from_checkpoint(_MODEL_DIR.value)
  config = tokenizer.config
  if config.decoder_size.num_layers:
    print(f"note: decoder {config.decoder!r} has attention blocks; the cluster means ignore them")
  vqgan = model.VitVQGAN(config)

  @jax.jit
  def encoder_outputs(params, images):
    z = vqgan.apply({"params": params}, images, method=lambda m, x: m.encoder(x))
    return model.l2_normalize(z) if config.l2_normalize else z

  @jax.jit
  def nearest(z, codes):
    if config.l2_normalize:
      return jnp.argmax(z @ codes.T, axis=-1)
    return jnp.argmin(jnp.sum(codes**2, -1) - 2 * z @ codes.T, axis=-1)

  def encode(images):
    z = [
      encoder_outputs(tokenizer.params, images[i : i + _BATCH])
      for i in range(0, len(images), _BATCH)
    ]
    return np.concatenate([np.asarray(x) for x in z]).reshape(-1, config.code_dim)

  def patches(images):
    flat = model.patchify(jnp.asarray(images), config.patch_size)
    return np.asarray(flat.reshape(-1, flat.shape[-1]))

  k = config.codebook_size

  def cluster_means(assignment, points):
    sums = jax.ops.segment_sum(points, assignment, k)
    counts = jax.ops.segment_sum(jnp.ones(len(points)), assignment, k)[:, None]
    return np.asarray(sums / jnp.maximum(counts, 1))

  def decode_with_table(table, assignment, count):
    coded = jnp.asarray(table[assignment].reshape(count, -1, table.shape[-1]))
    return np.asarray(model.unpatchify(coded, config.patch_size, config.patch_grid))

  train = shared.images_of(shared.read_split(shapes, "train", _TRAIN.value))
  examples = shared.read_split(shapes, "test", _TEST.value)
  test = shared.images_of(examples)
  truth = shared.scored_scenes(examples)
  print(f"{len(truth)} of {len(test)} held-out scenes scored correct on the ground truth")
  z_train, z_test, p_train = encode(train), encode(test), patches(train)
  codes = np.asarray(
    vqgan.apply({"params": tokenizer.params}, method=lambda m: m.quantizer.codes())
  )

  rng = np.random.default_rng(0)
  refined = codes.copy()
  for _ in range(_ITERATIONS.value):
    assignment = np.asarray(nearest(z_train, refined))
    sums = np.asarray(jax.ops.segment_sum(z_train, assignment, k))
    counts = np.bincount(assignment, minlength=k)[:, None]
    # An empty cluster restarts at a random encoder output.
    refined = np.where(
      counts > 0, sums / np.maximum(counts, 1), z_train[rng.choice(len(z_train), k)]
    )
    if config.l2_normalize:
      refined /= np.linalg.norm(refined, axis=-1, keepdims=True)

  variants = {"as trained": tokenizer.decode(tokenizer.encode(test))}
  for name, book in (
    ("its codes, cluster-mean decoder", codes),
    ("k-means codes, cluster-mean decoder", refined),
  ):
    table = cluster_means(np.asarray(nearest(z_train, book)), p_train)
    variants[name] = decode_with_table(table, np.asarray(nearest(z_test, book)), len(test))
  for name, recon in variants.items():
    psnr = np.mean(-10 * np.log10(np.maximum(np.mean((recon - test) ** 2, axis=(1, 2, 3)), 1e-10)))
    rebuilt = shared.rebuilt_scores(truth, recon)
    print(f"\n{name}: PSNR {psnr:.1f} dB, {shared.kept(rebuilt):.1%} of {len(truth)} scenes kept")
    print(evaluate.format_table(evaluate.aggregate(rebuilt)))


if __name__ == "__main__":
  app.run(main, argv=sys.argv)
