"""The Fréchet distance against closed forms and a direct scipy computation; bad statistics."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from parti.evaluation.fid import FeatureStatistics, frechet_distance


def _gaussian(mu, sigma, count):
  return FeatureStatistics(np.asarray(mu, float), np.asarray(sigma, float), count)


def test_diagonal_gaussians_match_the_closed_form():
  a = _gaussian([0.0, 1.0, 2.0], np.diag([1.0, 4.0, 9.0]), 10)
  b = _gaussian([1.0, 1.0, 0.0], np.diag([4.0, 1.0, 1.0]), 10)
  # For diagonal covariances: |mu1 - mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)).
  expected = (1 + 0 + 4) + (1 + 4 - 4) + (4 + 1 - 4) + (9 + 1 - 6)
  assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
  assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_feature_sets_match_a_direct_scipy_computation():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((500, 8)) @ rng.standard_normal((8, 8))
  y = rng.standard_normal((400, 8)) * 1.5 + 0.3
  a, b = FeatureStatistics.of(x), FeatureStatistics.of(y)
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  mean_term = np.sum((x.mean(0) - y.mean(0)) ** 2)
  expected = mean_term + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
  assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
  assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_few_samples_for_the_width_still_give_a_finite_distance():
  rng = np.random.default_rng(1)
  a = FeatureStatistics.of(rng.standard_normal((5, 32)))  # Rank-4 covariance.
  b = FeatureStatistics.of(rng.standard_normal((5, 32)))
  assert np.isfinite(frechet_distance(a, b)) and frechet_distance(a, b) > 0
  # pytorch-fid's recipe for this case: sqrtm of the product with eps added to both.
  offset = np.eye(32) * 1e-6
  root = scipy.linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset)).real
  expected = np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma + b.sigma - 2 * root)
  assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-4)


def test_statistics_round_trip_and_bad_input(tmp_path):
  stats = FeatureStatistics.of(np.random.default_rng(2).standard_normal((20, 4)))
  stats.save(tmp_path / "ref.npz")
  loaded = FeatureStatistics.load(tmp_path / "ref.npz")
  np.testing.assert_array_equal(loaded.sigma, stats.sigma)
  assert loaded.count == 20
  with pytest.raises(FileNotFoundError, match=r"missing\.npz"):
    FeatureStatistics.load(tmp_path / "missing.npz")
  np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
  with pytest.raises(ValueError, match="lacks"):
    FeatureStatistics.load(tmp_path / "bad.npz")
  with pytest.raises(ValueError, match="NaN"):
    FeatureStatistics.of(np.array([[0.0, np.nan], [1.0, 2.0]]))
  with pytest.raises(ValueError, match=r"N >= 2"):
    FeatureStatistics.of(np.zeros((1, 3)))
  with pytest.raises(ValueError, match="widths differ"):
    frechet_distance(stats, FeatureStatistics.of(np.zeros((3, 5)) + np.arange(3)[:, None]))
