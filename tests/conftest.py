"""Test harness: 8 fake CPU devices, so every run tests sharding; tiny fixtures; `slow`.

The device count must be set before JAX starts its backend, which is why this runs
at import time, before any test module imports jax.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Tests run on the CPU even where an accelerator is present: figures from a GPU
# belong in bench/, and results must not depend on the machine.
os.environ["JAX_PLATFORMS"] = "cpu"
# The suite is dominated by compiling many small programs. LLVM's optimization
# level 0 halves compile time on the 2-core CI machine (and slows execution by a
# third); numerics do not change. Benchmarks never run under this.
#
# The CPU backend's newer MLIR fusion emitters take longer to compile than its older loop
# emitters: turning them off cuts compiling a sharded gradient program by about 40% (one
# program of tests/test_parti_model.py: 3.3-4.3 s against 2.0-2.3 s), and the summed
# compile time of the suite from 1184 s to 642 s. Rounding moves by a few ulps (two
# tolerances say so). XLA aborts the process on a flag it does not know, so a jaxlib
# without this one is asked first, once: the answer travels to the xdist workers and
# subprocesses in the environment.
_OPT_LEVEL_0 = "--xla_backend_optimization_level=0"
_FAST_COMPILE_FLAGS = f"{_OPT_LEVEL_0} --xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flags: str) -> bool:
  probe = [sys.executable, "-c", "import jax; jax.devices('cpu')"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
  return subprocess.run(probe, env=env, capture_output=True, timeout=120).returncode == 0


if "PARTI_TEST_XLA_FLAGS" not in os.environ:
  accepted = _xla_accepts(_FAST_COMPILE_FLAGS)
  os.environ["PARTI_TEST_XLA_FLAGS"] = _FAST_COMPILE_FLAGS if accepted else _OPT_LEVEL_0
if os.environ["PARTI_TEST_XLA_FLAGS"] not in os.environ.get("XLA_FLAGS", ""):  # Workers inherit.
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " " + os.environ["PARTI_TEST_XLA_FLAGS"]
  ).strip()
# The jobs the tests launch as subprocesses (inference, training, the multi-process
# runs) compile the same small programs again in every process; JAX's persistent
# compilation cache lets the later ones load them (tests/test_infer.py from a cold
# cache: 216 s against 251 s). Set through the environment so the subprocesses inherit
# it; keyed by the program, jax version and flags, so a stale entry is never used.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "jax_compilation"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment above, which jax reads on import)

NUM_DEVICES = 8
jax.config.update("jax_num_cpu_devices", NUM_DEVICES)

from helpers import MESH_LAYOUTS, tiny_tokenizer_config, train_tiny_reranker  # noqa: E402

from parti import partitioning  # noqa: E402


def pytest_configure(config):
  devices = jax.devices()
  if len(devices) != NUM_DEVICES:
    raise pytest.UsageError(
      f"conftest could not fake {NUM_DEVICES} CPU devices (got {len(devices)}): "
      "something started the JAX backend before conftest ran."
    )
  # xdist declares the mark it reads; without xdist (`-p no:xdist`) --strict-markers would
  # refuse the marks pytest_collection_modifyitems adds.
  config.addinivalue_line("markers", "xdist_group(name): the tests xdist runs on one worker")


# Session fixtures are made once per xdist worker. The files that use this one (a
# trained tokenizer: about a minute on the 2-core machine, twice that beside another
# worker) run on one worker, as one xdist group; every other file is its own group, so
# its module fixtures are made once. `make test` runs with --dist loadgroup.
SHARED_ON_ONE_WORKER = "trained_tokenizer"


# tryfirst: xdist's own hook of this name reads the xdist_group marks into the node ids
# it schedules by, so the marks must be on the items before it runs.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  sharing = {item.path for item in items if SHARED_ON_ONE_WORKER in item.fixturenames}
  for item in items:
    group = SHARED_ON_ONE_WORKER if item.path in sharing else item.path.name
    item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(optionalhook=True)  # An xdist hook: pytest without xdist has no such spec.
def pytest_xdist_node_collection_finished(node, ids):
  """Under --dist loadgroup, stops the run at once if a worker's tests lost their groups.

  xdist sends a group to one worker by the "@group" suffix its worker writes into each
  node id; under pytest 9.2 that write no longer takes (pytest-xdist#1386), and the suite
  would still pass, only slower (1046 s against 612 s on one machine), with the shared
  fixtures made on both workers.
  """
  if node.config.getvalue("dist") == "loadgroup" and ids and not any("@" in i for i in ids):
    pytest.exit(
      f"--dist loadgroup lost the test groups on {node.gateway.id} ({ids[0]} has none): "
      f"this pytest ({pytest.__version__}) and pytest-xdist do not work together "
      "(pytest-xdist#1386); reinstall with `pip install -e '.[dev]'`, whose pytest is "
      "pinned below 9.2.",
      returncode=4,
    )


@pytest.fixture(params=sorted(MESH_LAYOUTS), ids=str)
def mesh_config(request) -> partitioning.MeshConfig:
  """Each mesh layout in turn."""
  return MESH_LAYOUTS[request.param]


@pytest.fixture
def mesh_4x2() -> jax.sharding.Mesh:
  """The 4 (data) x 2 (model) mesh over the 8 fake devices."""
  return partitioning.create_mesh(MESH_LAYOUTS["4x2"])


@pytest.fixture
def run_python():
  """Runs `python -c code` (or `python -m ...` with args) in a fresh interpreter.

  The child sees the same 8 fake CPU devices; it returns the CompletedProcess with
  text output, and fails the test with the child's stderr if `check` and it failed.
  """

  def run(*args: str, cwd=None, check: bool = True, env=None, timeout: float = 300):
    child_env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(NUM_DEVICES)}
    child_env.update(env or {})
    result = subprocess.run(
      [sys.executable, *args],
      cwd=cwd,
      env=child_env,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
    )
    if check and result.returncode != 0:
      shown = " ".join(a if len(a) < 120 else a[:60] + "..." for a in args)
      pytest.fail(f"python {shown} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result

  return run


@pytest.fixture(scope="session")
def shapes_tfds(tmp_path_factory):
  """A tiny prepared parti_shapes config (32 px; 40/8/8/8 examples): (builder, data_dir)."""
  from parti.tasks.shapes import builder

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  config = builder.PartiShapesConfig(
    name="test_32", image_size=32, num_train=40, num_validation=8, num_test=8, num_compositional=8
  )
  shapes = builder.PartiShapes(config=config, data_dir=data_dir)
  shapes.download_and_prepare()
  return shapes, data_dir


@pytest.fixture(scope="session")
def shapes_task_name(shapes_tfds):
  """The tiny shapes data registered as tasks (text+image, and _images)."""
  import seqio

  from parti.tasks import registry

  shapes, data_dir = shapes_tfds
  seqio.set_tfds_data_dir_override(data_dir)
  registry._register_shapes(shapes.builder_config)
  return f"parti_shapes_{shapes.builder_config.name}"


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory, shapes_task_name):
  """A tokenizer trained for 6 steps on the tiny shapes: its MODEL_DIR."""
  from parti import partitioning
  from parti.tokenizer import losses, train
  from parti.training import optim

  model_dir = tmp_path_factory.mktemp("tokenizer")
  train.train(
    model_dir=str(model_dir),
    config=tiny_tokenizer_config(),
    task=shapes_task_name + "_images",
    batch_size=8,
    num_steps=6,
    loss_weights=losses.LossWeights(perceptual=0.0, adversarial=0.1, adversarial_start_step=3),
    optimizer=optim.AdamConfig(learning_rate=1e-3, warmup_steps=2),
    disc_optimizer=optim.AdamConfig(learning_rate=1e-4, warmup_steps=2),
    disc_channels=8,
    mesh=partitioning.MeshConfig(data=4, model=2),
    eval_every=3,
    eval_batches=1,
    log_every=3,
    checkpoint_every=3,
  )
  return model_dir


@pytest.fixture(scope="session")
def trained_reranker(tmp_path_factory, shapes_task_name):
  """A reranker trained for 80 steps on the tiny shapes: (MODEL_DIR, last evaluation)."""
  model_dir = tmp_path_factory.mktemp("reranker")
  return model_dir, train_tiny_reranker(model_dir, shapes_task_name)
