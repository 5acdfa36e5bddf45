"""The tokenizer's training job, its checkpoints and API, and the pre-encoding job."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import decompression_bomb_png, tiny_tokenizer_config

from parti.runtime import metric_logging
from parti.runtime.errors import ConfigError
from parti.tasks import records, registry, sources, token_records
from parti.tokenizer import api, checkpoint_io, encode, losses, train
from parti.tokenizer import trainer as trainer_lib
from parti.training import optim

pytestmark = pytest.mark.slow


def _train(model_dir, task, num_steps, **overrides):
  arguments = dict(
    model_dir=str(model_dir),
    config=tiny_tokenizer_config(),
    task=task,
    batch_size=8,
    num_steps=num_steps,
    loss_weights=losses.LossWeights(perceptual=0.0, adversarial=0.0),
    optimizer=optim.AdamConfig(learning_rate=1e-3, warmup_steps=1),
    disc_optimizer=optim.AdamConfig(warmup_steps=1),
    disc_channels=8,
    eval_every=100,
    eval_batches=1,
    log_every=1,
    checkpoint_every=2,
  )
  arguments.update(overrides)
  return train.train(**arguments)


def test_training_writes_metrics_images_checkpoints_and_config(trained_tokenizer):
  metrics = metric_logging.read_metrics(trained_tokenizer)
  assert {"loss/total", "psnr", "codebook/usage", "loss/discriminator"} <= set(metrics[6])
  assert "loss/discriminator" not in metrics[3]  # The GAN starts at step 3, after that step.
  assert {"eval/psnr", "eval/codebook_usage"} <= set(metrics[6])
  assert list((trained_tokenizer / "images").glob("eval_input_vs_reconstruction_*.png"))
  assert (trained_tokenizer / checkpoint_io.CONFIG_FILE).exists()
  assert sorted(
    int(p.name) for p in (trained_tokenizer / "checkpoints").iterdir() if p.name.isdigit()
  ) == [3, 6]


def test_losses_decrease_on_a_fixed_batch():
  config = tiny_tokenizer_config()
  trainer = trainer_lib.Trainer(
    config,
    losses.LossWeights(perceptual=0.0, adversarial=0.0),
    optim.adam(optim.AdamConfig(learning_rate=3e-3, warmup_steps=1), 30),
    optim.adam(optim.AdamConfig(warmup_steps=1), 30),
    8,
  )
  from flax import linen as nn

  state = nn.meta.unbox(jax.jit(trainer.init)(jax.random.key(0)))
  images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  step = jax.jit(lambda s, x: trainer.train_step(s, x, False))
  totals = []
  for _ in range(30):
    state, metrics = step(state, images)
    totals.append(float(metrics["loss/l2"]))
  assert totals[-1] < 0.5 * totals[0], totals


def _palette_config():
  return tiny_tokenizer_config(
    encoder="patch_mlp", decoder="patch", codebook_size=64, codebook_groups=2,
    group_layout="stacked", group_order=(1, 0), decoder_head="palette",
  )  # fmt: skip


def test_views_pull_together_the_groups_their_factor_should_not_reach():
  from flax import linen as nn

  config = _palette_config()
  views = ("image_recolored", "image_reshaped")  # Group 0 says the colors, group 1 the layout.
  trainer = trainer_lib.Trainer(
    config, losses.LossWeights(perceptual=0.0, adversarial=0.0),
    optim.adam(optim.AdamConfig(learning_rate=3e-3, warmup_steps=1), 40),
    optim.adam(optim.AdamConfig(warmup_steps=1), 40), 8, views=views,
  )  # fmt: skip
  state = nn.meta.unbox(jax.jit(trainer.init)(jax.random.key(0)))
  images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  same = {"image": images, "image_recolored": images, "image_reshaped": images}
  step = jax.jit(lambda s, b: trainer.train_step(s, b, False))
  _, metrics = step(state, same)
  assert float(metrics["loss/view_invariance"]) == pytest.approx(0.0, abs=1e-12)
  # A view only its palette group should see: its layout codes must match the image's.
  recolored = {**same, "image_recolored": images[..., ::-1]}
  latents = jax.jit(
    lambda p, x: trainer.model.apply({"params": p}, x, method=lambda m, y: m.latents(y)[0])
  )
  gap = lambda params: float(  # noqa: E731
    jnp.mean(
      (latents(params, images)[..., 1, :] - latents(params, images[..., ::-1])[..., 1, :]) ** 2
    )
  )
  before = gap(state.params)
  _, metrics = step(state, recolored)
  assert float(metrics["loss/view_invariance"]) > 0
  for _ in range(40):
    state, metrics = step(state, recolored)
  assert gap(state.params) < 0.2 * before
  with pytest.raises(ValueError, match="views names 1 features for 2 codebook groups"):
    trainer_lib.Trainer(config, losses.LossWeights(), optax.sgd(0.0), optax.sgd(0.0), 8, ("a",))


@pytest.fixture(scope="module")
def views_task(tmp_path_factory):
  """A tiny 32 px shapes config with views, registered: its `_views` task's name."""
  from parti.tasks import prepare_shapes

  data_dir = str(tmp_path_factory.mktemp("tfds_views"))
  shapes = prepare_shapes.prepare_shapes(
    data_dir=data_dir, config="test_views_32", image_size=32, num_train=16, num_eval=8,
    placement="centered", views=True,
  )  # fmt: skip
  seqio.set_tfds_data_dir_override(data_dir)
  registry._register_shapes(shapes.builder_config)
  return "parti_shapes_test_views_32_views"


def test_the_job_trains_on_views_and_refuses_views_it_cannot_use(tmp_path, views_task):
  views = ("image_recolored", "image_reshaped")
  _train(tmp_path / "ok", views_task, num_steps=2, config=_palette_config(), group_views=views)
  metrics = metric_logging.read_metrics(tmp_path / "ok")
  assert metrics[2]["loss/view_invariance"] > 0
  bad = [
    (dict(group_views=views[:1]), "names 1 view.*codebook_groups = 2"),
    (dict(group_views=("image_recolored", "image_recolored")), "distinct features"),
    (dict(group_views=("image", "")), "distinct features other than 'image'"),
    (dict(group_views=("", "")), "name at least one view"),
    (dict(task="parti_shapes_test_views_32_images"), r"not the view feature\(s\)"),
  ]
  for overrides, message in bad:
    arguments = {"task": views_task, "config": _palette_config(), "group_views": views, **overrides}
    with pytest.raises(ConfigError, match=message):
      _train(tmp_path / "bad", num_steps=1, **arguments)
  with pytest.raises(ConfigError, match="at least 2 codebook groups"):
    _train(tmp_path / "bad", views_task, num_steps=1, group_views=("image_recolored",))


def _flat_images_with_one_noisy_patch(config):
  """(trainer, initial state, two flat gray 32 px images, the second with one noisy 8 px
  patch at row 1, column 2, and the encoder's outputs for them [32, groups * code_dim])."""
  from flax import linen as nn

  trainer = trainer_lib.Trainer(
    config,
    losses.LossWeights(perceptual=0.0, adversarial=0.0),
    optim.adam(optim.AdamConfig(warmup_steps=1), 10),
    optim.adam(optim.AdamConfig(warmup_steps=1), 10),
    8,
  )
  state = nn.meta.unbox(jax.jit(trainer.init)(jax.random.key(0)))
  images = np.full((2, 32, 32, 3), 0.5, np.float32)
  images[1, 8:16, 16:24] = np.random.default_rng(0).uniform(size=(8, 8, 3))
  z = trainer.model.apply({"params": state.params}, images, method=lambda m, y: m.encoder(y))
  return trainer, state, images, np.asarray(z).reshape(32, -1)


def test_dead_codes_restart_where_the_codebook_serves_worst():
  # Flat images with one noisy patch; the live codes sit on the flat patches'
  # encodings. A uniform pick would put most restarted codes there too (they would
  # die again); seeding by distance puts them all on the one patch no code serves.
  config = tiny_tokenizer_config(encoder="patch", decoder="patch")
  trainer, state, images, z = _flat_images_with_one_noisy_patch(config)
  z = z.reshape(-1, config.code_dim)
  noisy = z[16 + 6]  # Image 1's token at row 1, column 2.
  # The live codes are exactly the flat image's encodings (they differ by position).
  codebook = np.tile(z[:16], (config.codebook_size // 16, 1))
  params = {**state.params, "quantizer": {"codebook": jax.numpy.asarray(codebook)}}
  counts = np.ones(config.codebook_size, np.int32)
  counts[:10] = 0
  state = state.replace(params=params, code_counts=jax.numpy.asarray(counts))

  state, restarted = jax.jit(trainer.restart_dead_codes)(state, images, jax.random.key(1))

  assert int(restarted) == 10
  codes = np.asarray(state.params["quantizer"]["codebook"])
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
  np.testing.assert_allclose(unit(codes[:10]), np.tile(unit(noisy), (10, 1)), atol=1e-5)
  np.testing.assert_array_equal(codes[10:], codebook[10:])
  assert not np.asarray(state.code_counts).any()


def test_dead_codes_of_a_group_restart_on_that_groups_sub_vectors():
  # Two groups of 32 codes. Every code is live except ten of group 1, and the noisy
  # patch is the one that group serves worst: the ten move onto its group-1 half,
  # not onto any group-0 sub-vector (which lives in another space).
  config = tiny_tokenizer_config(encoder="patch", decoder="patch", codebook_groups=2)
  trainer, state, images, z = _flat_images_with_one_noisy_patch(config)
  z = z.reshape(-1, 2, config.code_dim)
  noisy = z[16 + 6, 1]
  # Group g's live codes are exactly the flat image's group-g sub-vector.
  codebook = np.concatenate([np.tile(z[0, g], (32, 1)) for g in range(2)])
  params = {**state.params, "quantizer": {"codebook": jax.numpy.asarray(codebook)}}
  counts = np.ones(config.codebook_size, np.int32)
  counts[40:50] = 0
  state = state.replace(params=params, code_counts=jax.numpy.asarray(counts))

  state, restarted = jax.jit(trainer.restart_dead_codes)(state, images, jax.random.key(1))

  assert int(restarted) == 10
  codes = np.asarray(state.params["quantizer"]["codebook"])
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
  np.testing.assert_allclose(unit(codes[40:50]), np.tile(unit(noisy), (10, 1)), atol=1e-5)
  np.testing.assert_array_equal(
    np.delete(codes, np.s_[40:50], 0), np.delete(codebook, np.s_[40:50], 0)
  )


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, shapes_task_name):
  """A run of 4 steps, checkpointed at 2 and 4: tests copy it before changing it."""
  model_dir = tmp_path_factory.mktemp("four_steps")
  _train(model_dir, shapes_task_name + "_images", num_steps=4)
  return model_dir


def test_resume_continues_from_the_latest_checkpoint(tmp_path, four_steps, shapes_task_name):
  shutil.copytree(four_steps, tmp_path, dirs_exist_ok=True)
  _train(tmp_path, shapes_task_name + "_images", num_steps=6)
  metrics = metric_logging.read_metrics(tmp_path)
  assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4, 6]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, four_steps, caplog):
  shutil.copytree(four_steps, tmp_path, dirs_exist_ok=True)
  for path in (tmp_path / "checkpoints" / "4" / "params").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b"garbage")
  caplog.set_level("WARNING")
  _config, _params, step = checkpoint_io.load_params(tmp_path)
  assert step == 2
  assert "Checkpoint 4" in caplog.text and "trying the previous one" in caplog.text


def test_nan_loss_stops_with_a_clear_message(tmp_path, shapes_task_name):
  with pytest.raises(FloatingPointError, match="last good checkpoint"):
    _train(
      tmp_path,
      shapes_task_name + "_images",
      num_steps=3,
      loss_weights=losses.LossWeights(l2=float("nan"), perceptual=0.0, adversarial=0.0),
    )


def test_wrong_image_size_is_refused(tmp_path, shapes_task_name):
  with pytest.raises(ConfigError, match="yields images of shape"):
    _train(
      tmp_path,
      shapes_task_name + "_images",
      num_steps=2,
      config=tiny_tokenizer_config(image_size=64),
    )


def test_stage_two_freezes_encoder_and_codebook(tmp_path, trained_tokenizer, shapes_task_name):
  _, before, _ = checkpoint_io.load_params(trained_tokenizer)
  _train(
    tmp_path, shapes_task_name + "_images", num_steps=3,
    init_from=str(trained_tokenizer), freeze=("encoder", "quantizer"),
  )  # fmt: skip
  _, after, _ = checkpoint_io.load_params(tmp_path)
  same = jax.tree_util.tree_map(np.array_equal, before["encoder"], after["encoder"])
  assert all(jax.tree_util.tree_leaves(same))
  np.testing.assert_array_equal(before["quantizer"]["codebook"], after["quantizer"]["codebook"])
  changed = jax.tree_util.tree_map(np.array_equal, before["decoder"], after["decoder"])
  assert not all(jax.tree_util.tree_leaves(changed))


def test_unknown_freeze_group(tmp_path, shapes_task_name):
  with pytest.raises(ConfigError, match="freeze may name"):
    _train(tmp_path, shapes_task_name + "_images", num_steps=2, freeze=("encodr",))


def test_negative_restart_steps_are_refused(tmp_path, shapes_task_name):
  with pytest.raises(ConfigError, match="dead_code_restart_until must not be negative"):
    _train(tmp_path, shapes_task_name + "_images", num_steps=2, dead_code_restart_until=-1)


@pytest.mark.parametrize(
  ("until", "num_steps", "restarted_at"),
  [(None, 10, [3, 6, 9]), (6, 10, [3, 6]), (0, 10, []), (None, 9, [3, 6])],
)
def test_dead_codes_restart_every_n_steps_until_the_last_step_allowed(
  until, num_steps, restarted_at
):
  """Never at the run's last step (num_steps 9): the decoder would have no step left to
  learn the restarted codes."""

  class CountingTrainer:
    def restart_dead_codes(self, state, images, rng):
      del images, rng
      return state + 1, jnp.int32(7)

  after_step = train._dead_code_restarts(CountingTrainer(), 3, until, seed=0, num_steps=num_steps)
  state, seen = jnp.int32(0), []
  for step in range(1, num_steps + 1):
    before = int(state)  # The restart donates the state it is given.
    state, _ = after_step(step, state, jnp.zeros((1, 4, 4, 3)), None)
    if int(state) != before:
      seen.append(step)
  assert seen == restarted_at


# --- API --------------------------------------------------------------------------------------


def test_api_loads_in_one_call_and_round_trips(trained_tokenizer, mesh_4x2):
  tokenizer = api.ImageTokenizer.from_checkpoint(trained_tokenizer)
  assert tokenizer.step == 6
  images = np.random.default_rng(0).random((5, 32, 32, 3)).astype(np.float32)
  ids = tokenizer.encode(images)
  assert ids.shape == (5, 4, 4)
  assert ids.dtype == np.int32
  assert tokenizer.encode((images * 255).astype(np.uint8)).shape == (5, 4, 4)
  decoded = tokenizer.decode(ids)
  assert decoded.shape == (5, 32, 32, 3)
  np.testing.assert_array_equal(tokenizer.decode(tokenizer.encode(images)), decoded)
  sharded = api.ImageTokenizer.from_checkpoint(trained_tokenizer, mesh=mesh_4x2)
  np.testing.assert_array_equal(sharded.encode(images), ids)  # 5 images padded to 8, trimmed.
  np.testing.assert_allclose(sharded.decode(ids), decoded, atol=1e-5)


def test_api_checks_its_inputs(trained_tokenizer):
  tokenizer = api.ImageTokenizer.from_checkpoint(trained_tokenizer)
  with pytest.raises(ValueError, match="encode expects images"):
    tokenizer.encode(np.zeros((2, 64, 64, 3)))
  with pytest.raises(ValueError, match="must lie in"):
    tokenizer.decode(np.full((1, 4, 4), 64))


def test_api_on_a_folder_without_a_tokenizer(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"tokenizer_config\.json is missing"):
    api.ImageTokenizer.from_checkpoint(tmp_path)


# --- Pre-encoding -------------------------------------------------------------------------------


def _encode(trained_tokenizer, task, output, **overrides):
  arguments = dict(
    checkpoint_dir=str(trained_tokenizer), task=task, output_dir=str(output),
    splits=("test",), batch_size=4, shard_size=3,
  )  # fmt: skip
  arguments.update(overrides)
  return encode.encode(**arguments)


def _read(output, split="test"):
  provenance = token_records.read_provenance(output)
  description = token_records.feature_description(provenance)
  files = sorted(str(p) for p in output.glob(f"{split}-*.tfrecord"))
  dataset = tf.data.TFRecordDataset(files).map(lambda r: tf.io.parse_single_example(r, description))
  return list(dataset.as_numpy_iterator())


def test_encode_writes_shards_that_match_the_api(
  trained_tokenizer, shapes_task_name, shapes_tfds, tmp_path
):
  written = _encode(trained_tokenizer, shapes_task_name, tmp_path)
  assert written == {"test": 8}
  assert len(list(tmp_path.glob("test-00000-*.tfrecord"))) == 3  # 8 records in shards of 3.
  rows = _read(tmp_path)
  truth = {
    e["caption"].decode(): e["image"]
    for e in tfds.as_numpy(shapes_tfds[0].as_dataset(split="test", shuffle_files=False))
  }
  tokenizer = api.ImageTokenizer.from_checkpoint(trained_tokenizer)
  for row in rows:
    expected = tokenizer.encode(truth[row["caption"].decode()][None])[0].reshape(-1)
    np.testing.assert_array_equal(row["image_tokens"], expected)
  provenance = token_records.read_provenance(tmp_path)
  assert provenance.tokenizer_checkpoint.endswith("@6")
  assert provenance.grid == (4, 4)
  # The folder is a task at once.
  registry.register_pre_encoded_task("test_encoded_shapes", str(tmp_path))
  assert (
    seqio.get_mixture_or_task("test_encoded_shapes")
    .output_features["targets"]
    .vocabulary.vocab_size
    == 64
  )


def test_encode_resumes_after_the_finished_shards(trained_tokenizer, shapes_task_name, tmp_path):
  _encode(trained_tokenizer, shapes_task_name, tmp_path)
  complete = _read(tmp_path)
  last = sorted(tmp_path.glob("test-*.tfrecord"))[-1]
  last.unlink()  # As if killed before the last shard was renamed into place.
  (tmp_path / f".{last.name}.tmp").write_bytes(b"half a shard")
  written = _encode(trained_tokenizer, shapes_task_name, tmp_path)
  assert written == {"test": 2}  # Only the missing shard (records 6 and 7) was encoded again.
  assert [r["key"] for r in _read(tmp_path)] == [r["key"] for r in complete]


def test_encode_refuses_another_tokenizer(trained_tokenizer, shapes_task_name, tmp_path):
  _encode(trained_tokenizer, shapes_task_name, tmp_path)
  other = tmp_path / "other_tokenizer"
  shutil.copytree(trained_tokenizer, other)
  with pytest.raises(ConfigError, match="made by another tokenizer"):
    _encode(other, shapes_task_name, tmp_path)


def test_encode_skips_and_counts_corrupt_records(trained_tokenizer, tmp_path):
  from PIL import Image

  folder = tmp_path / "images"
  folder.mkdir()
  for i in range(4):
    Image.new("RGB", (48, 40), (i * 60, 0, 0)).save(folder / f"{i}.png")  # Resized and cropped.
    (folder / f"{i}.txt").write_text(f"image {i}")
  (folder / "2.png").write_bytes(b"corrupt")
  (folder / "bomb.png").write_bytes(decompression_bomb_png())
  (folder / "bomb.txt").write_text("a decompression bomb")
  Image.new("RGB", (48, 40)).save(folder / "0_uncaptioned.png")  # Read again for each shard.
  registry.register_image_text_task(
    "test_encode_folder", sources.folder_source(str(folder)), image_size=32
  )
  before = records.SKIPPED.counts().get("unreadable image", 0)
  bombs = records.SKIPPED.counts().get("image over the pixel limit", 0)
  uncaptioned = records.SKIPPED.counts().get("no caption", 0)
  written = _encode(trained_tokenizer, "test_encode_folder", tmp_path / "out", splits=("train",))
  assert written == {"train": 3}
  assert records.SKIPPED.counts()["unreadable image"] == before + 1
  assert records.SKIPPED.counts()["image over the pixel limit"] == bombs + 1
  assert records.SKIPPED.counts()["no caption"] == uncaptioned + 1  # Once, not once a shard.
  assert sorted(r["caption"].decode() for r in _read(tmp_path / "out", "train")) == [
    "image 0",
    "image 1",
    "image 3",
  ]
