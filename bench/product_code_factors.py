"""What each group of a product codebook says about the shapes, and what Parti draws with it.

    python bench/product_code_factors.py --model_dir=runs/pq/tokenizer --data_dir=runs/demo/tfds
    python bench/product_code_factors.py --model_dir=runs/pq/tokenizer --data_dir=runs/demo/tfds \
      --checkpoint_dir=runs/pq/parti        # and the sampled codes of a Parti trained on it

A product codebook (`TokenizerConfig.codebook_groups` > 1) can draw a held-out (color,
shape) pair of the compositional split only if its groups split the two: a color code and a
shape code that the seen pairs taught apart. This reads how far a trained tokenizer does:

- kept: the share of ground-truth test and compositional scenes the evaluator still scores
  right after encode -> decode (as `bench/tokenizer_quality.py`);
- per group, the conditional entropy H(attribute | the group's code) in bits, over the
  objects of the test scenes (color has 3 bits, shape 2.6, size 1, background 1.6). A
  group that says an attribute leaves about 0 bits of it; a group free of it leaves all.

With --checkpoint_dir, Parti samples the first --prompts prompts of each split (λ = 1, the
demo's top-k and plausibility), and each group's code at every object whose cell the prompt
names is read as the color and shape most test objects with that code have: the share that
matches the prompt says which group's choice fails on the held-out pairs.
"""

import collections
import sys

import jax
import numpy as np
import shapes_reconstruction as shared
import tensorflow_datasets as tfds
from absl import app, flags

from parti import partitioning
from parti.modeling import checkpoint_io
from parti.sampling import decoding
from parti.sampling.prompts import PromptEncoder
from parti.tasks.shapes import scenes
from parti.tokenizer import api
from parti.tokenizer import checkpoint_io as tokenizer_io

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "A trained tokenizer.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", "runs/demo/tfds", "The prepared shapes dataset.")
_DATASET = flags.DEFINE_string("dataset", "48_20k_centered", "The parti_shapes config.")
_EXAMPLES = flags.DEFINE_integer("examples", 500, "Scenes of each split read.")
_CHECKPOINT_DIR = flags.DEFINE_string("checkpoint_dir", None, "A Parti trained on its codes.")
_PROMPTS = flags.DEFINE_integer("prompts", 1000, "Prompts of each split Parti samples.")
_ATTRIBUTES = ("color", "shape", "size", "background")


def conditional_entropy(pairs: list[tuple]) -> float:
  """H(b | a) in bits over (a, b) pairs."""
  joint, marginal = collections.Counter(pairs), collections.Counter(a for a, _ in pairs)
  n = len(pairs)
  entropy = -sum(c / n * np.log2(c / marginal[a]) for (a, _), c in joint.items())
  return max(0.0, float(entropy))  # 0.0, not -0.0, where the code says it all.


def encode_all(tokenizer: api.ImageTokenizer, images: np.ndarray) -> np.ndarray:
  """Code ids [N, patches, groups] of images [N, S, S, 3]."""
  ids = np.concatenate([tokenizer.encode(images[i : i + 100]) for i in range(0, len(images), 100)])
  return np.asarray(tokenizer.config.from_grid(ids))


def object_codes(examples: list[dict], codes: np.ndarray) -> list[tuple[dict, np.ndarray]]:
  """(the object's attributes, its cell's codes [groups]) of every object."""
  rows = []
  for example, scene_codes in zip(examples, codes, strict=True):
    scene = scenes.from_example(example)
    for obj in scene.objects:
      attributes = {"color": obj.color, "shape": obj.shape, "size": obj.size}
      rows.append(({**attributes, "background": scene.background}, scene_codes[obj.position]))
  return rows


def majority_reading(rows, groups: int) -> list[dict[int, dict[str, str]]]:
  """Per group: code -> the color and shape most objects with that code have."""
  readings = []
  for group in range(groups):
    counts: dict[int, dict[str, collections.Counter]] = collections.defaultdict(
      lambda: {"color": collections.Counter(), "shape": collections.Counter()}
    )
    for attributes, codes in rows:
      for name in ("color", "shape"):
        counts[int(codes[group])][name][attributes[name]] += 1
    readings.append(
      {code: {k: c.most_common(1)[0][0] for k, c in by.items()} for code, by in counts.items()}
    )
  return readings


def sampled_readings(checkpoint_dir: str, tok_config, readings, count: int) -> None:
  """Prints, per split and group, how often the sampled code reads as the prompt's color
  and shape, over objects whose cell the prompt names."""
  mesh_config = partitioning.MeshConfig()
  mesh = partitioning.create_mesh(mesh_config)
  config, params, _, _ = checkpoint_io.load_params(
    checkpoint_dir, mesh, partitioning.rules_for(mesh_config)
  )
  encoder = PromptEncoder(config.text_length, None)
  sample = jax.jit(
    lambda text, key: decoding.sample(config, params, text, key, top_k=64, plausibility=0.3)[0]
  )
  for split in ("test", "compositional"):
    split_scenes = [scenes.make_scene(0, split, i) for i in range(count)]
    text = np.stack([encoder.encode(s.caption) for s in split_scenes])
    tokens = np.concatenate(
      [np.asarray(sample(text[i : i + 100], jax.random.key(i))) for i in range(0, count, 100)]
    )
    codes = np.asarray(tok_config.from_grid(tokens.reshape(count, *tok_config.grid)))
    right, objects = collections.Counter(), 0
    for scene, scene_codes in zip(split_scenes, codes, strict=True):
      if not scene.mentions_position:
        continue
      for obj in scene.objects:
        objects += 1
        for group, reading in enumerate(readings):
          read = reading.get(int(scene_codes[obj.position, group]), {})
          for name in ("color", "shape"):
            right[group, name] += read.get(name) == getattr(obj, name)
    shares = ", ".join(
      f"group {g} reads as the {name} {100 * right[g, name] / max(objects, 1):.1f}%"
      for g in range(len(readings))
      for name in ("color", "shape")
    )
    print(f"Parti, {split}: {objects} objects in named cells; {shares}")


def main(argv):
  del argv
  tok_config, tok_params, step = tokenizer_io.load_params(_MODEL_DIR.value)
  if tok_config.codebook_groups < 2:
    sys.exit(f"{_MODEL_DIR.value} codes each patch with one code: nothing to split.")
  tokenizer = api.ImageTokenizer(tok_config, tok_params)
  builder = tfds.builder(f"parti_shapes/{_DATASET.value}", data_dir=_DATA_DIR.value)
  print(f"{_MODEL_DIR.value} at step {step}: {tok_config.codebook_size} codes in "
        f"{tok_config.codebook_groups} groups, {tok_config.group_layout} layout")  # fmt: skip
  readings = None
  for split in ("test", "compositional"):
    examples = shared.read_split(builder, split, _EXAMPLES.value)
    images = shared.images_of(examples)
    codes = encode_all(tokenizer, images)
    grid_ids = np.asarray(tok_config.to_grid(codes))
    recon = np.concatenate(
      [tokenizer.decode(grid_ids[i : i + 100]) for i in range(0, len(grid_ids), 100)]
    )
    truth = shared.scored_scenes(examples)
    kept = shared.kept(shared.rebuilt_scores(truth, recon))
    print(f"{split}: {100 * kept:.1f}% of {len(truth)} scenes kept through encode -> decode")
    if split == "test":
      rows = object_codes(examples, codes)
      for group in range(tok_config.codebook_groups):
        left = ", ".join(
          f"{name} {conditional_entropy([(c[group], a[name]) for a, c in rows]):.2f}"
          for name in _ATTRIBUTES
        )
        print(f"  group {group}: bits left unsaid by its code over {len(rows)} objects: {left}")
      readings = majority_reading(rows, tok_config.codebook_groups)
  if _CHECKPOINT_DIR.value:
    sampled_readings(_CHECKPOINT_DIR.value, tok_config, readings, _PROMPTS.value)


if __name__ == "__main__":
  app.run(main)
