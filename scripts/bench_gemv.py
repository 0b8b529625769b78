"""Checks and times the weight-only int4_2l GEMV (``pallas_kernels.w4a16_gemv``) on the GPU.

FLUX's modulation linears (W4A16, one vector per image, or per image and step when the
sampling loop computes them before it): for each shape and row count M,
  checks   the kernel's product against ``qlinear.weight_only_product`` (f32) and the layer
           through ``qlinear.apply`` against ``qlinear.reference_apply`` (bf16);
  timings  (device time per call, jax.profiler) XLA bf16 ``x @ w + b`` (the baseline), the layer through the jnp reference (XLA
           fuses the dequantization into a reduction), the layer through ``qlinear.apply``
           (the kernel), and the kernel alone at each --configs tiling (a path ending in
           '+convert': the codes' f32 values by int -> f32 conversions, not by the default's
           bit operations, ``w4a16_gemv.set_bit_unpack``; checked equal to them).
Prints a table last; writes gemv.json to --out.

    python3 scripts/bench_gemv.py --out $OUT
    python3 scripts/bench_gemv.py --ms 28,56,112,224 --configs "32,8,4,3,mma;32,4,4,3,mma" --out $OUT
    python3 scripts/bench_gemv.py --ms 1,2,28 --configs "16,16,4,3,rows;16,16,4,3,rows+convert;16,8,4,3,mma;16,8,4,3,mma+convert;64,4,4,3,mma;64,4,4,3,mma+convert" --out $OUT
    python3 scripts/bench_gemv.py --interpret --shapes 256x128 --ms 1,2 --configs 16,2,4,3,mma
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from svdq_jax import qlinear
from svdq_jax.pallas_kernels import w4a16_gemv
from svdq_jax.timing import device_kernel_seconds, save_results

from bench_rowscaled import rel, timer
from bench_w4a4 import activations, make_layer

# the double blocks' img_mod / txt_mod (x 38 per step) and the single blocks' modulation (x 38)
SHAPES = ((3072, 18432), (3072, 9216))
# block_n, groups_per_step, num_warps, num_stages, path ('rows' / 'groups': M = 1 only, or 'mma')
CONFIGS = ("16,16,4,3,rows", "16,16,2,3,rows", "16,32,4,3,rows", "16,8,4,3,rows",
           "32,16,4,3,rows", "16,16,4,2,rows", "16,16,4,4,rows", "8,16,2,3,rows",
           "16,8,4,3,mma", "32,8,4,3,mma", "64,4,4,4,mma", "64,8,4,3,mma", "32,16,4,3,mma",
           "16,16,4,3,mma", "64,8,8,3,mma", "128,8,8,3,mma", "32,4,4,4,mma",
           "16,16,4,3,rows+convert", "16,8,4,3,mma+convert", "32,8,4,3,mma+convert",
           "64,4,4,3,mma+convert", "32,2,4,3,mma+convert")


def w4a16_layer(k, n, key):
  """A weight-only int4_2l layer with AWQ-style smoothing and a bias, as FLUX's modulation."""
  layer = make_layer(k, n, 16, key, "int4_2l", "int8")
  return layer.replace(act_format=None, lora_down=None, lora_up=None)


def run_shape(m, k, n, configs, key, interpret):
  layer = w4a16_layer(k, n, key)
  x = activations(m, k, jax.random.fold_in(key, 1))
  wall = timer(interpret)
  # device time (the profiler's kernels, summed): at tens of microseconds a call's wall time
  # is the host's dispatch; on a CPU (no device trace) the wall time
  t = lambda f, *a: (sum(device_kernel_seconds(f, *a, calls=10).values()) * 1e3
                     or wall(f, *a))
  r = dict(M=m, K=k, N=n, packed_bytes=n * k // 2 + n * k // 128 + 4 * n)
  xs = (qlinear.smoothed(x, layer.smooth)).astype(jnp.bfloat16)
  want = qlinear.weight_only_product(layer, xs)
  got = w4a16_gemv.layer_product(layer, xs, interpret=interpret)
  ref = jax.jit(qlinear.reference_apply)
  with qlinear.backend("interpret" if interpret else "auto"):
    apply = jax.jit(qlinear.apply)
    y = apply(layer, x)
  converted = w4a16_gemv.gemv(xs, layer.qweight, layer.wscale, layer.wcscale,
                              bit_unpack=False, interpret=interpret)
  r["checks"] = dict(product_rel=rel(got, want), layer_rel=rel(y, ref(layer, x)),
                     convert_mismatches=int((converted != got).sum()))
  w = jax.random.normal(key, (k, n), jnp.bfloat16) * 0.02
  b = jnp.zeros((n,), jnp.bfloat16)
  r["bf16_ms"] = t(jax.jit(lambda x, w, b: x @ w + b), x, w, b)
  r["reference_ms"] = t(ref, layer, x)
  with qlinear.backend("interpret" if interpret else "auto"):
    r["layer_ms"] = t(apply, layer, x)
  r["kernel_ms"] = {}
  if m == 1:   # the grouped path's sums in another order: float agreement with the product
    grouped = w4a16_gemv.gemv(xs, layer.qweight, layer.wscale, layer.wcscale, grouped=True,
                              interpret=interpret)
    r["checks"]["grouped_rel"] = rel(grouped, want)
  for c in configs:
    bn, gps, warps, stages = (int(v) for v in c.split(",")[:4])
    path = c.split(",")[4]
    if m > 1 and not path.startswith("mma"):
      continue
    kw = dict(block_n=bn, groups_per_step=gps, num_warps=warps, num_stages=stages,
              mma=path.startswith("mma"), bit_unpack=not path.endswith("+convert"),
              grouped=path.startswith("groups"), interpret=interpret)
    f = jax.jit(lambda xs, c, mu, u, kw=kw: w4a16_gemv.gemv(xs, c, mu, u, **kw))
    try:
      r["checks"][f"rel {c}"] = rel(f(xs, layer.qweight, layer.wscale, layer.wcscale), want)
      r["kernel_ms"][c] = t(f, xs, layer.qweight, layer.wscale, layer.wcscale)
    except Exception as e:  # a tiling the compiler rejects: recorded, not fatal
      r["kernel_ms"][c] = None
      print(f"  {c}: {type(e).__name__}: {str(e)[:200]}", flush=True)
  return r


def table(results) -> str:
  lines = ["| M | K -> N | bf16 ms | reference (XLA) ms | layer (kernel) ms | vs bf16 | best "
           "kernel | its TB/s of packed weights |", "|" + " --- |" * 8]
  for r in results:
    best = min((v, c) for c, v in r["kernel_ms"].items() if v is not None)
    lines.append(f"| {r['M']} | {r['K']} -> {r['N']} | {r['bf16_ms']:.4f} | "
                 f"{r['reference_ms']:.4f} | {r['layer_ms']:.4f} | "
                 f"{r['bf16_ms'] / r['layer_ms']:.2f}x | {best[1]}: {best[0]:.4f} | "
                 f"{r['packed_bytes'] / best[0] / 1e9:.2f} |")
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "out/gemv"))
  ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
  ap.add_argument("--ms", default="1,2,4,28", help="row counts (images, or images x steps)")
  ap.add_argument("--configs", default=";".join(CONFIGS),
                  help="';'-separated kernel tilings to time alone: block_n,groups_per_step,"
                       "num_warps,num_stages,path (path 'rows' or 'groups' (4-D tiles) at "
                       "M = 1 only, or 'mma'; "
                       "'+convert': the codes' f32 values by conversions)")
  ap.add_argument("--interpret", action="store_true")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  key = jax.random.key(0)
  results = []
  for m in (int(v) for v in args.ms.split(",")):
    for k, n in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
      r = run_shape(m, k, n, args.configs.split(";"), key, args.interpret)
      print(json.dumps(r), flush=True)
      results.append(r)
  save_results(os.path.join(args.out, "gemv.json"), results)
  print(table(results))


if __name__ == "__main__":
  main()
