"""Deprecations in our code are errors; the matmul peak is measured, not assumed."""

from __future__ import annotations

import importlib
import math
import pkgutil

import pytest

import parti
from parti.modeling import flops


def test_deprecation_warning_from_parti_code_is_an_error():
  with pytest.raises(DeprecationWarning, match="old API"):
    exec(
      "import warnings; warnings.warn('old API', DeprecationWarning)",
      {"__name__": "parti.some_module"},
    )


def test_importing_every_module_emits_no_deprecation():
  for info in pkgutil.walk_packages(parti.__path__, "parti."):
    importlib.import_module(info.name)


def test_matmul_peak_is_measured():
  peak = flops.measure_matmul_peak(size=128, matmuls_per_trial=2, trials=2)
  assert math.isfinite(peak.flops_per_second)
  assert peak.flops_per_second > 1e6
  assert (peak.size, peak.dtype) == (128, "float32")


def test_matmul_peak_rejects_nonsense():
  with pytest.raises(ValueError, match="positive"):
    flops.measure_matmul_peak(size=0)
