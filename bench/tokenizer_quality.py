"""Tokenizer quality on the shapes: held-out PSNR, codebook usage, and evaluator accuracy
on reconstructions, after training with a gin config.

    python bench/tokenizer_quality.py --data_dir=runs/tfds [--gin_file=gin/tokenizer/tiny_shapes.gin]
      [--gin.train_tokenizer.num_steps=300] [--model_dir=runs/bench_tokenizer]
    python bench/tokenizer_quality.py --dataset=48_20k --gin_file=gin/demo/tokenizer.gin \
      --data_dir=runs/demo/tfds --model_dir=runs/demo/tokenizer   # the demo's, as trained

Prepares parti_shapes/DATASET in --data_dir if needed, trains (or resumes) in
--model_dir, then reconstructs --split and reports: PSNR, the fraction of codes
used, the training wall time, and the share of ground-truth scenes the shapes
evaluator still scores correct after encode -> decode. A finished --model_dir is
only evaluated.
"""

import pathlib
import sys
import time

import gin
import numpy as np
import shapes_reconstruction as shared
from absl import app, flags

from parti.runtime import gin_utils
from parti.tasks import prepare_shapes
from parti.tasks.shapes import evaluate
from parti.tokenizer import api, train

_DATA_DIR = flags.DEFINE_string("data_dir", "runs/tfds", "TFDS data dir (prepared if missing).")
_MODEL_DIR = flags.DEFINE_string("model_dir", "runs/bench_tokenizer", "Where the tokenizer trains.")
_EXAMPLES = flags.DEFINE_integer("examples", 500, "Examples of --split to reconstruct.")
_DATASET = flags.DEFINE_string("dataset", "64_10k", "The parti_shapes config.")
_SPLIT = flags.DEFINE_string("split", "test", "The split reconstructed.")


def main(argv):
  del argv
  shapes = prepare_shapes.prepare_shapes(data_dir=_DATA_DIR.value, config=_DATASET.value)
  files = gin_utils._GIN_FILES.value or ["gin/tokenizer/tiny_shapes.gin"]
  bindings = [f"MODEL_DIR = '{_MODEL_DIR.value}'", f"TFDS_DATA_DIR = '{_DATA_DIR.value}'"]
  gin_utils.parse(files, bindings + list(gin_utils._GIN_BINDINGS.value))
  start = time.perf_counter()
  train.configured_train()
  seconds = time.perf_counter() - start
  gin.clear_config()

  tokenizer = api.ImageTokenizer.from_checkpoint(_MODEL_DIR.value)
  examples = shared.read_split(shapes, _SPLIT.value, _EXAMPLES.value)
  images = shared.images_of(examples)
  ids = np.concatenate([tokenizer.encode(images[i : i + 50]) for i in range(0, len(images), 50)])
  recon = np.concatenate([tokenizer.decode(ids[i : i + 50]) for i in range(0, len(ids), 50)])
  mse = np.mean((recon - images) ** 2, axis=(1, 2, 3))
  psnr = float(np.mean(-10 * np.log10(np.maximum(mse, 1e-10))))
  usage = len(np.unique(ids)) / tokenizer.codebook_size
  truth = shared.scored_scenes(examples)
  rebuilt = shared.rebuilt_scores(truth, recon)
  kept = shared.kept(rebuilt)
  print(f"model_dir {pathlib.Path(_MODEL_DIR.value).absolute()} (step {tokenizer.step})")
  print(f"training wall time      {seconds / 60:.1f} min (this run; 0 if it only resumed)")
  print(f"held-out PSNR           {psnr:.2f} dB over {len(images)} {_SPLIT.value} images")
  print(f"codebook usage          {usage:.1%} of {tokenizer.codebook_size} codes")
  print(f"evaluator on recon.     {kept:.1%} of {len(truth)} correctly scored ground-truth scenes")
  print("per attribute, on the reconstructions of those scenes:")
  print(evaluate.format_table(evaluate.aggregate(rebuilt)))


if __name__ == "__main__":
  app.run(main, argv=gin_utils.rewrite_gin_args(sys.argv))
