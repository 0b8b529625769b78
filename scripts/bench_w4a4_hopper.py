"""Checks and times the Mosaic GPU W4A4 GEMM (pallas_kernels/w4a4_hopper.py) on the H100.

One run: correctness against the jnp reference at FLUX shapes (ragged M too, with and
without the low-rank branch and bias), then, at M tokens for the FLUX.1 linear shapes,
XLA bf16 ``x @ w`` (the baseline), XLA int8 with K-major operands (the ceiling), and the
GEMM in several variants. Prints a table last; writes hopper.md / hopper.json to --out.

    python3 scripts/bench_w4a4_hopper.py --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import traceback

import jax
import jax.numpy as jnp
from jax import lax

from svdq_jax import formats, qlinear
from svdq_jax.pallas_kernels import w4a4, w4a4_hopper as hop
from svdq_jax.timing import median_seconds

from bench_w4a4 import activations, make_layer

FLUX_SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]
DEFAULT = "s8 m64 w3 g2 s4"  # what the library runs at every FLUX shape (w4a4_hopper.tiling)
VARIANTS = [  # see variant_kwargs
    DEFAULT, "s8 g2 s4", "s8 unscaled g2 s4", "s8 m64 a4 g4 s4", "e4m3 g2 s4",
]
TOKENS = {"g": "groups_per_step", "s": "steps", "m": "tile_m", "a": "accs", "w": "compute_wgs"}


def variant_kwargs(name: str) -> dict:
  """'e4m3 m64 a3 g3 s4' -> kwargs of ``w4a4_gemm_t``: the MMA type (s8 | e4m3), 'unscaled'
  (the timing-only rescale diagnostic), then g<groups per step>, s<pipeline steps>,
  m<tokens per tile>, a<accumulators in rotation>, w<compute warpgroups>."""
  kwargs = {}
  for token in name.split():
    if token in hop.MMA_TYPES:
      kwargs["mma"] = token
    elif token == "unscaled":
      kwargs["rescale"] = token
    elif token[0] in TOKENS and token[1:].isdigit():
      kwargs[TOKENS[token[0]]] = int(token[1:])
    else:
      raise ValueError(f"unknown token {token!r} in variant {name!r}")
  return kwargs


def e4m3_operands(ops):
  """``operands`` as the activation kernel hands them to the e4m3 GEMM: fp8 codes, and the
  per-group code sums appended."""
  return (ops[0].astype(jnp.float8_e4m3fn),) + ops[1:] + (hop.group_sums_t(ops[0]),)


def operands(m, k, n, rank, key, bias=True):
  ks = jax.random.split(key, 7)
  a_q = jax.random.randint(ks[0], (m, k), -8, 8, jnp.int8)
  w_packed = formats.pack(jax.random.randint(ks[1], (n, k), -8, 8, jnp.int8), "int4")
  sa = jax.random.uniform(ks[2], (k // 64, m), minval=0.01, maxval=0.1)
  sw = jax.random.uniform(ks[3], (k // 64, n), minval=0.01, maxval=0.1)
  sw = sw.astype(jnp.bfloat16).astype(jnp.float32)
  lr = (jax.random.normal(ks[4], (m, rank)) * 0.1).astype(jnp.bfloat16) if rank else None
  up = (jax.random.normal(ks[5], (n, rank)) * 0.1).astype(jnp.bfloat16) if rank else None
  b = jax.random.normal(ks[6], (n,)) * 0.1 if bias else None
  return a_q, sa, w_packed, sw, lr, up, b


def rel_err(y, ref):
  return float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))


def exact_check(key, m=1024, k=3072, n=3072):
  """Unit scales, no low-rank or bias, f32 output: the result must equal the integer GEMM
  bit for bit (sums stay below 2**24), for both MMA types and activation code ranges."""
  rows = []
  ka, kw = jax.random.split(key)
  w = jax.random.randint(kw, (n, k), -8, 8, jnp.int8)
  extreme_w = jnp.where(w < 0, -8, 7).astype(jnp.int8)
  cases = {"int4 codes": (jax.random.randint(ka, (m, k), -8, 8, jnp.int8), w),
           "uint4 codes": (jax.random.randint(ka, (m, k), 0, 16, jnp.int8), w),
           "uint4 15 x {-8, 7}": (jnp.full((m, k), 15, jnp.int8), extreme_w)}
  ones_a, ones_w = jnp.ones((k // 64, m)), jnp.ones((k // 64, n))
  for case, (a_q, w_q) in cases.items():
    exact = lax.dot_general(a_q, w_q, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.int32).astype(jnp.float32)
    for mma in hop.MMA_TYPES:
      y = hop.w4a4_gemm_t(a_q, ones_a, formats.pack(w_q, "int4"), ones_w, mma=mma,
                          out_dtype=jnp.float32)
      mismatches = int(jnp.sum(y != exact))
      rows.append((f"{m}x{k}x{n} {case}, unit scales, f32 out", mma, mismatches))
      print("exact", rows[-1], flush=True)
  return rows


def check(key, variants):
  rows = []
  for m, k, n, rank, bias in [(4608, 3072, 3072, 32, True), (4096 + 333, 3072, 3072, 32, True),
                              (4608, 15360, 3072, 0, False), (77, 3072, 12288, 32, True)]:
    args = operands(m, k, n, rank, key, bias)
    ref = hop.reference(*args)
    for name in variants:
      if "unscaled" in name:
        continue
      try:
        y = jax.jit(functools.partial(hop.w4a4_gemm_t, **variant_kwargs(name)))(*args)
        err, finite = rel_err(y, ref), bool(jnp.isfinite(y).all())
      except Exception as e:  # e.g. over the shared memory; reported, not fatal
        print(f"{name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        err, finite = float("nan"), False
      rows.append((f"{m}x{k}x{n} r{rank} bias={bias}", name, err, finite))
      print("check", rows[-1], flush=True)
    y = hop.w4a4_gemm_t(*args, mma="e4m3", out_dtype=jnp.float32)
    rows.append((f"{m}x{k}x{n} r{rank} bias={bias}", "e4m3 g2 s4, f32 out", rel_err(y, ref),
                 bool(jnp.isfinite(y).all())))
    print("check", rows[-1], flush=True)
  return rows


def fused_linear_rows(m, k, n, rank, key, t16):
  """The whole quantized linear as the model runs it (``w4a4.w4a4_linear``: activation
  kernel writing int8 codes + transposed scales, then the Hopper GEMM), its parts, and the
  unfused jnp path; with the output's relative error against the jnp reference."""
  layer = make_layer(k, n, rank, key)
  x = activations(m, k, jax.random.fold_in(key, 1))
  fused = jax.jit(w4a4.w4a4_linear)
  with qlinear.backend("reference"):
    y_ref = jax.jit(qlinear.apply)(layer, x.astype(jnp.float32))
  err = rel_err(fused(layer, x), y_ref)
  act = jax.jit(functools.partial(w4a4.quantize_act, codes=True))
  timed = {"fused linear (act kernel + GEMM)": (fused, (layer, x)),
           "act kernel (codes)": (act, (x, layer.smooth, layer.lora_down)),
           "unfused jnp": (jax.jit(qlinear.reference_apply), (layer, x))}
  rows = []
  for label, (f, f_args) in timed.items():
    t = median_seconds(f, *f_args)
    rows.append(dict(k=k, n=n, variant=label, ms=t * 1e3, vs_bf16=t16 / t))
    if label.startswith("fused"):
      rows[-1]["rel_err"] = err
    print(rows[-1], flush=True)
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=None)
  p.add_argument("--m", type=int, default=4608)
  p.add_argument("--rank", type=int, default=32)
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help="comma-separated GEMM variants to time (see variant_kwargs)")
  p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in FLUX_SHAPES),
                 help="comma-separated KxN linear shapes to time")
  p.add_argument("--no-fused", action="store_true",
                 help="skip the whole-linear rows (activation kernel + GEMM, unfused jnp)")
  args = p.parse_args()
  variants = {name: variant_kwargs(name) for name in args.variants.split(",")}
  shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
  key = jax.random.key(0)
  exact = exact_check(key)
  checks = check(key, variants)
  rows = []
  for k, n in shapes:
    m = args.m
    kx, kw = jax.random.split(jax.random.fold_in(key, k * n))
    x16 = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w16 = jax.random.normal(kw, (k, n), jnp.bfloat16)
    t16 = median_seconds(jax.jit(lambda a, b: a @ b), x16, w16)
    a8 = jax.random.randint(kx, (m, k), -8, 8, jnp.int8)
    b8 = jax.random.randint(kw, (n, k), -8, 8, jnp.int8)
    t8 = median_seconds(jax.jit(lambda a, b: lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)), a8, b8)
    del x16, w16, b8
    rows.append(dict(k=k, n=n, variant="xla bf16", ms=t16 * 1e3, vs_bf16=1.0))
    rows.append(dict(k=k, n=n, variant="xla int8", ms=t8 * 1e3, vs_bf16=t16 / t8))
    ops = operands(m, k, n, args.rank, kw)
    ops_e4m3 = e4m3_operands(ops)
    if not args.no_fused:
      rows += fused_linear_rows(m, k, n, args.rank, kw, t16)
    for name, kwargs in variants.items():
      for lowrank in (True, False):
        if not lowrank and name != DEFAULT:
          continue
        full = ops_e4m3 if kwargs.get("mma") == "e4m3" else ops
        call_args = full if lowrank else full[:4] + (None, None) + full[6:]
        label = name + ("" if lowrank else " no-lowrank")
        try:
          f = jax.jit(functools.partial(hop.w4a4_gemm_t, **kwargs))
          t = median_seconds(f, *call_args)
          rows.append(dict(k=k, n=n, variant=label, ms=t * 1e3, vs_bf16=t16 / t))
        except Exception as e:  # a variant that does not compile is reported, not fatal
          rows.append(dict(k=k, n=n, variant=label, ms=float("nan"), vs_bf16=0.0,
                           error=f"{type(e).__name__}: {str(e)[:200]}"))
          traceback.print_exc(limit=2)
        print(rows[-1], flush=True)
    del ops, ops_e4m3

  device = jax.devices()[0].device_kind
  lines = [f"W4A4 GEMM (Mosaic GPU) vs XLA, M={args.m}, rank {args.rank}, {device}, "
           f"{datetime.date.today()}", "",
           "| check | variant | rel. err vs jnp | all finite |", "| --- | --- | ---: | --- |"]
  lines += [f"| {c} | {v} | {e:.2e} | {f} |" for c, v, e, f in checks]
  lines += ["", "| exactness | MMA | elements differing from the integer GEMM |",
            "| --- | --- | ---: |"]
  lines += [f"| {c} | {v} | {d} |" for c, v, d in exact]
  lines += ["", "| K -> N | variant | ms | vs XLA bf16 |", "| --- | --- | ---: | ---: |"]
  lines += [f"| {r['k']} -> {r['n']} | {r['variant']}"
            + (f" (rel. err {r['rel_err']:.1e})" if "rel_err" in r else "")
            + f" | {r['ms']:.3f} | {r['vs_bf16']:.2f}x |" for r in rows]
  text = "\n".join(lines)
  print("\n" + text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "hopper.md"), "w") as f:
      f.write(text + "\n")
    with open(os.path.join(args.out, "hopper.json"), "w") as f:
      json.dump(dict(device=device, m=args.m, rank=args.rank, checks=checks, exact=exact,
                     rows=rows), f,
                indent=1)


if __name__ == "__main__":
  main()
