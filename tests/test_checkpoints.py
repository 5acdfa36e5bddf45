"""Checkpointer on several hosts: two checkpointers of one job saving at once."""

from __future__ import annotations

import textwrap

from helpers import run_on_two_hosts

# Each host saves a sharded array to two checkpointers (a training job's latest and
# best) at every step, without waiting in between. The array (8 MiB) is big enough
# that one checkpointer's background commit is still running when the other's starts.
# Host 0 also waits on one of them, as `Checkpointer.save` does when it prunes the
# input states, so the hosts' threads run out of step.
_HOST = textwrap.dedent(
  """
  import argparse

  import jax
  import numpy as np

  parser = argparse.ArgumentParser()
  for flag in ("run", "--coordinator_address", "--num_processes", "--process_id"):
    parser.add_argument(flag)
  args = parser.parse_args()
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    args.coordinator_address, num_processes=int(args.num_processes),
    process_id=int(args.process_id),
  )

  from parti.training import checkpoints

  latest = checkpoints.Checkpointer(args.run, keep=2, save_every=1)
  best = checkpoints.Checkpointer(args.run, keep=1, save_every=1, subdir="best")
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
  for step in range(1, 13):
    array = jax.device_put(np.full((2048, 1024), step, np.float32), sharding)
    latest.save(step, {"state": {"x": array}})
    best.save(step, {"state": {"x": array}})
    if jax.process_index() == 0:
      latest.wait()
  latest.close()
  best.close()
  abstract = {"x": jax.ShapeDtypeStruct((2048, 1024), np.float32, sharding=sharding)}
  step, items, _ = latest.restore({"state": abstract})
  print("restored", step, float(items["state"]["x"].addressable_data(0)[0, 0]), flush=True)
  """
)


def test_two_checkpointers_save_at_once_on_two_hosts(tmp_path):
  # Orbax names its barriers by purpose; without a per-checkpointer prefix the two
  # checkpointers' commits met at one barrier name, which the coordination service
  # refuses, and the job hung for orbax's 300 s barrier timeout.
  script = tmp_path / "host.py"
  script.write_text(_HOST)
  outputs = run_on_two_hosts([str(script), str(tmp_path / "run")], tmp_path, devices=2, timeout=120)
  for output in outputs:
    assert "restored 12 12.0" in output, output[-3000:]
  assert sorted(
    p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()
  ) == [
    "11",
    "12",
  ]
