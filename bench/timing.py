"""What the throughput benches share: the best wall time of repeated jitted calls."""

import time

import jax


def best_time(fn, *args, repeats: int = 3) -> float:
  """Seconds of the fastest of `repeats` calls of `fn(*args)`, after one untimed call
  (compilation) and waiting for each result."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best
