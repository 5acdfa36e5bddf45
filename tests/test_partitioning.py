"""Meshes over the 8 fake devices, the rule sets, and sharded compute equal to numpy."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from parti import device_check, partitioning
from parti.runtime.errors import ConfigError


def test_mesh_uses_every_device_with_auto_axes(mesh_config):
  mesh = partitioning.create_mesh(mesh_config)
  assert mesh.axis_names == partitioning.MESH_AXES
  assert mesh.devices.size == 8
  assert set(mesh.axis_types) == {AxisType.Auto}
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_minus_one_takes_the_remaining_devices():
  assert partitioning.MeshConfig(data=-1, model=2).axis_sizes(8) == (4, 1, 2)
  assert partitioning.MeshConfig(data=2, fsdp=-1, model=2).axis_sizes(8) == (2, 2, 2)


@pytest.mark.parametrize(
  ("config", "message"),
  [
    (dict(data=-1, model=3), "does not divide the 8 devices"),
    (dict(data=2, model=2), "needs 4 devices but 8 are available"),
  ],
)
def test_mesh_that_does_not_fit_is_a_clear_error(config, message):
  with pytest.raises(ConfigError, match=message):
    partitioning.create_mesh(partitioning.MeshConfig(**config))


@pytest.mark.parametrize(
  ("config", "message"),
  [
    (dict(data=-1, model=-1), "At most one"),
    (dict(model=0), "positive int or -1"),
    (dict(model=2.0), "positive int or -1"),
    (dict(rules="megatron"), "Unknown rule set 'megatron'"),
  ],
)
def test_bad_mesh_config_is_rejected_on_construction(config, message):
  with pytest.raises(ConfigError, match=message):
    partitioning.MeshConfig(**config)


def test_batch_must_divide_the_data_axes(mesh_4x2):
  partitioning.check_batch_size(8, mesh_4x2)
  with pytest.raises(ConfigError, match="Use a multiple of 4"):
    partitioning.check_batch_size(6, mesh_4x2)


def test_every_rule_set_names_the_same_logical_axes():
  names = {
    tuple(sorted(logical for logical, _ in rules)) for rules in partitioning.RULE_SETS.values()
  }
  assert len(names) == 1
  mesh_axes = {
    axis
    for rules in partitioning.RULE_SETS.values()
    for _, target in rules
    for axis in ((target,) if isinstance(target, str) else (target or ()))
  }
  assert mesh_axes <= set(partitioning.MESH_AXES)


@pytest.mark.parametrize(
  ("rules", "axes", "spec"),
  [
    ("data_parallel", ("embed", "mlp"), PartitionSpec(None, None)),
    ("model_parallel", ("embed", "mlp"), PartitionSpec(None, "model")),
    ("model_parallel", ("batch", "length", "embed"), PartitionSpec(("data", "fsdp"), None, None)),
    ("fsdp", ("embed", "mlp"), PartitionSpec("fsdp", "model")),
    ("2d", ("embed", "mlp"), PartitionSpec("model", "fsdp")),
  ],
)
def test_logical_to_spec(rules, axes, spec):
  assert partitioning.logical_to_spec(axes, partitioning.RULE_SETS[rules]) == spec


def test_sharded_matmul_equals_numpy(mesh_config):
  mesh = partitioning.create_mesh(mesh_config)
  error = device_check.sharded_matmul_error(mesh, partitioning.rules_for(mesh_config))
  assert error < 1e-3


def test_arrays_are_really_split(mesh_4x2):
  sharding = partitioning.logical_sharding(
    mesh_4x2, ("batch", "mlp"), partitioning.RULE_SETS["model_parallel"]
  )
  x = jax.device_put(np.zeros((8, 6), np.float32), sharding)
  assert {shard.data.shape for shard in x.addressable_shards} == {(2, 3)}
