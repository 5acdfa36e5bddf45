"""The Fréchet distance between two sets of image features (FID's formula).

    real = FeatureStatistics.of(real_features)        # [N, D] pool features
    fake = FeatureStatistics.of(generated_features)
    score = frechet_distance(real, fake)

||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), computed in float64; the
trace of the matrix square root comes from symmetric eigendecompositions (see
`frechet_distance`), which agrees with pytorch-fid's scipy `sqrtm` to rounding.
The statistics are saved to and loaded from `.npz` (`mu`, `sigma`, `count`), the
format pytorch-fid reads, so reference statistics are computed once.

The features come from Inception-v3's pool layer (`parti.evaluation.inception`, weights the
user supplies); `python -m parti.evaluate_images` runs the whole measurement.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class FeatureStatistics:
  """Mean [D] and covariance [D, D] of a set of features, and how many there were."""

  mu: np.ndarray
  sigma: np.ndarray
  count: int

  @classmethod
  def of(cls, features: np.ndarray) -> FeatureStatistics:
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
      raise ValueError(f"Need features [N >= 2, D], got shape {features.shape}.")
    if not np.isfinite(features).all():
      raise ValueError("Features contain NaN or Inf.")
    return cls(features.mean(axis=0), np.cov(features, rowvar=False), len(features))

  def save(self, path: str | pathlib.Path) -> None:
    from parti.runtime import files

    buffer = io.BytesIO()
    np.savez(buffer, mu=self.mu, sigma=self.sigma, count=self.count)
    files.atomic_write_bytes(path, buffer.getvalue())

  @classmethod
  def load(cls, path: str | pathlib.Path) -> FeatureStatistics:
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"Feature statistics {path} not found.")
    with np.load(path) as data:
      missing = {"mu", "sigma"} - set(data.files)
      if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}; it holds {data.files}.")
      count = int(data["count"]) if "count" in data.files else 0
      return cls(np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64), count)


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
  """The Fréchet distance between Gaussians fitted to two feature sets.

  Tr((S1 S2)^(1/2)) is computed as Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), which is the
  same number (the two matrices are similar), from two symmetric eigen-
  decompositions instead of scipy's general `sqrtm`: 7x faster at FID's 2048
  dimensions on 2 CPU cores (1.7 s vs 12 s), and a singular product (fewer
  images than dimensions) needs no epsilon and leaves no imaginary part.
  """
  if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
    raise ValueError(f"Feature widths differ: {a.mu.shape} vs {b.mu.shape}.")
  diff = a.mu - b.mu
  values, vectors = np.linalg.eigh(a.sigma)
  root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
  inner = np.linalg.eigvalsh(root_a @ b.sigma @ root_a)
  trace_root = float(np.sum(np.sqrt(np.clip(inner, 0.0, None))))
  return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_root)
