"""The contrastive reranker: its model and loss, its training job, and scoring with it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import module_params, tiny_reranker_config, train_tiny_reranker

from parti.modeling import contrastive
from parti.modeling.contrastive import ContrastiveConfig, DualEncoder
from parti.runtime.errors import ConfigError
from parti.sampling import rerank
from parti.training import checkpoints

TINY = tiny_reranker_config()


@pytest.fixture(scope="module")
def tiny_model():
  model = DualEncoder(TINY)
  params = module_params(model, jnp.ones((1, 16), jnp.int32), jnp.zeros((1, 32, 32, 3)))
  return model, params


def test_embeddings_are_unit_vectors_and_ignore_padding_and_batch_neighbours(tiny_model):
  model, params = tiny_model
  rng = np.random.default_rng(0)
  tokens = np.zeros((3, 16), np.int32)
  tokens[0, :5], tokens[1, :9], tokens[2, :2] = (rng.integers(2, 77, n) for n in (5, 9, 2))
  images = rng.uniform(size=(3, 32, 32, 3)).astype(np.float32)
  apply = jax.jit(model.apply, static_argnames="method")  # Eager linen compiles op by op.
  text, image, scale = apply({"params": params}, tokens, images)
  np.testing.assert_allclose(np.linalg.norm(text, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(image, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)
  # More padding, or other rows in the batch, change nothing.
  longer = np.pad(tokens[:1, :8], ((0, 0), (0, 4)))
  alone = apply({"params": params}, longer, method=DualEncoder.encode_text)
  np.testing.assert_allclose(alone[0], text[0], atol=1e-5)
  one = apply({"params": params}, images[2:], method=DualEncoder.encode_image)
  np.testing.assert_allclose(one[0], image[2], atol=1e-5)
  # Images of another size are resized to the model's.
  big = jax.image.resize(images[:1], (1, 64, 64, 3), "nearest")
  resized = apply({"params": params}, big, method=DualEncoder.encode_image)
  assert resized.shape == (1, 16) and np.isfinite(resized).all()


def test_loss_matches_a_numpy_infonce_and_reports_retrieval_accuracy():
  rng = np.random.default_rng(1)
  text = rng.normal(size=(6, 4))
  image = rng.normal(size=(6, 4))
  loss, metrics = contrastive.contrastive_loss(jnp.asarray(text), jnp.asarray(image), 3.0)

  def cross_entropy(logits):
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(log_probs))

  logits = 3.0 * image @ text.T
  expected = 0.5 * (cross_entropy(logits) + cross_entropy(logits.T))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(
    metrics["image_to_text_accuracy"], np.mean(logits.argmax(1) == np.arange(6))
  )
  # Matched pairs: perfect retrieval, and a loss that falls as the scale grows.
  same = jnp.eye(6)
  low, perfect = contrastive.contrastive_loss(same, same, 10.0)
  high, _ = contrastive.contrastive_loss(same, same, 50.0)
  assert perfect["image_to_text_accuracy"] == perfect["text_to_image_accuracy"] == 1.0
  assert high < low
  np.testing.assert_allclose(contrastive.clip_score(jnp.array([0.3, -0.2])), [30.0, 0.0])


def test_config_refuses_bad_sizes(tmp_path):
  with pytest.raises(ConfigError, match="patch_size"):
    ContrastiveConfig(image_size=30, patch_size=8)
  with pytest.raises(ConfigError, match="num_heads"):
    ContrastiveConfig(width=30, num_heads=4)
  with pytest.raises(ConfigError, match="width"):
    ContrastiveConfig(width=-1)
  (tmp_path / contrastive.CONFIG_FILE).write_text(json.dumps({"depth": 3}))
  with pytest.raises(ConfigError, match="does not know"):
    ContrastiveConfig.load(tmp_path / contrastive.CONFIG_FILE)
  with pytest.raises(ConfigError, match="not a contrastive model run"):
    ContrastiveConfig.load(tmp_path / "elsewhere" / contrastive.CONFIG_FILE)


def _train(model_dir, task, **overrides):
  return train_tiny_reranker(model_dir, task, **overrides)


@pytest.mark.slow
def test_training_learns_to_match_captions_and_resumes(trained_reranker, shapes_task_name):
  from parti.runtime import metric_logging

  model_dir, result = trained_reranker
  metrics = metric_logging.read_metrics(model_dir)
  first, last = metrics[10]["train/loss"], metrics[80]["train/loss"]
  # It fits its 40 training pairs well below chance (log 8 over a batch of 8); 40
  # pairs are too few to generalize from, so the held-out figures are only reported.
  assert last < first and last < np.log(8) - 0.3, (first, last)
  assert {"eval/loss", "eval/image_to_text_accuracy"} <= set(result)
  assert (model_dir / contrastive.CONFIG_FILE).is_file()
  # A rerun with a later end resumes from step 80 rather than starting over.
  _train(model_dir, shapes_task_name, num_steps=82)
  assert max(metric_logging.read_metrics(model_dir)) == 82
  assert 82 in checkpoints.Checkpointer(model_dir).steps()


def test_training_refuses_bad_configs(tmp_path, shapes_task_name):
  with pytest.raises(ConfigError, match="text_vocab_size"):
    _train(tmp_path, shapes_task_name, model=ContrastiveConfig(text_vocab_size=8))
  with pytest.raises(ConfigError, match="at least 2"):
    _train(tmp_path, shapes_task_name, batch_size=1)
  with pytest.raises(ConfigError, match="Unknown seqio task"):
    _train(tmp_path, "no_such_task")
  with pytest.raises(ConfigError, match="'inputs' \\(text\\) and 'image'"):
    _train(tmp_path, shapes_task_name + "_images")


@pytest.mark.slow
def test_reranker_scores_images_against_their_prompts(trained_reranker, shapes_tfds):
  model_dir, _ = trained_reranker
  reranker = rerank.Reranker.from_checkpoint(model_dir)
  assert reranker.step in (80, 82)
  shapes, _ = shapes_tfds
  examples = list(shapes.as_dataset(split="validation").take(4).as_numpy_iterator())
  images = np.stack([e["image"] for e in examples]).astype(np.float32) / 255.0
  captions = [e["caption"].decode() for e in examples]
  scores = reranker.score(images, captions)
  assert scores.shape == (4,) and np.all(np.abs(scores) <= 1.0 + 1e-5)
  # The score is the cosine of the model's own embeddings.
  tokens = np.stack([reranker.encoder.encode(c) for c in captions])
  text, image, _ = DualEncoder(reranker.config).apply({"params": reranker.params}, tokens, images)
  np.testing.assert_allclose(scores, np.sum(np.asarray(text) * np.asarray(image), -1), atol=1e-5)
  with pytest.raises(ValueError, match="N prompts"):
    reranker.score(images, captions[:3])


def test_reranker_refuses_a_folder_without_a_run(tmp_path):
  with pytest.raises(ConfigError, match="not a contrastive model run"):
    rerank.Reranker.from_checkpoint(tmp_path)
  TINY.save(tmp_path / contrastive.CONFIG_FILE)
  with pytest.raises(ConfigError, match="no checkpoints"):
    rerank.Reranker.from_checkpoint(tmp_path)
