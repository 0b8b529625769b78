"""Timing helper for benchmark scripts (never for tests)."""

from __future__ import annotations

import collections
import datetime
import glob
import json
import os
import statistics
import tempfile
import time

import jax
from jax.profiler import ProfileData


def save_results(path: str, results: list, **extra) -> dict:
  """Writes {device, date, jax, **extra, results} as JSON to ``path``; returns that header."""
  meta = dict(device=jax.devices()[0].device_kind, date=datetime.date.today().isoformat(),
              jax=jax.__version__, **extra)
  with open(path, "w") as f:
    json.dump(dict(meta, results=results), f, indent=1)
  return meta


def median_seconds(fn, *args, reps: int = 10, rounds: int = 5, warmup: int = 1) -> float:
  """Median seconds per call of ``fn(*args)``: after ``warmup`` calls, ``rounds`` rounds of
  ``reps`` back-to-back launches, each round timed up to the last result being ready."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / reps)
  return statistics.median(times)


def device_kernel_seconds(fn, *args, calls: int = 3) -> dict[str, float]:
  """Seconds per call of ``fn(*args)`` spent in each device kernel, by kernel name, from a
  ``jax.profiler`` trace of ``calls`` calls (after one warm-up call). Empty on a CPU."""
  return device_kernel_profile(fn, *args, calls=calls)[0]


# Gaps between consecutive kernels up to this long count as the stream's idle time between
# launches; longer ones are the host's time between calls.
LAUNCH_GAP_NS = 100_000


def launch_gaps(spans) -> tuple[int, int]:
  """(kernels, ns of the stream idle between consecutive ones) for one stream's kernel
  (start_ns, end_ns) spans: gaps up to ``LAUNCH_GAP_NS`` (longer ones are the host's time
  between calls; overlaps count nothing)."""
  spans = sorted(spans)
  gaps = (b[0] - a[1] for a, b in zip(spans, spans[1:]))
  return len(spans), sum(g for g in gaps if 0 < g <= LAUNCH_GAP_NS)


def busy_span(spans) -> tuple[int, int]:
  """(ns with at least one kernel running, ns from the first kernel's start to the last's
  end) for (start_ns, end_ns) spans of all of a device's streams: span - busy is the time the
  device sat idle, short gaps and the host's long ones alike."""
  if not spans:
    return 0, 0
  spans = sorted(spans)
  busy, (lo, hi) = 0, spans[0]
  for a, b in spans[1:]:
    if a > hi:
      busy, lo, hi = busy + hi - lo, a, b
    else:
      hi = max(hi, b)
  return busy + hi - lo, hi - spans[0][0]


def device_kernel_profile(fn, *args, calls: int = 3) -> tuple[dict[str, float], dict]:
  """(``device_kernel_seconds``, the streams' timeline per call: kernel launches, the idle
  ms between consecutive kernels of a stream, gaps up to ``LAUNCH_GAP_NS``, and ``busy_ms`` /
  ``span_ms``, ``busy_span`` over all streams, the gaps between calls included) from one
  trace. Empty on a CPU."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(calls):
        out = fn(*args)
      jax.block_until_ready(out)
    files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    data = ProfileData.from_file(files[0])
  totals: dict[str, float] = collections.defaultdict(float)
  launches, idle_ns, busy_ns, span_ns = 0, 0, 0, 0
  for plane in data.planes:
    if not plane.name.startswith("/device:"):
      continue
    # Kernel activity lives on the stream lines; "XLA Modules"/"XLA Ops" repeat it by HLO.
    streams = [line for line in plane.lines if line.name.startswith("Stream")]
    busy, span = busy_span([(e.start_ns, e.end_ns) for line in streams for e in line.events])
    busy_ns, span_ns = busy_ns + busy, span_ns + span
    for line in streams:
      n, idle = launch_gaps([(e.start_ns, e.end_ns) for e in line.events])
      launches, idle_ns = launches + n, idle_ns + idle
      for event in line.events:
        totals[event.name] += event.duration_ns * 1e-9 / calls
  return dict(totals), {"launches": launches / calls, "idle_ms": idle_ns * 1e-6 / calls,
                        "busy_ms": busy_ns * 1e-6 / calls, "span_ms": span_ns * 1e-6 / calls}
