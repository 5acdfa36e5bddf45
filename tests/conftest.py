"""Test harness: 8 fake CPU devices, so every run tests sharding; tiny fixtures; `slow`.

The device count must be set before JAX starts its backend, which is why this runs
at import time, before any test module imports jax.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import socket
import subprocess
import sys
import time

# Tests run on the CPU even where an accelerator is present: figures from a GPU
# belong in bench/, and results must not depend on the machine.
os.environ["JAX_PLATFORMS"] = "cpu"
# The suite is dominated by compiling many small programs. LLVM's optimization
# level 0 halves compile time on the 2-core CI machine (and slows execution by a
# third); numerics do not change. Benchmarks never run under this.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
).strip()

import jax
import pytest

NUM_DEVICES = 8
jax.config.update("jax_num_cpu_devices", NUM_DEVICES)

from parti import partitioning  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# The (data, fsdp, model) layouts that sharding tests sweep over 8 devices.
MESH_LAYOUTS = {
  "8x1": partitioning.MeshConfig(data=8, model=1),
  "4x2": partitioning.MeshConfig(data=4, model=2, rules="model_parallel"),
  "2x4": partitioning.MeshConfig(data=2, model=4, rules="model_parallel"),
  "1x8": partitioning.MeshConfig(data=1, model=8, rules="model_parallel"),
  "fsdp4x2": partitioning.MeshConfig(data=1, fsdp=4, model=2, rules="fsdp"),
}


def pytest_configure(config):
  devices = jax.devices()
  if len(devices) != NUM_DEVICES:
    raise pytest.UsageError(
      f"conftest could not fake {NUM_DEVICES} CPU devices (got {len(devices)}): "
      "something started the JAX backend before conftest ran."
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


def coordinator_address() -> str:
  """A free local host:port for the coordinator of a test's multi-process job."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return f"127.0.0.1:{s.getsockname()[1]}"


def run_on_two_hosts(
  arguments: list[str], log_dir: pathlib.Path, devices: int = 4, timeout: float = 400
) -> list[str]:
  """Runs `python ARGUMENTS --coordinator_address=... --num_processes=2 --process_id=I`
  as two processes of `devices` CPU devices each, as a two-host job is launched;
  returns what each printed.

  Each host logs to log_dir/hostI.log. When one fails the other would wait for it at
  a barrier, so the first failure kills both and fails the test with that host's
  log; so does running past `timeout`.
  """
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
  address = coordinator_address()
  logs = [log_dir / f"host{index}.log" for index in range(2)]
  hosts = []
  for index, log in enumerate(logs):
    with log.open("w") as sink:  # The child keeps its own copy of the descriptor.
      command = [
        sys.executable, *arguments, f"--coordinator_address={address}", "--num_processes=2",
        f"--process_id={index}",
      ]  # fmt: skip
      hosts.append(subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout
  try:
    while any(host.poll() is None for host in hosts):
      failed = [i for i, host in enumerate(hosts) if host.poll() not in (None, 0)]
      if failed or time.monotonic() > deadline:
        index = failed[0] if failed else 0
        what = f"failed ({hosts[index].returncode})" if failed else f"ran past {timeout} s"
        pytest.fail(f"host {index} of {arguments} {what}:\n{logs[index].read_text()[-4000:]}")
      time.sleep(0.5)
  finally:
    for host in hosts:
      host.kill()
  outputs = [log.read_text() for log in logs]
  for index, (host, output) in enumerate(zip(hosts, outputs, strict=True)):
    assert host.returncode == 0, f"host {index} failed:\n{output[-4000:]}"
  return outputs


def as_gin(job: str, args: dict) -> str:
  """A job's keyword arguments as a gin file (dataclasses as their configurables), for the
  multi-process tests, which start jobs through their command line."""
  lines = []
  for key, value in args.items():
    if dataclasses.is_dataclass(value):
      name = _GIN_NAMES[type(value).__name__]
      lines.append(f"{job}.{key} = @{name}()")
      lines += [f"{name}.{f.name} = {getattr(value, f.name)!r}" for f in dataclasses.fields(value)]
    else:
      lines.append(f"{job}.{key} = {value!r}")
  return "\n".join(lines) + "\n"


_GIN_NAMES = {
  "PartiConfig": "parti.PartiConfig",
  "MeshConfig": "partitioning.MeshConfig",
  "AdafactorConfig": "optim.AdafactorConfig",
  "SamplingOptions": "infer.SamplingOptions",
}


def tiny_tokenizer_config(**overrides):
  """The tokenizer the tests train: 32 px, 4x4 grid, 64 codes of dimension 8."""
  from parti.tokenizer.config import TokenizerConfig

  fields = dict(
    image_size=32, patch_size=8, encoder="tiny", decoder="tiny", codebook_size=64, code_dim=8,
    dtype="float32",
  )  # fmt: skip
  fields.update(overrides)
  return TokenizerConfig(**fields)


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
  from parti import optim, partitioning
  from parti.tokenizer import losses, train

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


def tiny_reranker_config(**overrides):
  """The contrastive reranker the tests train: 32 px, width 32, one block per tower."""
  from parti.contrastive import ContrastiveConfig

  fields = dict(
    text_vocab_size=128, text_length=16, image_size=32, patch_size=8, width=32, mlp_dim=64,
    num_heads=2, text_layers=1, image_layers=1, embed_dim=16,
  )  # fmt: skip
  return ContrastiveConfig(**{**fields, **overrides})


def train_tiny_reranker(model_dir, task, **overrides):
  """Trains the tiny contrastive reranker on `task`; returns its last evaluation."""
  from parti import optim, partitioning
  from parti.train_contrastive import train_contrastive

  args = dict(
    model_dir=str(model_dir), model=tiny_reranker_config(),
    mixture_or_task_name=task, batch_size=8, num_steps=80,
    optimizer=optim.AdamConfig(learning_rate=3e-3, warmup_steps=3),
    mesh=partitioning.MeshConfig(data=4, model=2), eval_every=80, eval_batches=1, log_every=10,
    checkpoint_every=40,
  )  # fmt: skip
  return train_contrastive(**{**args, **overrides})


@pytest.fixture(scope="session")
def trained_reranker(tmp_path_factory, shapes_task_name):
  """A reranker trained for 80 steps on the tiny shapes: (MODEL_DIR, last evaluation)."""
  model_dir = tmp_path_factory.mktemp("reranker")
  return model_dir, train_tiny_reranker(model_dir, shapes_task_name)
