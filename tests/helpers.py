"""Test helpers, in one module: tests import this, never each other (nor conftest).

conftest.py fakes the devices and holds the fixtures; everything else shared between
test modules (tiny configs, example batches, multi-host launching) lives here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import linen as nn

from parti import partitioning
from parti.modeling.config import PartiConfig
from parti.modeling.model import Parti

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


# The (data, fsdp, model) layouts that sharding tests sweep over 8 devices.
MESH_LAYOUTS = {
  "8x1": partitioning.MeshConfig(data=8, model=1),
  "4x2": partitioning.MeshConfig(data=4, model=2, rules="model_parallel"),
  "2x4": partitioning.MeshConfig(data=2, model=4, rules="model_parallel"),
  "1x8": partitioning.MeshConfig(data=1, model=8, rules="model_parallel"),
  "fsdp4x2": partitioning.MeshConfig(data=1, fsdp=4, model=2, rules="fsdp"),
}


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


def tiny_reranker_config(**overrides):
  """The contrastive reranker the tests train: 32 px, width 32, one block per tower."""
  from parti.modeling.contrastive import ContrastiveConfig

  fields = dict(
    text_vocab_size=128, text_length=16, image_size=32, patch_size=8, width=32, mlp_dim=64,
    num_heads=2, text_layers=1, image_layers=1, embed_dim=16,
  )  # fmt: skip
  return ContrastiveConfig(**{**fields, **overrides})


def train_tiny_reranker(model_dir, task, **overrides):
  """Trains the tiny contrastive reranker on `task`; returns its last evaluation."""
  from parti import partitioning
  from parti.train_contrastive import train_contrastive
  from parti.training import optim

  args = dict(
    model_dir=str(model_dir), model=tiny_reranker_config(),
    mixture_or_task_name=task, batch_size=8, num_steps=80,
    optimizer=optim.AdamConfig(learning_rate=3e-3, warmup_steps=3),
    mesh=partitioning.MeshConfig(data=4, model=2), eval_every=80, eval_batches=1, log_every=10,
    checkpoint_every=40,
  )  # fmt: skip
  return train_contrastive(**{**args, **overrides})


def tiny_config(**overrides) -> PartiConfig:
  base = dict(
    text_vocab_size=100,
    text_length=8,
    image_vocab_size=64,
    image_grid=(3, 4),
    embed_dim=32,
    mlp_dim=64,
    num_heads=4,
    num_encoder_layers=2,
    num_decoder_layers=2,
    dtype="float32",
    cfg_dropout_rate=0.0,
  )
  return PartiConfig(**{**base, **overrides})


def example_batch(config: PartiConfig, batch: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  targets = rng.integers(0, config.image_vocab_size, (batch, config.image_length)).astype(np.int32)
  text = rng.integers(2, config.text_vocab_size, (batch, config.text_length)).astype(np.int32)
  lengths = rng.integers(1, config.text_length + 1, batch)
  text[np.arange(config.text_length)[None] >= lengths[:, None]] = 0  # Ragged padding.
  return {
    "encoder_input_tokens": text,
    "decoder_input_tokens": np.concatenate(
      [np.full((batch, 1), config.bos_id, np.int32), targets[:, :-1]], axis=1
    ),
    "decoder_target_tokens": targets,
    "decoder_loss_weights": np.ones_like(targets),
  }


@functools.cache
def _jitted_forward(config: PartiConfig):
  model = Parti(config)
  return jax.jit(lambda p, t, d: model.apply({"params": p}, t, d))


def forward(config: PartiConfig, params, text, image_tokens):
  """The jitted teacher-forced logits (eager linen would compile op by op)."""
  return _jitted_forward(config)(params, text, image_tokens)


def module_params(module: nn.Module, *inputs, seed: int = 0):
  """Any linen module's unboxed parameters, initialized as one jitted program (eager
  linen would compile op by op)."""
  return jax.jit(lambda *x: nn.meta.unbox(module.init(jax.random.key(seed), *x))["params"])(*inputs)


@functools.cache
def init_params(config: PartiConfig):
  batch = example_batch(config, 1)
  init = jax.jit(lambda t, d: Parti(config).init(jax.random.key(0), t, d)["params"])
  return nn.meta.unbox(init(batch["encoder_input_tokens"], batch["decoder_input_tokens"]))


def tiny_run_config(**overrides) -> PartiConfig:
  """A Parti that writes the test tokenizer's codes (64) on its 4x4 grid: the model of
  the training and inference jobs' tests."""
  fields = dict(
    text_vocab_size=128, text_length=16, image_vocab_size=64, image_grid=(4, 4), embed_dim=32,
    mlp_dim=64, num_heads=4, num_encoder_layers=1, num_decoder_layers=2, dtype="float32",
  )  # fmt: skip
  return PartiConfig(**{**fields, **overrides})


@functools.cache
def decompression_bomb_png(side: int = 20_000) -> bytes:
  """A 1-bit PNG of side x side black pixels: about 50 KB that would decode to
  side**2 pixels (400 million by default), written row by row without decoding it."""
  import struct
  import zlib

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  row = b"\0" * (1 + (side + 7) // 8)  # The filter byte, then the packed bits.
  compressor = zlib.compressobj(9)
  data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
  header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale.
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def read_geneval_folder(imagedir):
  """GenEval's reader, rewritten from its documented layout (README, "Image generation" and
  evaluate_images.py's loop), not imported: numbered folders, each a metadata.jsonl of one
  JSON object and samples/<digits>.png."""
  found = []
  for subfolder in os.listdir(imagedir):
    folderpath = os.path.join(imagedir, subfolder)
    if not os.path.isdir(folderpath) or not subfolder.isdigit():
      continue
    with open(os.path.join(folderpath, "metadata.jsonl")) as fp:
      metadata = json.load(fp)
    for imagename in os.listdir(os.path.join(folderpath, "samples")):
      imagepath = os.path.join(folderpath, "samples", imagename)
      if os.path.isfile(imagepath) and re.match(r"\d+\.png", imagename):
        found.append((int(subfolder), metadata, imagepath))
  return sorted(found, key=lambda x: (x[0], x[2]))
