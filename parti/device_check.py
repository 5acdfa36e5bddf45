"""The device check job: is this machine (or pod) ready to train and sample?

It reports the software versions and devices, builds the configured mesh, runs a
sharded matmul through `jax.jit` with logical-axis shardings and compares it with
a numpy reference, and measures the matmul peak that benchmarks quote MFU
against. Run it first on a new machine or slice:

    python -m parti.device_check --gin_file=gin/runs/device_check.gin \
      --gin.MODEL_DIR=runs/device_check

It writes `device_check.json` and the operative `config.gin` to MODEL_DIR.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import pathlib
import platform

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from parti import partitioning
from parti.modeling import flops
from parti.runtime import files, gin_utils

REPORT = "device_check.json"
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


@dataclasses.dataclass(frozen=True)
class DeviceReport:
  """What the device check found.

  Attributes:
    versions: package name -> installed version.
    backend: the default JAX backend ("cpu", "gpu", "tpu").
    process_index: this host's index.
    process_count: number of hosts.
    device_kind: the kind of the first device.
    num_devices: devices over all hosts.
    mesh: mesh axis name -> size.
    sharded_max_error: largest |sharded - numpy| of the matmul check.
    matmul_flops_per_second: the measured single-device matmul peak.
    matmul_dtype: its dtype.
  """

  versions: dict[str, str]
  backend: str
  process_index: int
  process_count: int
  device_kind: str
  num_devices: int
  mesh: dict[str, int]
  sharded_max_error: float
  matmul_flops_per_second: float
  matmul_dtype: str


def _versions() -> dict[str, str]:
  versions = {"python": platform.python_version()}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = "not installed"
  return versions


def sharded_matmul_error(
  mesh: jax.sharding.Mesh, rules: partitioning.LogicalRules, batch: int = 64, dim: int = 128
) -> float:
  """Max |error| of a [batch, embed] @ [embed, mlp] matmul sharded over `mesh`.

  The inputs and output carry logical shardings, so the check exercises the same
  rules, collectives and device placement as the model's projections.
  """
  partitioning.check_batch_size(batch, mesh)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, dim), dtype=np.float32)
  w = rng.standard_normal((dim, 2 * dim), dtype=np.float32)
  x_sharding = partitioning.logical_sharding(mesh, ("batch", "embed"), rules)
  w_sharding = partitioning.logical_sharding(mesh, ("embed", "mlp"), rules)
  y_sharding = partitioning.logical_sharding(mesh, ("batch", "mlp"), rules)
  matmul = jax.jit(
    lambda x, w: jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST),
    in_shardings=(x_sharding, w_sharding),
    out_shardings=y_sharding,
  )
  y = matmul(jax.device_put(x, x_sharding), jax.device_put(w, w_sharding))
  reference = x.astype(np.float64) @ w.astype(np.float64)
  return float(np.max(np.abs(np.asarray(jax.device_get(y)) - reference)))


def device_check(
  *,
  output_dir: str | None = None,
  mesh: partitioning.MeshConfig = partitioning.MeshConfig(),
  matmul_size: int = 1024,
  matmul_dtype: str = "float32",
  tolerance: float = 1e-3,
) -> DeviceReport:
  """Checks the devices, the mesh and sharded compute; measures the matmul peak.

  Args:
    output_dir: where to write `device_check.json` and `config.gin` (None: nowhere).
    mesh: the mesh layout to build and test.
    matmul_size: side of the square matmuls timed for the peak.
    matmul_dtype: their dtype.
    tolerance: largest acceptable error of the sharded matmul.

  Returns:
    The report.

  Raises:
    ConfigError: the mesh does not fit the devices.
    RuntimeError: the sharded result differs from the numpy reference.
  """
  devices = jax.devices()
  logging.info(
    "Process %d of %d; %d devices (%s), %d local.",
    jax.process_index(),
    jax.process_count(),
    len(devices),
    devices[0].device_kind,
    jax.local_device_count(),
  )
  device_mesh = partitioning.create_mesh(mesh)
  logging.info("Mesh: %s, rules %r", dict(device_mesh.shape), mesh.rules)
  error = sharded_matmul_error(device_mesh, partitioning.rules_for(mesh))
  if not error <= tolerance:
    raise RuntimeError(
      f"Sharded matmul differs from numpy by {error:.3g} (> {tolerance}): the devices or "
      "their collectives are not computing correctly."
    )
  peak = flops.measure_matmul_peak(size=matmul_size, dtype=matmul_dtype)
  report = DeviceReport(
    versions=_versions(),
    backend=jax.default_backend(),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    device_kind=devices[0].device_kind,
    num_devices=len(devices),
    mesh={name: int(size) for name, size in device_mesh.shape.items()},
    sharded_max_error=error,
    matmul_flops_per_second=peak.flops_per_second,
    matmul_dtype=peak.dtype,
  )
  _print_summary(report)
  if output_dir is not None and jax.process_index() == 0:
    path = files.atomic_write_json(pathlib.Path(output_dir) / REPORT, dataclasses.asdict(report))
    gin_utils.write_operative_config(output_dir)
    print(f"Wrote {path}")
  return report


def _print_summary(report: DeviceReport) -> None:
  mesh = " x ".join(f"{name}={size}" for name, size in report.mesh.items())
  lines = [
    f"jax {report.versions['jax']} on {report.backend}: {report.num_devices} x {report.device_kind}"
    f" over {report.process_count} process(es)",
    f"mesh {mesh}: sharded matmul max error {report.sharded_max_error:.2e} (ok)",
    f"{report.matmul_dtype} matmul peak: {report.matmul_flops_per_second / 1e9:.1f} GFLOP/s per device",
  ]
  print("\n".join(lines))


# The gin edge: a configurable copy for `main`; `device_check` itself stays plain.
configured_device_check = gin.external_configurable(device_check)

if __name__ == "__main__":
  gin_utils.run(configured_device_check)
