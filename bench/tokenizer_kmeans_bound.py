"""How well can any tokenizer that codes each patch on its own preserve the shapes?

    python bench/tokenizer_kmeans_bound.py --data_dir=runs/tfds [--codes=512,2048,8192]
    python bench/tokenizer_kmeans_bound.py --data_dir=runs/demo/tfds --dataset=48_20k \
      --patch=16 --train_images=20000 --codes=1024,2048,4096   # the demo's grid

k-means on the training images' p x p patches is the best per-patch codebook for L2
(up to its local optimum): a tokenizer of size "patch" (no attention blocks) can at
best decode each code to its cluster's mean. This reconstructs held-out images from
the nearest centroids and prints PSNR and the share of ground-truth scenes the shapes
evaluator still scores correct, per attribute, for each codebook size. Flat patches
are few distinct values, so the fit samples mostly the patches that hold an edge.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import shapes_reconstruction as shared
from absl import app, flags

from parti.tasks import prepare_shapes
from parti.tasks.shapes import evaluate
from parti.tokenizer import model

_DATA_DIR = flags.DEFINE_string("data_dir", "runs/tfds", "TFDS data dir (prepared if missing).")
_DATASET = flags.DEFINE_string("dataset", "64_10k", "The parti_shapes config.")
_CODES = flags.DEFINE_list("codes", ["512", "2048", "8192"], "Codebook sizes to fit.")
_PATCH = flags.DEFINE_integer("patch", 4, "Patch side, as the tokenizer's patch_size.")
_TRAIN = flags.DEFINE_integer("train_images", 3000, "Training images whose patches are fit.")
_TEST = flags.DEFINE_integer("test_images", 300, "Held-out images reconstructed.")
_ITERATIONS = flags.DEFINE_integer("iterations", 25, "Lloyd iterations.")
_SAMPLES = flags.DEFINE_integer("samples", 300_000, "Patches with an edge sampled for the fit.")


@jax.jit
def _nearest(points: jax.Array, centroids: jax.Array) -> jax.Array:
  distance = -2 * points @ centroids.T + jnp.sum(centroids**2, -1)
  return jnp.argmin(distance, axis=-1)


def _patches(images: np.ndarray) -> np.ndarray:
  flat = model.patchify(jnp.asarray(images), _PATCH.value)
  return np.asarray(flat.reshape(-1, flat.shape[-1]))


def kmeans(points: jax.Array, k: int, rng: np.random.Generator) -> jax.Array:
  """Lloyd's algorithm; an empty cluster restarts at a random point."""
  centroids = points[rng.choice(points.shape[0], k, replace=False)]
  for _ in range(_ITERATIONS.value):
    assignment = _nearest(points, centroids)
    sums = jax.ops.segment_sum(points, assignment, k)
    counts = jax.ops.segment_sum(jnp.ones(points.shape[0]), assignment, k)[:, None]
    restarts = points[rng.choice(points.shape[0], k)]
    centroids = jnp.where(counts > 0, sums / jnp.maximum(counts, 1), restarts)
  return centroids


def main(argv):
  del argv
  shapes = prepare_shapes.prepare_shapes(data_dir=_DATA_DIR.value, config=_DATASET.value)
  train = shared.images_of(shared.read_split(shapes, "train", _TRAIN.value))
  examples = shared.read_split(shapes, "test", _TEST.value)
  test = shared.images_of(examples)
  truth = shared.scored_scenes(examples)

  rng = np.random.default_rng(0)
  points = _patches(train)
  edges = points.var(-1) > 1e-4
  sample = np.concatenate([
    rng.choice(np.flatnonzero(edges), min(_SAMPLES.value, int(edges.sum())), replace=False),
    rng.choice(np.flatnonzero(~edges), min(_SAMPLES.value // 15, int((~edges).sum())), replace=False),
  ])  # fmt: skip
  points = jnp.asarray(points[sample])
  grid = (test.shape[1] // _PATCH.value, test.shape[2] // _PATCH.value)
  print(f"{len(truth)} of {len(test)} held-out scenes scored correct on the ground truth")
  for k in map(int, _CODES.value):
    start = time.perf_counter()
    centroids = kmeans(points, k, rng)
    test_patches = model.patchify(jnp.asarray(test), _PATCH.value)
    coded = centroids[_nearest(test_patches.reshape(-1, test_patches.shape[-1]), centroids)]
    recon = np.asarray(model.unpatchify(coded.reshape(test_patches.shape), _PATCH.value, grid))
    psnr = np.mean(-10 * np.log10(np.mean((recon - test) ** 2, axis=(1, 2, 3))))
    rebuilt = shared.rebuilt_scores(truth, recon)
    kept = shared.kept(rebuilt)
    print(
      f"\n{k} codes, {_PATCH.value}x{_PATCH.value} patches: PSNR {psnr:.1f} dB, "
      f"{kept:.1%} of scenes kept ({time.perf_counter() - start:.0f} s)"
    )
    print(evaluate.format_table(evaluate.aggregate(rebuilt)))


if __name__ == "__main__":
  app.run(main, argv=sys.argv)
