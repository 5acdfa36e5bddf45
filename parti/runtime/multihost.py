"""Multi-host start-up: `jax.distributed.initialize` from flags, before any JAX work.

Every job calls `initialize_from_flags()` (through `gin_utils.run`). With no flags
it does nothing: a single process sees its local devices. On TPU pods and SLURM,
`--multihost` lets JAX find the coordinator itself; elsewhere (GPU clusters, or
several local processes in tests) pass all three of --coordinator_address,
--num_processes and --process_id.
"""

from __future__ import annotations

import jax
from absl import flags, logging

from parti.runtime.errors import ConfigError

_MULTIHOST = flags.DEFINE_bool(
  "multihost", False, "Call jax.distributed.initialize() and let JAX detect the cluster."
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0, for jax.distributed.initialize."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def initialize_from_flags() -> None:
  """Joins the cluster that the flags describe, if any."""
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(value is not None for value in explicit):
    if any(value is None for value in explicit):
      raise ConfigError(
        "Multi-host needs all of --coordinator_address, --num_processes and --process_id."
      )
    if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
      raise ConfigError(f"--process_id {_PROCESS_ID.value} is not in [0, {_NUM_PROCESSES.value}).")
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  elif _MULTIHOST.value:
    jax.distributed.initialize()
  else:
    return
  logging.info(
    "Process %d of %d: %d local and %d global devices.",
    jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
  )  # fmt: skip
