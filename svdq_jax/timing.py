"""Timing helper for benchmark scripts (never for tests)."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, *args, reps: int = 10, rounds: int = 5) -> float:
  """Median seconds per call of ``fn(*args)``: after one warm-up call, ``rounds`` rounds of
  ``reps`` back-to-back launches, each round timed up to the last result being ready."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / reps)
  return statistics.median(times)
