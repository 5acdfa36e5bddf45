"""Inception-v3 features and the FID / CLIP-score job, on weights and images the tests write."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from parti import evaluate_images
from parti.evaluation import fid, inception
from parti.runtime.errors import ConfigError


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
  """Random weights in pytorch-fid's state-dict format (no real ones can be downloaded)."""
  path = tmp_path_factory.mktemp("inception") / "inception.npz"
  state = inception.random_weights(0)
  state["fc.weight"] = np.zeros((1008, 2048), np.float32)  # Ignored, as in a real export.
  np.savez(path, **state)
  return path


def _write_images(folder, seed, count, size=32, shift=0.0):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    pixels = np.clip(rng.uniform(size=(size, size, 3)) * 0.6 + shift, 0, 1)
    Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
  return folder


def test_the_network_has_inception_v3s_shapes_and_is_per_image(weights_file):
  shapes = inception.expected_shapes()
  assert len(shapes) == 94 * 5  # 94 BasicConv2d: a conv and four batch-norm arrays each.
  assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
  assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
  assert sum(np.prod(s) for s in shapes.values()) == 21_820_000  # torchvision's, less fc/aux.
  weights = inception.load_inception(weights_file)
  images = np.random.default_rng(0).uniform(size=(3, 48, 48, 3)).astype(np.float32)
  features = np.asarray(inception.pool_features(weights, images))
  assert features.shape == (3, 2048) and np.isfinite(features).all()
  assert (features >= 0).all()  # The mean of ReLU outputs.
  alone = np.asarray(inception.pool_features(weights, images[1:2]))
  np.testing.assert_allclose(alone[0], features[1], rtol=1e-4, atol=1e-5)


def test_batch_norm_is_folded_into_the_conv(tmp_path):
  # One conv + batch norm + ReLU against a direct numpy computation.
  state = inception.random_weights(1)
  np.savez(tmp_path / "w.npz", **state)
  weights = inception.load_inception(tmp_path / "w.npz")
  x = np.random.default_rng(2).normal(size=(1, 5, 5, 3)).astype(np.float32)
  got = np.asarray(inception._conv(weights, "Conv2d_1a_3x3", jnp.asarray(x), 2, (0, 0)))
  w = state["Conv2d_1a_3x3.conv.weight"]  # OIHW
  conv = np.zeros((1, 2, 2, 32), np.float32)
  for i in range(2):
    for j in range(2):
      patch = x[0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3]  # HWC
      conv[0, i, j] = np.einsum("hwc,ochw->o", patch, w)
  bn = {
    k: state[f"Conv2d_1a_3x3.bn.{k}"] for k in ("weight", "bias", "running_mean", "running_var")
  }
  expected = (conv - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-3) * bn["weight"]
  expected = np.maximum(expected + bn["bias"], 0)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_average_pool_excludes_the_padding():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  pooled = np.asarray(inception.average_pool_excluding_padding(jnp.asarray(x)))[0, :, :, 0]
  assert pooled[0, 0] == np.mean([0, 1, 4, 5])  # A corner averages its 4 in-image pixels.
  assert pooled[1, 1] == np.mean(x[0, 0:3, 0:3, 0])
  assert pooled[0, 1] == np.mean([0, 1, 2, 4, 5, 6])


def test_weights_file_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"missing\.npz not found.*pytorch-fid"):
    inception.load_inception(tmp_path / "missing.npz")
  (tmp_path / "junk.npz").write_bytes(b"not an npz")
  with pytest.raises(ValueError, match=r"junk\.npz is not a readable"):
    inception.load_inception(tmp_path / "junk.npz")
  state = inception.random_weights(0)
  del state["Mixed_5b.branch1x1.conv.weight"]
  np.savez(tmp_path / "partial.npz", **state)
  with pytest.raises(ValueError, match="lacks 1 Inception-v3 keys"):
    inception.load_inception(tmp_path / "partial.npz")
  state = inception.random_weights(0)
  state["Conv2d_1a_3x3.bn.bias"] = np.zeros(31, np.float32)
  np.savez(tmp_path / "bad.npz", **state)
  with pytest.raises(ValueError, match=r"Conv2d_1a_3x3.bn.bias has shape \(31,\)"):
    inception.load_inception(tmp_path / "bad.npz")


def test_same_size_batches_never_mix_shapes():
  images = [np.zeros((4, 4, 3))] * 3 + [np.zeros((8, 8, 3))] + [np.zeros((4, 4, 3))] * 2
  shapes = [b.shape for b in evaluate_images.same_size_batches(images, batch_size=2)]
  assert shapes == [(2, 4, 4, 3), (1, 4, 4, 3), (1, 8, 8, 3), (2, 4, 4, 3)]


@pytest.mark.slow
def test_fid_job_on_folders_and_saved_statistics(tmp_path, weights_file, caplog):
  # Four images a set and batches of four: one compilation for every pass.
  real = _write_images(tmp_path / "real", seed=0, count=4)
  same = _write_images(tmp_path / "same", seed=0, count=4)
  shifted = _write_images(tmp_path / "shifted", seed=1, count=4, shift=0.4)
  (shifted / "corrupt.png").write_bytes(b"\x89PNG truncated")
  run = lambda generated, reference, out: evaluate_images.evaluate_images(  # noqa: E731
    generated=str(generated), reference=str(reference), output_dir=str(tmp_path / out),
    inception_weights=str(weights_file), batch_size=4,
  )  # fmt: skip
  identical = run(same, real, "a")
  assert identical["fid"] == pytest.approx(0.0, abs=1e-3)
  with caplog.at_level("WARNING"):
    different = run(shifted, real, "b")
  assert "corrupt.png" in caplog.text
  assert different["generated_images"] == 4 and different["generated_unreadable"] == 1
  assert different["fid"] > 1.0
  # The distance is fid.frechet_distance of the two feature sets.
  weights = inception.load_inception(weights_file)
  feats = [
    np.asarray(inception.pool_features(weights, np.stack([evaluate_images.read_image(p)
      for p in sorted(folder.glob("0*.png"))])))
    for folder in (real, shifted)
  ]  # fmt: skip
  expected = fid.frechet_distance(*(fid.FeatureStatistics.of(f) for f in feats))
  assert different["fid"] == pytest.approx(expected, rel=1e-3)
  # Saved reference statistics give the same FID without the reference images.
  again = run(shifted, tmp_path / "b" / "reference_stats.npz", "c")
  assert again["fid"] == pytest.approx(different["fid"], rel=1e-6)
  saved = json.loads((tmp_path / "c" / evaluate_images.METRICS_JSON).read_text())
  assert saved["fid"] == again["fid"]
  assert "| FID (Inception-v3 pool3) |" in (tmp_path / "c" / evaluate_images.REPORT).read_text()


def test_fid_job_refuses_bad_inputs(tmp_path, weights_file):
  images = _write_images(tmp_path / "images", seed=0, count=3)
  # Every refusal comes before any image is run through the network.
  args = dict(
    generated=str(images), reference=str(images), output_dir=str(tmp_path / "out"),
    inception_weights=str(weights_file),
  )  # fmt: skip
  with pytest.raises(ConfigError, match="not found"):
    evaluate_images.evaluate_images(**{**args, "inception_weights": str(tmp_path / "none.npz")})
  with pytest.raises(ConfigError, match="Generated images folder"):
    evaluate_images.evaluate_images(**{**args, "generated": str(tmp_path / "nowhere")})
  with pytest.raises(ConfigError, match="neither a folder"):
    evaluate_images.evaluate_images(**{**args, "reference": str(tmp_path / "nowhere")})
  lone = _write_images(tmp_path / "lone", seed=0, count=1)
  with pytest.raises(ConfigError, match="at least 2 readable generated"):
    evaluate_images.evaluate_images(**{**args, "generated": str(lone)})
  with pytest.raises(ConfigError, match="needs each image's prompt"):
    evaluate_images.evaluate_images(**{**args, "reranker_dir": str(tmp_path)})


@pytest.mark.slow
def test_fid_and_clip_score_of_an_inference_run_against_a_task(
  tmp_path, weights_file, trained_reranker, shapes_task_name
):
  from parti.sampling.rerank import Reranker

  # An inference run's layout: a manifest naming each prompt's best image first.
  run_dir = _write_images(tmp_path / "infer" / "images", seed=3, count=4).parent
  prompts = ["a red circle", "two blue squares", "a green star", "three small triangles"]
  lines = [
    json.dumps({"index": i, "prompt": p, "files": [f"images/{i:03d}.png"]})
    for i, p in enumerate(prompts)
  ]
  (run_dir / "manifest-00000.jsonl").write_text("\n".join(lines) + "\n")
  metrics = evaluate_images.evaluate_images(
    generated=str(run_dir), reference=f"task:{shapes_task_name}_images:validation",
    output_dir=str(tmp_path / "out"), inception_weights=str(weights_file), batch_size=4,
    reranker_dir=str(trained_reranker[0]),
  )  # fmt: skip
  assert metrics["reference_images"] == 8 and np.isfinite(metrics["fid"])
  reranker = Reranker.from_checkpoint(trained_reranker[0])
  images = np.stack([evaluate_images.read_image(run_dir / f"images/{i:03d}.png") for i in range(4)])
  expected = np.mean(100 * np.maximum(reranker.score(images, prompts), 0))
  assert metrics["clip_score"] == pytest.approx(expected, abs=1e-3)
  assert "CLIP-style score" in (tmp_path / "out" / evaluate_images.REPORT).read_text()
