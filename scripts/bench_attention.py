"""Attention at FLUX.1's shape on one GPU (issue 14): bf16 vs 8-bit candidates, time and error.

FLUX.1-dev at 1024x1024: batch 1, 4608 tokens (4096 image + 512 text), 24 heads of 128; the
step runs this 57 times (19 double + 38 single blocks). Variants, each jitted, timed with
``median_seconds`` and compared with f32 exact attention (relative Frobenius error):
  xla-bf16:      jax.nn.dot_product_attention(implementation='xla');
  cudnn-bf16:    the same with implementation='cudnn' (the step's baseline);
  cudnn-fp8:     cuDNN's FP8 flash attention (``svdq_jax.attention.cudnn_fp8_attention``):
                 q, k (minus its token mean), v as E4M3 with one scale each, P with scale
                 448, the E4M3 output scaled back (includes the quantization passes);
  cudnn-fp8-kernel: its kernel alone on operands quantized outside the timed call (what
                 quantization fused into the producers of q, k, v would leave);
  fp8-ref:       ``svdq_jax.attention.fp8_attention``, cudnn-fp8's numerics by XLA (unfused);
  int8-ref:      ``svdq_jax.attention.int8_attention`` run by XLA (unfused: it materializes the
                 scores; its time is not a kernel's, its error is the INT8/FP8 format's);
  int8qk:        ``pallas_kernels.attention_int8`` (INT8 q k^T, bf16 P V, Mosaic GPU), with
                 its quantization pass; int8fp8: the same with FP8 P V (int8-ref's numerics);
  int8qk-kernel, int8fp8-kernel: the kernel alone on prepared operands; a suffix
                 ':q64kv128s2' picks block_q, block_kv, steps;
  mgpu-f16:      jax's Mosaic GPU FlashAttention-3 example (f16), the structure's baseline.
The kernel's own error is also checked against its jnp reference ('vs reference' column).
A variant that fails prints its error and the rest go on; the table comes last.

--operands instead times FLUX's FP8 attention from the qkv projections' outputs (a double
block's two streams, a single block's one wide projection; ``flux.joint_attention`` under
'cudnn_fp8'): the operands made by XLA's unfused passes (split heads, RMSNorms, join, RoPE,
quantization) vs ``pallas_kernels.attention_fp8``'s one pass, alone and with the attention;
'differing' counts the E4M3 codes in which the two disagree.

    python3 scripts/bench_attention.py --out $OUT
    python3 scripts/bench_attention.py --operands --tilings 64x2w4,128x1w8 --out $OUT
    .venv/bin/python scripts/bench_attention.py --tokens 256 --heads 2 --variants xla-bf16,int8-ref
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import jax
import jax.numpy as jnp

from svdq_jax.attention import (cudnn_fp8_attention, cudnn_fp8_kernel, cudnn_fp8_operands,
                                fp8_attention, int8_attention)
from svdq_jax.pallas_kernels import attention_int8
from svdq_jax.timing import median_seconds


def _kernel(spec: str = ""):
  """The INT8 q k^T kernel on operands prepared outside the timed call; spec e.g. q64kv128s2."""
  kw = {}
  if spec:
    for key, name in (("q", "block_q"), ("kv", "block_kv"), ("s", "steps")):
      kw[name] = int(re.search(rf"(?<![a-z]){key}(\d+)", spec).group(1))
  return lambda *ops: attention_int8.flash(*ops, **kw)


def _mgpu_f16(q, k, v):
  """jax's example stages its tiles in f16 (it refuses bf16 inputs) and leaves the scores
  unscaled: q / sqrt(D) makes it the same attention."""
  from jax.experimental.pallas.ops.gpu import attention_mgpu
  config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2)
  f16 = lambda t: t.astype(jnp.float16)
  return attention_mgpu.attention(f16(q * q.shape[-1] ** -0.5), f16(k), f16(v), config)


VARIANTS = {
    "xla-bf16": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
    "cudnn-bf16": lambda q, k, v: jax.nn.dot_product_attention(q, k, v,
                                                               implementation="cudnn"),
    "cudnn-fp8": cudnn_fp8_attention,
    "fp8-ref": fp8_attention,
    "int8-ref": int8_attention,
    "mgpu-f16": _mgpu_f16,
}


KERNEL_PV = {"int8qk": "bf16", "int8fp8": "fp8"}   # attention_int8's variants: P V format


def variant(name: str):
  """(fn, prepared, pv): a VARIANTS entry on (q, k, v); 'int8qk' / 'int8fp8', the kernel with
  its quantization pass; or 'int8qk-kernel[:spec]' / 'int8fp8-kernel[:spec]', the kernel on
  ``attention_int8.prepare``'s operands (prepared True); 'cudnn-fp8-kernel': cuDNN's FP8
  kernel on ``cudnn_fp8_operands`` (prepared: that function). pv: the kernel's P V format,
  else None."""
  if name == "cudnn-fp8-kernel":
    return cudnn_fp8_kernel, cudnn_fp8_operands, None
  base, _, spec = name.partition(":")
  kernel, _, alone = base.partition("-")
  if kernel in KERNEL_PV and alone in ("", "kernel"):
    pv = KERNEL_PV[kernel]
    if alone:
      return _kernel(spec), True, pv
    return (lambda q, k, v: attention_int8.int8qk_attention(q, k, v, pv)), False, pv
  return VARIANTS[name], False, None


def operands_table(args) -> None:
  """--operands (module docstring): per block kind, ms of the unfused and the fused path."""
  from flax import nnx
  from svdq_jax.models import flux
  from svdq_jax.pallas_kernels import attention_fp8
  h, d, txt = args.heads * args.head_dim, args.head_dim, 512
  pe = flux.rope(jnp.zeros((args.tokens, 3)).at[:, 1].set(jnp.arange(args.tokens) % 64),
                 (16, 56, 56) if d == 128 else (d // 4, 3 * d // 8, 3 * d // 8), 10_000)
  qk = flux.QKNorm(d)
  qk.query_norm.scale[...] = jax.random.uniform(jax.random.key(1), (d,), minval=0.5, maxval=2)
  qk.key_norm.scale[...] = jax.random.uniform(jax.random.key(2), (d,), minval=0.5, maxval=2)
  x = lambda length, width, seed: jax.random.normal(jax.random.key(seed), (1, length, width),
                                                    jnp.bfloat16)
  kinds = {"double": ((x(txt, 3 * h, 3), qk), (x(args.tokens - txt, 3 * h, 4), qk)),
           "single": ((x(args.tokens, 7 * h, 5), qk),)}
  graph, state = nnx.split(qk)

  rows, fused_default = [], flux.attention_settings()[1]
  flux.set_attention_implementation("cudnn_fp8")
  for kind, streams in kinds.items():
    xs = [t for t, _ in streams]
    rebuilt = lambda xs: [(t, nnx.merge(graph, state)) for t in xs]
    ops = {"unfused": lambda xs: flux.fp8_operands_reference(rebuilt(xs), pe, args.heads)[:3],
           "fused": lambda xs: flux.fp8_operands(rebuilt(xs), pe, args.heads)[:3]}
    row = dict(kind=kind)
    got = {name: jax.jit(f)(xs) for name, f in ops.items()}
    row["differing"] = [int(jnp.sum(a.astype(jnp.float32) != b.astype(jnp.float32)))
                        for a, b in zip(got["unfused"], got["fused"])]
    for name, f in ops.items():
      row[f"{name}_operands_ms"] = median_seconds(jax.jit(f), xs, reps=10, rounds=5) * 1e3
    default_tiling = attention_fp8.TILING
    for spec in (t for t in args.tilings.split(",") if t):   # e.g. 64x2w4
      m = re.fullmatch(r"(\d+)x(\d+)w(\d+)", spec)
      attention_fp8.TILING = dict(block_m=int(m[1]), heads_per_program=int(m[2]),
                                  num_warps=int(m[3]))
      try:
        row[f"fused_{spec}_ms"] = median_seconds(jax.jit(ops["fused"]), xs, reps=10,
                                                 rounds=5) * 1e3
      except Exception as e:  # noqa: BLE001 - one tiling's failure is a result too
        row[f"fused_{spec}_ms"] = f"{type(e).__name__}: {str(e)[:200]}"
      attention_fp8.TILING = default_tiling
    for name, on in (("unfused", False), ("fused", True)):
      flux.set_fused_fp8_operands(on)
      f = jax.jit(lambda xs: flux.joint_attention(rebuilt(xs), pe, args.heads))
      row[f"{name}_attention_ms"] = median_seconds(f, xs, reps=10, rounds=5) * 1e3
    flux.set_fused_fp8_operands(fused_default)
    rows.append(row)
    print(json.dumps(row), flush=True)
  result = dict(device=jax.devices()[0].device_kind, date=time.strftime("%Y-%m-%d"),
                tokens=args.tokens, heads=args.heads, head_dim=d, rows=rows)
  with open(os.path.join(args.out, "attention_operands.json"), "w") as f:
    json.dump(result, f, indent=1)
  print("\n| block | operands unfused / fused ms | with attention unfused / fused ms | "
        "differing q, k, v codes | fused, other tilings ms |")
  print("| --- | ---: | ---: | ---: | --- |")
  for r in rows:
    other = ", ".join(f"{k[6:-3]} {v:.4f}" if isinstance(v, float) else f"{k[6:-3]} failed"
                      for k, v in r.items() if k.startswith("fused_") and k[6].isdigit())
    print(f"| {r['kind']} | {r['unfused_operands_ms']:.4f} / {r['fused_operands_ms']:.4f} | "
          f"{r['unfused_attention_ms']:.4f} / {r['fused_attention_ms']:.4f} | "
          f"{r['differing']} | {other} |")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "out/bench_attention"))
  ap.add_argument("--tokens", type=int, default=4608)
  ap.add_argument("--heads", type=int, default=24)
  ap.add_argument("--head-dim", type=int, default=128)
  # also int8qk-kernel[:spec], int8fp8-kernel[:spec]
  ap.add_argument("--variants", default=",".join([*VARIANTS, "cudnn-fp8-kernel", *KERNEL_PV]))
  ap.add_argument("--operands", action="store_true",
                  help="FLUX's FP8 attention operands: XLA's passes vs one kernel pass")
  ap.add_argument("--tilings", default="",
                  help="--operands: the kernel also timed with these tilings, "
                       "<block_m>x<heads per program>w<warps>, e.g. 64x2w4,128x1w8")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.operands:
    return operands_table(args)
  shape = (1, args.tokens, args.heads, args.head_dim)
  kq, kk, kv, ko = jax.random.split(jax.random.key(0), 4)
  # keys with a shared offset per channel, as RoPE'd, RMS-normed FLUX keys have
  q = jax.random.normal(kq, shape, jnp.float32)
  k = jax.random.normal(kk, shape, jnp.float32) + 2.0 * jax.random.normal(ko, shape[-1:])
  v = jax.random.normal(kv, shape, jnp.float32)
  exact = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))(
      q, k, v)
  q, k, v = (t.astype(jnp.bfloat16) for t in (q, k, v))
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for name in args.variants.split(","):
    fn, prepared, pv = variant(name)
    fn = jax.jit(fn)
    try:
      if callable(prepared):   # cudnn-fp8-kernel: the output in units of s_v
        *operands, sv = prepared(q, k, v)
        out = fn(*operands).astype(jnp.float32) * sv
      else:
        operands = attention_int8.prepare(q, k, v, pv) if prepared else (q, k, v)
        out = fn(*operands).astype(jnp.float32)
      err = float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact))
      ms = median_seconds(fn, *operands, reps=10, rounds=5) * 1e3
      rows.append(dict(variant=name, ms=round(ms, 4), rel_error=round(err, 5)))
      if pv:
        ref = attention_int8.reference(
            *(operands if prepared else attention_int8.prepare(q, k, v, pv)))
        rows[-1]["vs_reference"] = round(float(jnp.linalg.norm(out - ref)
                                               / jnp.linalg.norm(ref)), 5)
    except Exception as e:  # noqa: BLE001 - one variant's failure is a result too
      rows.append(dict(variant=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
    print(json.dumps(rows[-1]), flush=True)
  result = dict(device=jax.devices()[0].device_kind, date=time.strftime("%Y-%m-%d"),
                shape=shape, rows=rows)
  with open(os.path.join(args.out, "attention.json"), "w") as f:
    json.dump(result, f, indent=1)
  base = next((r["ms"] for r in rows if r["variant"] == "cudnn-bf16" and "ms" in r), None)
  print("\n| variant | ms | vs cudnn-bf16 | rel. error vs f32 | vs reference |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for r in rows:
    if "ms" in r:
      ratio = f"{base / r['ms']:.2f}x" if base else ""
      print(f"| {r['variant']} | {r['ms']} | {ratio} | {r['rel_error']} | "
            f"{r.get('vs_reference', '')} |")
    else:
      print(f"| {r['variant']} | failed: {r['error'][:80]} | | |")


if __name__ == "__main__":
  main()
