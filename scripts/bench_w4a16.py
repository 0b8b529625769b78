"""Checks and times the W4A16 GEMV kernel (``pallas_kernels.w4a16``) at FLUX's modulation shapes.

One run, for each shape and token count (FLUX: one vector per image, so rows = batch):
  checks   each kernel tiling against ``qlinear.reference_apply`` (bf16 outputs at most one
           ulp apart; a failing tiling is reported and not timed);
  timings  XLA bf16 ``x @ w`` (the 16-bit model's GEMV), the W4A16 reference left to XLA (the
           library's path before this kernel), the kernel in each --variants tiling; with the
           weight bytes read, as GB/s.
Prints a table last; writes w4a16.json to --out.

    python3 scripts/bench_w4a16.py --out $OUT
    python3 scripts/bench_w4a16.py --interpret --shapes 256x96 --rows 1 --variants "n32 g2 w4 s3"
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from svdq_jax import qlinear, transforms
from svdq_jax.config import QuantConfig, Rule, method_spec
from svdq_jax.pallas_kernels import w4a16
from svdq_jax.timing import median_seconds, save_results

# FLUX.1 modulation linears: double blocks 3072 -> 6 x 3072 (image and text), single 3 x 3072
SHAPES = "3072x18432,3072x9216"
VARIANTS = "n32 g2 w4 s3;n16 g2 w4 s3;n64 g2 w4 s3;n32 g4 w4 s3;n32 g1 w4 s4;n32 g2 w2 s3;n32 g2 w8 s3"
TOKENS = {"n": "block_n", "g": "groups_per_step", "w": "num_warps", "s": "num_stages"}


def variant_kwargs(name: str) -> dict:
  """'n32 g2 w4 s3' -> gemv kwargs."""
  return {TOKENS[t[0]]: int(t[1:]) for t in name.split()}


def layer_for(k, n, fmt, key):
  """A W4A16 layer of a random weight, AWQ-smoothed on random inputs (timing only)."""
  kw, kx = jax.random.split(key)
  w = jax.random.normal(kw, (k, n)) * 0.02
  xs = jax.random.normal(kx, (64, k))
  (layer,), _ = transforms.quantize_group([w], method_spec("w4a16", fmt, False, None), 0, 0.5,
                                          QuantConfig(rules=(Rule(".*"),)), key,
                                          jnp.max(jnp.abs(xs), 0), xs)
  return layer


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "out/w4a16"))
  ap.add_argument("--shapes", default=SHAPES)
  ap.add_argument("--rows", default="1,2")
  ap.add_argument("--formats", default="int4_2l,int4")
  ap.add_argument("--variants", default=VARIANTS)
  ap.add_argument("--interpret", action="store_true")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  reps = dict(reps=2, rounds=1) if args.interpret else dict(reps=50, rounds=5)
  t = lambda f, *a: median_seconds(f, *a, **reps) * 1e3
  results = []
  for shape in args.shapes.split(","):
    k, n = (int(v) for v in shape.split("x"))
    wf = (jax.random.normal(jax.random.key(1), (k, n)) * 0.02).astype(jnp.bfloat16)
    for fmt in args.formats.split(","):
      layer = layer_for(k, n, fmt, jax.random.key(0))
      wbytes = sum(a.nbytes for a in (layer.qweight, layer.wscale, layer.wcscale) if a is not None)
      for rows in (int(r) for r in args.rows.split(",")):
        x = jax.random.normal(jax.random.key(rows), (rows, k)).astype(jnp.bfloat16)
        want = np.asarray(qlinear.reference_apply(layer, x), np.float32)
        r = dict(K=k, N=n, format=fmt, rows=rows, weight_bytes=wbytes)
        r["bf16_ms"] = t(jax.jit(lambda x, w: x @ w), x, wf)
        with qlinear.backend("reference"):
          r["xla_w4a16_ms"] = t(jax.jit(qlinear.apply), layer, x)
        r["kernel_ms"], r["failed"] = {}, {}
        for v in args.variants.split(";"):
          f = jax.jit(lambda l, x, kw=variant_kwargs(v): w4a16.w4a16_linear(
              l, x, interpret=args.interpret, **kw))
          try:
            got = np.asarray(f(layer, x), np.float32)
          except Exception as e:  # a tiling that does not compile is reported
            r["failed"][v] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
          err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
          if err > 2 ** -7:
            r["failed"][v] = f"differs from the reference: {err:.3g}"
            continue
          r["kernel_ms"][v] = t(f, layer, x)
        results.append(r)
        print(json.dumps(r), flush=True)
  meta = save_results(os.path.join(args.out, "w4a16.json"), results)
  lines = [f"{meta}", "", "| K -> N | format | rows | bf16 GEMV | XLA W4A16 | best kernel "
           "(tiling) | kernel GB/s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in results:
    best = min(r["kernel_ms"], key=r["kernel_ms"].get) if r["kernel_ms"] else None
    kms = r["kernel_ms"].get(best)
    lines.append(f"| {r['K']} -> {r['N']} | {r['format']} | {r['rows']} | {r['bf16_ms']:.4f} | "
                 f"{r['xla_w4a16_ms']:.4f} | "
                 + (f"{kms:.4f} `{best}` | {r['weight_bytes'] / kms / 1e6:.0f} |" if best
                    else "failed | |"))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
