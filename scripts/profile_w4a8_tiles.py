"""Where a W4A8 GEMM tile's time goes, from Mosaic GPU's in-kernel profiler (GPU only).

Runs ``w4a8_hopper.w4a8_gemm_t`` (rank-32 branch and bias, as the library calls it) once
unprofiled (timed) and once with ``profile_dir``: each compute warpgroup then records, with
its SM's clock, five regions a tile (``REGIONS``: the copies of the epilogue's operands
issued, the warpgroups' barrier, the K loop, the epilogue; with --row-max also the next
layer's maxima inside the epilogue, ``NESTED``) into a Chrome trace (open it in
Perfetto), which this script reads back: per tile each region's median duration, a K step,
the gap from one tile's epilogue to the next tile's first region (the tile loop's own work),
and their shares of the warpgroups' spans. Times are kilocycles (the profiler's trace puts a
warpgroup's clock cycles / 1000 after its start time); ``implied_ghz`` converts (an SM's
span over the unprofiled kernel's time). The events cost a few cycles each (the profiler
subtracts its estimate).

    python3 scripts/profile_w4a8_tiles.py --shape 4608x3072x12288 --out $OUT
    python3 scripts/profile_w4a8_tiles.py --shape 4608x3072x3072 --variant "wt m256 s3" --out $OUT
    python3 scripts/profile_w4a8_tiles.py --shape 4608x3072x12288 --gelu-from 0 --row-max --out $OUT

Writes tiles.json (the summary) and the trace to --out.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil

import numpy as np

# a tile's regions, in the kernel's order (w4a8_gemm_t's profile_dir), and those nested in
# one of them (the GELU tiles' next-layer maxima, inside the epilogue)
REGIONS = ("scale_copies", "lr_barrier", "epilogue_copies", "k_loop", "epilogue")
NESTED = ("row_max",)


def regions(trace: dict) -> dict[int, list[tuple[str, float, float]]]:
  """A Chrome trace's B/E events -> per thread (a warpgroup), its (name, begin, end), in
  order of their ends. Times as the trace's ts: the profiler's are an SM's clock cycles
  / 1000 (kilocycles) from each warpgroup's start."""
  out, open_ = {}, {}
  for ev in trace["traceEvents"]:
    stack = open_.setdefault(ev["tid"], [])
    if ev["ph"] == "B":
      stack.append((ev["name"], ev["ts"]))
    else:
      name, begin = stack.pop()
      if name != ev["name"]:
        raise ValueError(f"thread {ev['tid']}: {ev['name']!r} ends inside {name!r}")
      out.setdefault(ev["tid"], []).append((name, begin, ev["ts"]))
  return out


def summarize(per_wg: dict[int, list[tuple[str, float, float]]], k_steps: int) -> dict:
  """Per-tile medians over every warpgroup's tiles, in the trace's units: each region's
  duration (``<region>``), a K step (``k_step``), the ``gap`` from a tile's epilogue to the
  next tile's first region (the loop's own work); and each region's share of the
  warpgroups' spans (first region's begin to last region's end), ``gaps`` the rest (regions
  inside the K loop, as the copies with ``copies_at``, count in both: ``gaps`` then comes out
  low or negative)."""
  durations = {name: [] for name in REGIONS + NESTED}
  gaps, span, totals = [], 0.0, dict.fromkeys(REGIONS, 0.0)
  for events in per_wg.values():
    for name, begin, end in events:
      if name in NESTED:
        durations[name].append(end - begin)
    mine = sorted((e for e in events if e[0] in REGIONS), key=lambda e: e[1])
    if not mine:
      continue
    span += mine[-1][2] - mine[0][1]
    for (name, begin, end), nxt in zip(mine, mine[1:] + [None]):
      totals[name] += end - begin
      durations[name].append(end - begin)
      if name == "epilogue" and nxt is not None:
        gaps.append(nxt[1] - end)
  med = lambda v: float(np.median(v)) if v else None
  out = dict(warpgroups=len(per_wg), tiles=len(durations["k_loop"]))
  out.update({name: med(v) for name, v in durations.items()})
  out["row_max_tiles"] = len(durations["row_max"])
  out["k_step"] = out["k_loop"] / k_steps if durations["k_loop"] else None
  out["gap"] = med(gaps)
  out["shares"] = {name: t / span for name, t in totals.items()} if span else None
  if span:
    out["shares"]["gaps"] = 1 - sum(totals.values()) / span
  return out


def sm_spans(trace: dict) -> list[float]:
  """Per SM (the trace's pid), its first region's begin to its last region's end."""
  first, last = {}, {}
  for ev in trace["traceEvents"]:
    if ev["name"] in REGIONS:
      first[ev["pid"]] = min(first.get(ev["pid"], ev["ts"]), ev["ts"])
      last[ev["pid"]] = max(last.get(ev["pid"], ev["ts"]), ev["ts"])
  return [last[p] - first[p] for p in first]


def main():
  import jax

  from svdq_jax.pallas_kernels import w4a8_hopper
  from svdq_jax.timing import median_seconds

  from bench_rowscaled import gemm_operands, variant_kwargs
  from bench_w4a4 import activations, make_layer

  ap = argparse.ArgumentParser()
  ap.add_argument("--shape", default="4608x3072x12288", help="MxKxN")
  ap.add_argument("--variant", default="", help="as bench_rowscaled's 'wt ...' variants; "
                  "default: the library's tiling")
  ap.add_argument("--rank", type=int, default=32)
  ap.add_argument("--gelu-from", type=int, default=None,
                  help="the GELU epilogue from this column on (FLUX.1's fc1: 0)")
  ap.add_argument("--row-max", action="store_true",
                  help="with --gelu-from: the next layer's token maxima in the epilogue")
  ap.add_argument("--out", default=os.environ.get("OUT", "out/profile_w4a8"))
  args = ap.parse_args()
  m, k, n = map(int, args.shape.split("x"))
  kw = (variant_kwargs(args.variant) if args.variant
        else w4a8_hopper.tiling(m, k, n, args.rank, gelu_from=args.gelu_from))
  kw.pop("transposed", None)
  if args.gelu_from is not None:
    kw["gelu_from"] = args.gelu_from
  kx, kl = jax.random.split(jax.random.key(0))
  layer = make_layer(k, n, args.rank, kl, "int4_2l", "int8")
  x = activations(m, k, kx)
  a, sa, _, sw, *epilogue = gemm_operands(layer, x)
  ops = (a, sa, layer.qweight, layer.wscale.T, sw, *epilogue)
  if args.row_max:   # the next layer's 1 / lambda: any positive scales
    ops += (jax.random.uniform(kl, (n - args.gelu_from,), minval=0.5, maxval=2.0),)
  os.makedirs(args.out, exist_ok=True)
  trace_dir = os.path.join(args.out, "traces")
  shutil.rmtree(trace_dir, ignore_errors=True)
  os.makedirs(trace_dir)
  plain = jax.jit(lambda *o: w4a8_hopper.w4a8_gemm_t(*o, **kw))
  want = plain(*ops)
  kernel_s = median_seconds(plain, *ops)
  got = jax.jit(lambda *o: w4a8_hopper.w4a8_gemm_t(*o, profile_dir=trace_dir, **kw))(*ops)
  jax.effects_barrier()   # the trace is written by a host callback
  paths = glob.glob(os.path.join(trace_dir, "**", "*.json*"), recursive=True)
  if len(paths) != 1:
    raise RuntimeError(f"expected one trace under {trace_dir}, found {paths}")
  [path] = paths
  with open(path) as f:
    trace = json.load(f)
  spans = sm_spans(trace)
  res = dict(device=jax.devices()[0].device_kind, M=m, K=k, N=n, rank=args.rank, tiling=kw,
             profiled_mismatches=sum(int((g != w).sum()) for g, w in
                                     zip(jax.tree.leaves(got), jax.tree.leaves(want))),
             unprofiled_ms=kernel_s * 1e3,
             units="kilocycles (an SM's clock)", sm_span_median=float(np.median(spans)),
             sm_span_max=float(max(spans)),
             # the clock the spans imply, were the unprofiled kernel all span
             implied_ghz=float(max(spans)) / (kernel_s * 1e6),
             **summarize(regions(trace), k // w4a8_hopper.TILE_K))
  with open(os.path.join(args.out, "tiles.json"), "w") as f:
    json.dump(res, f, indent=1)
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()
