"""The Fréchet distance between two sets of image features (FID's formula).

    real = FeatureStatistics.of(real_features)        # [N, D] pool features
    fake = FeatureStatistics.of(generated_features)
    score = frechet_distance(real, fake)

||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), computed in float64 with scipy's
matrix square root, as pytorch-fid and TTUR compute it: when the product is
near-singular (few samples for the feature width), a small multiple of the
identity is added to both covariances, and an imaginary part left by rounding
is dropped if it is negligible. The statistics are saved to and loaded from
`.npz` (`mu`, `sigma`, `count`), the format pytorch-fid reads, so reference
statistics are computed once.

The features themselves come from an Inception-v3 pool layer, whose weights the
user supplies (none can be downloaded here); this module only needs the arrays.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib

import numpy as np
from absl import logging


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
    from parti import files

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


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics, eps: float = 1e-6) -> float:
  """The Fréchet distance between Gaussians fitted to two feature sets."""
  import scipy.linalg

  if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
    raise ValueError(f"Feature widths differ: {a.mu.shape} vs {b.mu.shape}.")
  diff = a.mu - b.mu
  root = scipy.linalg.sqrtm(a.sigma @ b.sigma)
  if not np.isfinite(root).all():
    logging.warning("Covariance product is singular; adding %g to the diagonals.", eps)
    offset = np.eye(a.sigma.shape[0]) * eps
    root = scipy.linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
  if np.iscomplexobj(root):
    if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
      raise ValueError(f"Imaginary part {np.max(np.abs(root.imag))} in the matrix square root.")
    root = root.real
  return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(root))
