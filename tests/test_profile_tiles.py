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
  # two warpgroups, two tiles each: copies 0.5 + barrier 1 + copies 0.5, K loops of 10 and
  # 12, epilogues of 2 and 4, a gap of 1 from one tile's epilogue to the next tile's copies
  def wg(t0):
    out, t = [], t0
    for k_loop, epilogue in ((10, 2), (12, 4)):
      for name, d in (("scale_copies", 0.5), ("lr_barrier", 1), ("epilogue_copies", 0.5),
                      ("k_loop", k_loop), ("epilogue", epilogue)):
        out.append((name, t, t + d))
        t += d
      t += 1
    return out
  per_wg = prof.regions(_trace({1: wg(0.0), 2: wg(5.0)}))
  assert per_wg[1][:2] == [("scale_copies", 0.0, 0.5), ("lr_barrier", 0.5, 1.5)]
  assert per_wg[1][-1] == ("epilogue", 29.0, 33.0)
  got = prof.summarize(per_wg, k_steps=4)
  assert got["warpgroups"] == 2 and got["tiles"] == 4
  assert got["k_loop"] == 11.0 and got["k_step"] == 2.75
  assert got["epilogue"] == 3.0 and got["gap"] == 1.0
  assert got["scale_copies"] == 0.5 and got["lr_barrier"] == 1.0
  assert got["shares"]["k_loop"] == pytest.approx(22 / 33)
  assert got["shares"]["epilogue"] == pytest.approx(6 / 33)
  assert got["shares"]["lr_barrier"] == pytest.approx(2 / 33)
  assert got["shares"]["gaps"] == pytest.approx(1 / 33)
  trace = _trace({1: wg(0.0), 2: wg(5.0)})
  for ev in trace["traceEvents"]:
    ev["pid"] = ev["tid"]   # each warpgroup on its own SM
  assert sorted(prof.sm_spans(trace)) == [33.0, 33.0]


def test_unbalanced_regions_rejected():
  trace = {"traceEvents": [dict(name="k_loop", ph="B", ts=0.0, tid=1),
                           dict(name="epilogue", ph="B", ts=1.0, tid=1),
                           dict(name="k_loop", ph="E", ts=2.0, tid=1)]}
  with pytest.raises(ValueError, match="'k_loop' ends inside 'epilogue'"):
    prof.regions(trace)
