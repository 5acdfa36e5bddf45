"""The LPIPS-style perceptual loss: loader, distance, and its use in a training step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import tiny_tokenizer_config

from parti.tokenizer import losses, vgg
from parti.tokenizer import trainer as trainer_lib
from parti.training import optim


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
  """A torchvision-format VGG16 state dict with random weights, plus LPIPS channel weights."""
  rng = np.random.default_rng(0)
  arrays = {}
  for key, shape in vgg.expected_shapes().items():
    fan_in = np.prod(shape[1:]) if len(shape) == 4 else 1
    arrays[key] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float16)
  arrays["classifier.0.weight"] = np.zeros((4, 4), np.float16)  # Ignored.
  arrays["lin.0"] = np.ones((1, 64, 1, 1), np.float32)  # LPIPS's own shape.
  path = tmp_path_factory.mktemp("vgg") / "vgg16.npz"
  np.savez(path, **arrays)
  return path


def test_loader_reads_torchvision_layout(weights_file):
  weights = vgg.load_vgg16(weights_file)
  assert weights["features.0.weight"].shape == (3, 3, 3, 64)  # OIHW -> HWIO.
  assert weights["features.28.weight"].shape == (3, 3, 512, 512)
  assert weights["lin.0"].shape == (64,)
  assert "lin.1" not in weights
  assert "classifier.0.weight" not in weights


def test_distance_is_zero_for_equal_images_and_grows_with_difference(weights_file):
  weights = vgg.load_vgg16(weights_file)
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  noisy = jnp.clip(images + 0.1 * jax.random.normal(jax.random.key(1), images.shape), 0, 1)
  other = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3))
  distance = jax.jit(vgg.perceptual_distance)  # One compilation for the three.
  same = float(distance(weights, images, images))
  near = float(distance(weights, images, noisy))
  far = float(distance(weights, images, other))
  assert same == pytest.approx(0.0, abs=1e-6)
  assert 0 < near < far
  gradient = jax.jit(jax.grad(vgg.perceptual_distance, argnums=1))(weights, images, other)
  assert bool(jnp.all(jnp.isfinite(gradient)))
  assert float(jnp.abs(gradient).sum()) > 0


def test_missing_and_malformed_files(tmp_path, weights_file):
  with pytest.raises(FileNotFoundError, match=r"nope\.npz not found"):
    vgg.load_vgg16(tmp_path / "nope.npz")
  arrays = dict(np.load(weights_file))
  np.savez(
    tmp_path / "bad.npz", **{**arrays, "features.0.weight": arrays["features.0.weight"][:32]}
  )
  with pytest.raises(ValueError, match=r"features\.0\.weight has shape"):
    vgg.load_vgg16(tmp_path / "bad.npz")
  del arrays["features.28.bias"]
  np.savez(tmp_path / "incomplete.npz", **arrays)
  with pytest.raises(ValueError, match=r"no 'features\.28\.bias'"):
    vgg.load_vgg16(tmp_path / "incomplete.npz")


@pytest.mark.slow
def test_training_step_with_the_perceptual_loss(weights_file):
  trainer = trainer_lib.Trainer(
    tiny_tokenizer_config(),
    losses.LossWeights(perceptual=0.1, adversarial=0.1),
    optim.adam(optim.AdamConfig(warmup_steps=1), 10),
    optim.adam(optim.AdamConfig(warmup_steps=1), 10),
    8,
  )
  state = nn.meta.unbox(jax.jit(trainer.init)(jax.random.key(0)))
  images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  step = jax.jit(lambda s, x, w: trainer.train_step(s, x, True, w))
  _, metrics = step(state, images, vgg.load_vgg16(weights_file))
  assert float(metrics["loss/perceptual"]) > 0
  assert np.isfinite(float(metrics["loss/discriminator"]))
