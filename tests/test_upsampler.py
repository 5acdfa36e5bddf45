"""The super-resolution stage: the WDSR model, its training job, pairs, crops and refusals."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import linen as nn

from parti import partitioning, train_upsampler
from parti.runtime.errors import ConfigError
from parti.training import optim
from parti.upsampling import checkpoint_io, model
from parti.upsampling.api import Upsampler
from parti.upsampling.config import PRESETS, UpsamplerConfig

TINY = UpsamplerConfig(
  input_size=16, scale=4, num_blocks=1, features=8, expansion=2, dtype="float32"
)
MESH = partitioning.MeshConfig(data=4, model=2, rules="model_parallel")


@pytest.fixture(scope="module")
def pairs_task(tmp_path_factory):
  """A tiny prepared shapes config with 16 px twins of its 64 px images, as tasks."""
  import seqio

  from parti.tasks import registry
  from parti.tasks.shapes import builder

  data_dir = str(tmp_path_factory.mktemp("tfds_pairs"))
  config = builder.PartiShapesConfig(
    name="test_pairs", image_size=64, low_resolution=16, num_train=24, num_validation=8,
    num_test=8, num_compositional=8,
  )  # fmt: skip
  builder.PartiShapes(config=config, data_dir=data_dir).download_and_prepare()
  seqio.set_tfds_data_dir_override(data_dir)
  registry._register_shapes(config)
  return "parti_shapes_test_pairs"


def _train(model_dir, task, config=TINY, num_steps=4, **overrides):
  args = dict(
    model_dir=str(model_dir), config=config, task=task, batch_size=8, num_steps=num_steps,
    crop_size=8, optimizer=optim.AdamConfig(learning_rate=1e-3, warmup_steps=1), mesh=MESH,
    eval_every=2, eval_batches=1, log_every=2, checkpoint_every=2,
  )  # fmt: skip
  return train_upsampler.train(**{**args, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pairs_task):
  model_dir = tmp_path_factory.mktemp("upsampler")
  return model_dir, _train(model_dir, pairs_task + "_pairs")


@pytest.mark.parametrize("scale", [2, 4])
def test_an_untrained_upsampler_is_bicubic_interpolation(scale):
  config = UpsamplerConfig(input_size=12, scale=scale, num_blocks=2, features=8, dtype="float32")
  images = np.random.default_rng(0).random((2, 12, 12, 3), np.float32)
  wdsr = model.WDSR(config)
  params = wdsr.init(jax.random.key(1), images)["params"]
  out = np.asarray(wdsr.apply({"params": params}, images))
  assert out.shape == (2, 12 * scale, 12 * scale, 3)
  np.testing.assert_allclose(out, np.asarray(model.bicubic(images, scale)), atol=1e-6)


def test_pixel_shuffle_puts_each_channel_block_at_its_offset():
  x = np.arange(2 * 3 * 5 * 12, dtype=np.float32).reshape(2, 3, 5, 12)  # scale 2, 3 channels
  out = np.asarray(model.pixel_shuffle(x, 2))
  assert out.shape == (2, 6, 10, 3)
  for dy in range(2):
    for dx in range(2):
      np.testing.assert_array_equal(out[:, dy::2, dx::2], x[..., (dy * 2 + dx) * 3 :][..., :3])


def test_every_channel_axis_is_named_and_the_wide_ones_shard_over_model():
  specs = nn.get_partition_spec(checkpoint_io.abstract_params(TINY))
  leaves = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, tuple))
  assert leaves and all(len(spec) in (1, 4) for _, spec in leaves)
  wide = specs["block_0"]["wide"]["kernel"]
  assert tuple(wide) == (None, None, "embed", "mlp")
  mesh = partitioning.create_mesh(MESH)
  sharding = partitioning.logical_sharding(mesh, wide, partitioning.rules_for(MESH))
  assert sharding.spec[-1] == "model"


def test_configs_refuse_bad_fields(tmp_path):
  for bad in (dict(scale=3), dict(low_rank=0.0), dict(dtype="float16"), dict(num_blocks=0)):
    with pytest.raises(ConfigError):
      UpsamplerConfig(**bad)
  with pytest.raises(ConfigError, match="should be an integer"):
    UpsamplerConfig(scale="4")
  path = tmp_path / "c.json"
  path.write_text(json.dumps({"input_size": 64, "colour": 1}))
  with pytest.raises(ConfigError, match="colour"):
    UpsamplerConfig.load(path)
  path.write_text('{"input_size": 64,')  # A file cut short.
  with pytest.raises(ConfigError, match="not valid JSON"):
    UpsamplerConfig.load(path)
  path.write_text("[64, 4]")
  with pytest.raises(ConfigError, match="holds list"):
    UpsamplerConfig.load(path)
  assert PRESETS["paper_4x"].output_size == 1024 and PRESETS["paper_2x"].output_size == 512
  assert PRESETS["shapes_4x"].output_size == 256
  with pytest.raises(ConfigError, match="paper_4x"):
    train_upsampler.preset("paper_8x")


def test_training_evaluates_against_bicubic_resumes_and_loads(trained, pairs_task):
  model_dir, result = trained
  assert {"eval/psnr", "eval/psnr_bicubic", "eval/psnr_gain_over_bicubic"} <= set(result)
  assert result["eval/psnr_gain_over_bicubic"] == pytest.approx(
    result["eval/psnr"] - result["eval/psnr_bicubic"]
  )
  assert (model_dir / checkpoint_io.CONFIG_FILE).is_file()
  assert UpsamplerConfig.load(model_dir / checkpoint_io.CONFIG_FILE) == TINY
  # A rerun with more steps resumes at step 4 instead of starting over.
  _train(model_dir, pairs_task + "_pairs", num_steps=6)
  steps = [
    json.loads(line)["step"] for line in (model_dir / "metrics.jsonl").read_text().splitlines()
  ]
  assert steps.count(2) == 2 and max(steps) == 6  # Step 2 logged and evaluated once, not twice.
  upsampler = Upsampler.from_checkpoint(model_dir)
  assert upsampler.step == 6
  images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  large = upsampler.upsample(images)
  assert large.shape == (3, 64, 64, 3) and large.min() >= 0 and large.max() <= 1
  with pytest.raises(ValueError, match="16, 16, 3"):
    upsampler.upsample(images[:, :8])


def test_crops_are_aligned_repeatable_and_hold_something():
  rng = np.random.default_rng(0)
  low = np.full((4, 16, 16, 3), 0.5, np.float32)
  low[:, 8:, 8:] = rng.random((4, 8, 8, 3))  # Something only in one quarter.
  high = low.repeat(2, axis=1).repeat(2, axis=2)
  a = train_upsampler.random_crops(low, high, 6, 2, seed=0, step=5)
  b = train_upsampler.random_crops(low, high, 6, 2, seed=0, step=5)
  c = train_upsampler.random_crops(low, high, 6, 2, seed=0, step=6)
  np.testing.assert_array_equal(a[0], b[0])
  assert not all(np.array_equal(x, y) for x, y in zip(a[0], c[0], strict=True))
  assert a[0].shape == (4, 6, 6, 3) and a[1].shape == (4, 12, 12, 3)
  np.testing.assert_array_equal(a[1], a[0].repeat(2, axis=1).repeat(2, axis=2))
  # Of 8 candidate places, the one that varies most: it reaches into that quarter
  # (a single random place misses it almost half the time).
  assert all(crop.std() > 0 for crop in a[0])


def test_pairs_from_a_task_without_twins_are_antialiased_downscales():
  config = UpsamplerConfig(input_size=16, scale=2, num_blocks=1, features=8, dtype="float32")
  pairs = train_upsampler.PairMaker(config, "some_task")
  stripes = np.zeros((2, 64, 64, 3), np.float32)
  stripes[:, :, ::2] = 1.0  # Alternating columns: antialiasing averages them to gray.
  low, high = pairs({"image": stripes})
  assert low.shape == (2, 16, 16, 3) and high.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(low[:, 1:-1, 1:-1], 0.5, atol=0.02)  # The edge pixels see the pad.
  with pytest.raises(ConfigError, match="smaller than the upsampler's output size 32"):
    pairs({"image": stripes[:, :24, :24]})
  with pytest.raises(ConfigError, match="pairs 8 px with 32 px"):
    pairs({"image": stripes[:, :32, :32], "image_low": stripes[:, :8, :8]})


def test_the_job_refuses_what_it_cannot_train_or_load(tmp_path, trained, pairs_task):
  model_dir, _ = trained
  # Images smaller than the output size: 64 px images cannot teach 32 -> 128.
  big = UpsamplerConfig(input_size=32, scale=4, num_blocks=1, features=8, dtype="float32")
  with pytest.raises(ConfigError, match="smaller than the upsampler's output size 128"):
    _train(tmp_path / "small_data", pairs_task + "_images", config=big)
  with pytest.raises(ConfigError, match="crop_size"):
    _train(tmp_path / "crop", pairs_task + "_pairs", crop_size=17)
  # A checkpoint of another scale than its config says.
  copy = tmp_path / "rescaled"
  shutil.copytree(model_dir, copy)
  saved = json.loads((copy / checkpoint_io.CONFIG_FILE).read_text())
  (copy / checkpoint_io.CONFIG_FILE).write_text(json.dumps({**saved, "scale": 2}))
  with pytest.raises(ConfigError, match="scale 2"):
    checkpoint_io.load_params(copy)
  with pytest.raises(ConfigError, match="16 -> 32"):
    checkpoint_io.load_params(model_dir, expect=UpsamplerConfig(**{**saved, "scale": 2}))
  with pytest.raises(ConfigError, match="holds no trained upsampler"):
    checkpoint_io.load_params(tmp_path)


def test_the_shapes_pairs_are_each_scene_rendered_at_both_sizes(pairs_task):
  import seqio

  from parti.tasks.shapes import render, scenes

  task = seqio.get_mixture_or_task(pairs_task + "_pairs")
  dataset = task.get_dataset(sequence_length=None, split="test", shuffle=False, num_epochs=1)
  examples = list(dataset.as_numpy_iterator())
  assert len(examples) == 8
  scenes_ = [scenes.make_scene(0, "test", i) for i in range(8)]
  twins = {render.render(s, 64).tobytes(): render.render(s, 16).tobytes() for s in scenes_}
  # Unshuffled TFDS may still read its examples in another order: match them by image.
  for example in examples:
    high, low = (np.round(example[k] * 255).astype(np.uint8) for k in ("image", "image_low"))
    assert high.shape == (64, 64, 3) and low.shape == (16, 16, 3)
    assert twins[high.tobytes()] == low.tobytes()


def test_the_adversarial_game_starts_on_its_step_and_perceptual_needs_weights(tmp_path, pairs_task):
  from parti.upsampling.trainer import UpsamplerLossWeights

  weights = UpsamplerLossWeights(adversarial=0.1, adversarial_start_step=1)
  _train(
    tmp_path / "gan", pairs_task + "_pairs", num_steps=2, loss_weights=weights, log_every=1,
    eval_every=2, disc_channels=4,
    disc_optimizer=optim.AdamConfig(learning_rate=1e-4, warmup_steps=1),
  )  # fmt: skip
  lines = [json.loads(x) for x in (tmp_path / "gan" / "metrics.jsonl").read_text().splitlines()]
  steps = {row["step"]: row for row in lines if "loss/total" in row}
  assert "loss/discriminator" not in steps[1] and np.isfinite(steps[2]["loss/discriminator"])
  assert steps[2]["loss/adversarial"] > 0
  with pytest.raises(ConfigError, match="vgg_weights"):
    _train(
      tmp_path / "vgg", pairs_task + "_pairs", loss_weights=UpsamplerLossWeights(perceptual=0.1)
    )
