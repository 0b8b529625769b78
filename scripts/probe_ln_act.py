"""Probe (one-off): act_rowscaled.quantize_modulated (FLUX's LayerNorm + modulation + int8
quantization + low-rank down in one program per token block) against XLA's fusions of the
same jnp expression, and the fused W4A8 layer both ways. Prints mismatches and times."""

import argparse
import json
import os
import runpy
import sys

import jax
import jax.numpy as jnp

from svdq_jax import qlinear
from svdq_jax.pallas_kernels import act_rowscaled, w4a4
from svdq_jax.timing import median_seconds


def inputs(m, k, r=32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (m, k)) * (1 + 10 * (jax.random.uniform(ks[1], (k,)) > 0.98))
  shift = (0.1 * jax.random.normal(ks[2], (k,))).astype(jnp.bfloat16)
  scale = (0.2 * jax.random.normal(ks[3], (k,))).astype(jnp.bfloat16)
  inv = jnp.exp(0.3 * jax.random.normal(ks[4], (k,))).astype(jnp.float32)
  down = (0.05 * jax.random.normal(ks[1], (k, r))).astype(jnp.bfloat16)
  return x.astype(jnp.bfloat16), shift, scale, inv, down


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--interpret", action="store_true")
  ap.add_argument("--ms", default="4608,4096,512")
  ap.add_argument("--k", type=int, default=3072)
  ap.add_argument("--variants", default="4,1024,8;4,1024,4;8,1024,8;2,1024,4;4,512,8;16,1024,8")
  ap.add_argument("--out", default=None)
  ap.add_argument("--step-ab", action="store_true",
                  help="then run bench_flux_full.py with the arguments after '--', the "
                       "kernel's tiling the fastest at the first M in --out's probe file")
  argv = sys.argv[1:]
  rest = argv[argv.index("--") + 1:] if "--" in argv else []
  args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  if args.step_ab:
    with open(os.path.join(args.out, "ln_act_probe.json")) as f:
      row = json.load(f)["results"][0]
    times = {k[:-3]: v for k, v in row.items() if k.endswith("_ms") and "," in k}
    best = min(times, key=times.get)
    if times[best] >= row["xla_ms"]:
      print(f"no step A/B: the kernel's best {best} {times[best]:.4f} ms against XLA's "
            f"{row['xla_ms']:.4f}", flush=True)
      return
    bm, bk, nw = (int(v) for v in best.split(","))
    act_rowscaled.MODULATED_TILING.update(block_m=bm, block_k=bk, num_warps=nw)
    print("step A/B with tiling", act_rowscaled.MODULATED_TILING, flush=True)
    sys.argv = ["bench_flux_full.py", *rest]
    sys.path.insert(0, os.path.dirname(__file__))
    runpy.run_path(os.path.join(os.path.dirname(__file__), "bench_flux_full.py"),
                   run_name="__main__")
    return
  rows = []
  xla = jax.jit(lambda x, sh, sc, inv, down: act_rowscaled.reference_folded(
      qlinear.Modulated(x, sh, sc), inv, down, "int8"))
  for m in [int(v) for v in args.ms.split(",")]:
    x, sh, sc, inv, down = ops = inputs(m, args.k)
    a0, s0, lr0 = jax.block_until_ready(xla(*ops))
    a1, s1, _ = act_rowscaled.reference_folded(qlinear.Modulated(x, sh, sc), inv, down,
                                               "int8")   # op by op: each bf16 rounding
    row = {"M": m, "K": args.k, "xla_vs_eager_code_mismatches": int((a0 != a1).sum())}
    if not args.interpret:
      row["xla_ms"] = median_seconds(xla, *ops) * 1e3
      row["copy_ms"] = median_seconds(jax.jit(lambda x: x + 1), x) * 1e3
    for var in args.variants.split(";"):
      bm, bk, nw = (int(v) for v in var.split(","))
      try:
        f = jax.jit(lambda x, sh, sc, inv, down, bm=bm, bk=bk, nw=nw:
                    act_rowscaled.quantize_modulated(
                        qlinear.Modulated(x, sh, sc), inv, down, block_m=bm, block_k=bk,
                        num_warps=nw, interpret=args.interpret))
        a, s, lr = jax.block_until_ready(f(*ops))
        row[f"{var}_code_mismatches"] = int((a != a0).sum())
        row[f"{var}_code_maxdiff"] = int(jnp.abs(a.astype(int) - a0.astype(int)).max())
        row[f"{var}_scale_mismatches"] = int((s != s0).sum())
        row[f"{var}_eager_code_mismatches"] = int((a != a1).sum())
        row[f"{var}_eager_scale_mismatches"] = int((s != s1).sum())
        row[f"{var}_lr_rel"] = float(jnp.abs(lr - lr0).max() / jnp.abs(lr0).max())
        if not args.interpret:
          row[f"{var}_ms"] = median_seconds(f, *ops) * 1e3
      except Exception as e:  # noqa: BLE001 (a probe: report and go on)
        row[f"{var}_error"] = repr(e)[:300]
    print(json.dumps(row), flush=True)
    rows.append(row)
  if args.out:
    with open(os.path.join(args.out, "ln_act_probe.json"), "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "results": rows}, f, indent=1)
  for row in rows:
    print(row["M"], {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                     if k.endswith("_ms") or "mismatch" in k})


if __name__ == "__main__":
  main()
