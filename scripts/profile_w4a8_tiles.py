"""Where a W4A8 GEMM tile's time goes, from Mosaic GPU's in-kernel profiler (GPU only).

Runs ``w4a8_hopper.w4a8_gemm_t`` (rank-32 branch and bias, as the library calls it) once
unprofiled and once with ``profile_dir``: each compute warpgroup then records, with the GPU's
global timer, its regions ``k_loop`` (a tile's K loop) and ``epilogue`` (scales, low-rank up
projection, bias, the bf16 store) into a Chrome trace (open it in Perfetto), which this
script reads back: per tile the median K loop (and per K step of 128), the epilogue, and the
gap from one tile's epilogue to the next tile's K loop (its operand copies, the warpgroups'
barrier, the wait for the first pipeline stage), and their shares of the warpgroups' spans.
The timer's events cost a few cycles each (the profiler subtracts its estimate).

    python3 scripts/profile_w4a8_tiles.py --shape 4608x3072x12288 --out $OUT
    python3 scripts/profile_w4a8_tiles.py --shape 4608x3072x3072 --variant "wt m256 s3" --out $OUT

Writes tiles.json (the summary) and the trace to --out.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil

import numpy as np

REGIONS = ("k_loop", "epilogue")


def regions(trace: dict) -> dict[int, list[tuple[str, float, float]]]:
  """A Chrome trace's B/E events -> per thread (a warpgroup), its (name, begin, end) in
  microseconds, in order of their ends."""
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
  """Per-tile medians (us) over every warpgroup's tiles and the regions' shares of the
  warpgroups' spans (first K loop's begin to last epilogue's end)."""
  loops, epis, gaps, spans, totals = [], [], [], 0.0, dict.fromkeys(REGIONS, 0.0)
  for events in per_wg.values():
    mine = sorted((e for e in events if e[0] in REGIONS), key=lambda e: e[1])
    if not mine:
      continue
    spans += mine[-1][2] - mine[0][1]
    for (name, begin, end), nxt in zip(mine, mine[1:] + [None]):
      totals[name] += end - begin
      (loops if name == "k_loop" else epis).append(end - begin)
      if name == "epilogue" and nxt is not None:
        gaps.append(nxt[1] - end)
  med = lambda v: float(np.median(v)) if v else None
  return dict(
      warpgroups=len(per_wg), tiles=len(loops),
      k_loop_us=med(loops), k_step_us=med(loops) / k_steps if loops else None,
      epilogue_us=med(epis), gap_us=med(gaps),
      share_k_loop=totals["k_loop"] / spans if spans else None,
      share_epilogue=totals["epilogue"] / spans if spans else None,
      share_gaps=1 - sum(totals.values()) / spans if spans else None)


def main():
  import jax

  from svdq_jax.pallas_kernels import w4a8_hopper

  from bench_rowscaled import gemm_operands, variant_kwargs
  from bench_w4a4 import activations, make_layer

  ap = argparse.ArgumentParser()
  ap.add_argument("--shape", default="4608x3072x12288", help="MxKxN")
  ap.add_argument("--variant", default="", help="as bench_rowscaled's 'wt ...' variants; "
                  "default: the library's tiling")
  ap.add_argument("--rank", type=int, default=32)
  ap.add_argument("--out", default=os.environ.get("OUT", "out/profile_w4a8"))
  args = ap.parse_args()
  m, k, n = map(int, args.shape.split("x"))
  kw = (variant_kwargs(args.variant) if args.variant
        else w4a8_hopper.tiling(m, k, n, args.rank))
  kw.pop("transposed", None)
  kx, kl = jax.random.split(jax.random.key(0))
  layer = make_layer(k, n, args.rank, kl, "int4_2l", "int8")
  x = activations(m, k, kx)
  a, sa, _, sw, *epilogue = gemm_operands(layer, x)
  ops = (a, sa, layer.qweight, layer.wscale.T, sw, *epilogue)
  os.makedirs(args.out, exist_ok=True)
  trace_dir = os.path.join(args.out, "traces")
  shutil.rmtree(trace_dir, ignore_errors=True)
  os.makedirs(trace_dir)
  want = jax.jit(lambda *o: w4a8_hopper.w4a8_gemm_t(*o, **kw))(*ops)
  got = jax.jit(lambda *o: w4a8_hopper.w4a8_gemm_t(*o, profile_dir=trace_dir, **kw))(*ops)
  jax.effects_barrier()   # the trace is written by a host callback
  paths = glob.glob(os.path.join(trace_dir, "**", "*.json*"), recursive=True)
  if len(paths) != 1:
    raise RuntimeError(f"expected one trace under {trace_dir}, found {paths}")
  [path] = paths
  with open(path) as f:
    trace = json.load(f)
  res = dict(device=jax.devices()[0].device_kind, M=m, K=k, N=n, rank=args.rank, tiles=kw,
             profiled_mismatches=int((got != want).sum()),
             **summarize(regions(trace), k // w4a8_hopper.TILE_K))
  with open(os.path.join(args.out, "tiles.json"), "w") as f:
    json.dump(res, f, indent=1)
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()
