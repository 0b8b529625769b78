"""scripts/profile_w4a8_tiles.py's reading of Mosaic GPU's profiler traces (the profile
itself needs a GPU): regions paired per warpgroup, per-tile medians and shares."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import profile_w4a8_tiles as prof  # noqa: E402


def _trace(per_tid):
  """{tid: [(name, begin, end), ...]} -> the profiler's Chrome trace events, nested as
  given (a region inside another when its times are)."""
  events = []
  for tid, regions in per_tid.items():
    for name, begin, end in regions:
      events += [dict(name=name, ph="B", ts=begin, pid=1, tid=tid),
                 dict(name=name, ph="E", ts=end, pid=1, tid=tid)]
  return {"displayTimeUnit": "ns",
          "traceEvents": sorted(events, key=lambda e: (e["tid"], e["ts"], e["ph"] == "B"))}


def test_tiles_summarized():
  # two warpgroups, two tiles each: K loops of 10 and 12 us, epilogues of 2 and 4, a 1 us
  # gap between one tile's epilogue and the next K loop
  wg = lambda t0: [("k_loop", t0, t0 + 10), ("epilogue", t0 + 10, t0 + 12),
                   ("k_loop", t0 + 13, t0 + 25), ("epilogue", t0 + 25, t0 + 29)]
  per_wg = prof.regions(_trace({1: wg(0.0), 2: wg(5.0)}))
  assert per_wg[1] == [("k_loop", 0.0, 10.0), ("epilogue", 10.0, 12.0),
                       ("k_loop", 13.0, 25.0), ("epilogue", 25.0, 29.0)]
  got = prof.summarize(per_wg, k_steps=4)
  assert got["warpgroups"] == 2 and got["tiles"] == 4
  assert got["k_loop_us"] == 11.0 and got["k_step_us"] == 2.75
  assert got["epilogue_us"] == 3.0 and got["gap_us"] == 1.0
  assert got["share_k_loop"] == pytest.approx(22 / 29)
  assert got["share_epilogue"] == pytest.approx(6 / 29)
  assert got["share_gaps"] == pytest.approx(1 / 29)


def test_unbalanced_regions_rejected():
  trace = {"traceEvents": [dict(name="k_loop", ph="B", ts=0.0, tid=1),
                           dict(name="epilogue", ph="B", ts=1.0, tid=1),
                           dict(name="k_loop", ph="E", ts=2.0, tid=1)]}
  with pytest.raises(ValueError, match="'k_loop' ends inside 'epilogue'"):
    prof.regions(trace)
