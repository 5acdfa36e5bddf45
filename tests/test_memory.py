"""The memory estimate: exact state bytes per device, activations, and the compiled step."""

from __future__ import annotations

import json

import gin
import jax
import numpy as np
import pytest
from helpers import MESH_LAYOUTS

from parti import memory, partitioning
from parti.modeling.config import PartiConfig
from parti.runtime import gin_utils
from parti.runtime.errors import ConfigError
from parti.training import optim
from parti.training.trainer import PartiTrainer

TINY = PartiConfig(
  text_vocab_size=128, text_length=16, image_vocab_size=256, image_grid=(4, 4), embed_dim=64,
  mlp_dim=128, num_heads=4, num_encoder_layers=1, num_decoder_layers=2, dtype="bfloat16",
)  # fmt: skip


def _device_bytes(tree) -> int:
  """Bytes that device 0 really holds of a tree of sharded arrays."""
  device = jax.devices()[0]
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
  return total


LAYOUTS = {**MESH_LAYOUTS, "2d": partitioning.MeshConfig(data=1, fsdp=4, model=2, rules="2d")}


@pytest.mark.parametrize("layout", ["8x1", "2x4", "fsdp4x2", "2d"])
def test_state_bytes_equal_what_a_sharded_init_holds(layout):
  mesh_config = LAYOUTS[layout]
  optimizer = optim.AdafactorConfig(quantize_momentum=True)
  report = memory.estimate_memory(
    model=TINY, mesh=mesh_config, batch_size=8, optimizer=optimizer, compile=False
  )
  trainer = PartiTrainer(TINY, optim.adafactor(optimizer))
  mesh = partitioning.create_mesh(mesh_config)
  state, _ = partitioning.init_sharded(
    lambda: trainer.init(0), mesh, partitioning.rules_for(mesh_config)
  )
  assert report.parameters == sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  assert report.parameter_bytes == _device_bytes(state.params)
  assert report.optimizer_bytes == _device_bytes(state.opt_state)
  if mesh_config.model > 1 or mesh_config.fsdp > 1:
    unsplit = memory.estimate_memory(
      model=TINY, mesh=MESH_LAYOUTS["8x1"], batch_size=8, optimizer=optimizer, compile=False
    )
    assert report.parameter_bytes < unsplit.parameter_bytes


def test_a_mesh_axis_splits_one_dimension_of_an_array():
  rules = partitioning.RULE_SETS["2d"]
  sizes = {"data": 1, "fsdp": 4, "model": 2}
  assert memory._dim_splits(("embed", "mlp"), rules, sizes) == [2, 4]
  # In an activation the batch takes fsdp first, so its heads are not split again.
  assert memory._dim_splits(("batch", "length", "heads", "kv"), rules, sizes) == [4, 1, 1, 1]
  assert memory._activation_splits(rules, sizes)("heads") == 1
  assert memory._activation_splits(rules, sizes)("embed") == 2


def test_activations_follow_the_remat_policy_and_the_batch_split():
  def activations(**changes):
    return memory.activation_bytes_per_example(TINY.replace(**changes), text_length=16)

  assert activations(remat_policy="full") < activations(remat_policy="save_dots")
  assert activations(remat_policy="save_dots") < activations(remat_policy="none")
  assert activations(num_decoder_layers=4) > activations(num_decoder_layers=2)
  per_device = {
    data: memory.estimate_memory(
      model=TINY, mesh=partitioning.MeshConfig(data=data, model=8 // data), batch_size=16,
      compile=False,
    ).activation_bytes
    for data in (2, 8)
  }  # fmt: skip
  assert per_device[2] == 4 * per_device[8]


def test_memory_gin_compiles_on_the_local_devices(tmp_path):
  gin.clear_config()
  try:
    gin_utils.parse(
      ["gin/runs/memory.gin", "gin/models/parti_tiny.gin", "gin/partitioning/model_parallel_4.gin"],
      [f"MODEL_DIR = '{tmp_path}'", "NUM_DEVICES = 8", "BATCH_SIZE = 16", "TEXT_LENGTH = 32"],
    )
    report = memory.configured_estimate_memory()
  finally:
    gin.clear_config()
  assert report.mesh == {"data": 2, "fsdp": 1, "model": 4}
  compiled = report.compiled
  assert compiled is not None and compiled.platform == "cpu"
  # The step's inputs are the state and this device's slice of the batch, nothing more.
  batch_bytes = (16 // 2) * (32 + 3 * 256) * 4  # int32 text and 3 image-token features.
  state_bytes = report.parameter_bytes + report.optimizer_bytes
  # Within a few scalars, which jit drops when the step does not read them.
  assert abs(compiled.arguments - batch_bytes - state_bytes) < 1024
  assert compiled.aliased >= report.parameter_bytes  # The state is donated.
  assert compiled.temporaries > 0 and compiled.peak > compiled.arguments
  saved = json.loads((tmp_path / memory.REPORT).read_text())
  assert saved["compiled"]["peak"] == compiled.peak
  assert saved["parameter_bytes"] == report.parameter_bytes


def test_too_few_devices_skip_compilation_with_the_way_to_get_them():
  report = memory.estimate_memory(
    model=TINY, mesh=partitioning.MeshConfig(data=-1, model=4), batch_size=64, num_devices=64
  )
  assert report.compiled is None
  assert "JAX_NUM_CPU_DEVICES=64" in report.compile_note
  assert report.mesh == {"data": 16, "fsdp": 1, "model": 4}


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    (dict(num_devices=7), "does not divide the 7 devices"),
    (dict(batch_size=10), "does not split over the 4-way data axes"),
    (dict(microbatches=3), "does not split over the 4-way data axes"),
  ],
)
def test_bad_layouts_are_refused(overrides, message):
  args = dict(model=TINY, mesh=partitioning.MeshConfig(data=-1, model=2), batch_size=16)
  with pytest.raises(ConfigError, match=message):
    memory.estimate_memory(**{**args, "compile": False, **overrides})


def test_a_topology_without_libtpu_names_what_to_install(monkeypatch):
  from jax.experimental import topologies

  def without_libtpu(*args, **kwargs):
    # What jax raises on a machine without libtpu (CI's).
    raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology.")

  monkeypatch.setattr(topologies, "get_topology_desc", without_libtpu)
  with pytest.raises(ConfigError, match="pip install libtpu"):
    memory.topology_devices("v4:2x2x1")


def test_report_reads_as_a_table():
  report = memory.estimate_memory(model=TINY, mesh=MESH_LAYOUTS["4x2"], batch_size=8, compile=False)
  text = "\n".join(report.lines())
  for row in ("parameters", "optimizer state", "gradients", "activations", "not compiled"):
    assert row in text
  assert np.isclose(
    report.estimated_total,
    2 * report.parameter_bytes + report.optimizer_bytes + report.activation_bytes,
  )
