"""Checks and times the W4A4 Pallas kernels against XLA baselines (issue 4).

One run: for each FLUX.1 linear shape at M tokens,
  1. correctness of the fused kernels against the jnp reference (activation codes and
     scales bit-exact fraction, output relative error),
  2. timings: XLA bf16 x @ w (the baseline), XLA int8 dot_general with K-major operands
     (the ceiling), the unfused jnp reference path, the fused kernels (activation kernel +
     GEMM), the GEMM alone, the GEMM without the low-rank branch, the activation kernel,
  3. weight memory of bf16 vs the quantized layer.
Prints a table last; writes bench.md / bench.json under --out.

    python scripts/bench_w4a4.py --out $OUT            # on the GPU
    python scripts/bench_w4a4.py --out $OUT --fmt nvfp4   # NVFP4 layers (Triton kernels)
    python scripts/bench_w4a4.py --smoke               # tiny shapes, interpret mode, CPU
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from svdq_jax import formats, qlinear
from svdq_jax.pallas_kernels import w4a4
from svdq_jax.qlinear import QuantizedLinear, stored_weight
from svdq_jax.timing import median_seconds

FLUX_SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]
GEMM_CONFIGS = [  # (block_m, block_n, num_warps, num_stages, groups_per_step)
    (64, 128, 4, 4, 1), (64, 128, 4, 4, 2), (64, 128, 4, 4, 4), (64, 128, 4, 3, 2),
    (64, 64, 4, 4, 2), (128, 128, 8, 4, 2), (128, 64, 4, 4, 2), (32, 128, 4, 4, 2),
]


ACT_CONFIGS = [(32, 4), (16, 4), (16, 2), (64, 4)]  # (block_m, num_warps), 8 groups per program




def make_layer(k, n, rank, key, fmt="int4", act_fmt=None):
  """A random SVDQuant layer: weights in ``fmt`` ('int4', 'nvfp4', 'int4_2l'), activations in
  ``act_fmt`` (default: ``fmt``); weights ~ N(0, 0.02^2), random smoothing and low-rank."""
  ks = jax.random.split(key, 5)
  w = jax.random.normal(ks[0], (n, k), jnp.float32) * 0.02
  return QuantizedLinear(
      **stored_weight(formats.quantize_weight(w, fmt), fmt),
      smooth=jax.random.uniform(ks[1], (k,), minval=0.5, maxval=2.0),
      lora_down=(jax.random.normal(ks[2], (k, rank)) * 0.1).astype(jnp.bfloat16),
      lora_up=(jax.random.normal(ks[3], (rank, n)) * 0.1).astype(jnp.bfloat16),
      bias=(jax.random.normal(ks[4], (n,)) * 0.1).astype(jnp.bfloat16),
      weight_format=fmt, act_format=act_fmt or fmt)


def activations(m, k, key):
  x = jax.random.normal(key, (m, k), jnp.float32)
  x = x.at[:, :8].multiply(50.0)  # outlier channels
  return x.astype(jnp.bfloat16)


def check(layer, x, interpret):
  """Kernel vs reference on the same inputs."""
  fmt = layer.act_format
  xh = x.astype(jnp.float32) / layer.smooth
  ref_q = formats.quantize(xh, fmt)
  q, s, lr = w4a4.quantize_act(x, layer.smooth, layer.lora_down, act_format=fmt,
                               interpret=interpret)
  codes_equal = float(jnp.mean(q == formats.pack(ref_q.q, fmt)))
  scales_equal = float(jnp.mean(s == ref_q.scale))
  y = w4a4.w4a4_linear(layer, x.astype(jnp.float32), interpret=interpret)
  with qlinear.backend("reference"):
    y_ref = jax.jit(qlinear.apply)(layer, x.astype(jnp.float32))
  rel = float(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref))
  return dict(codes_equal=codes_equal, scales_equal=scales_equal, rel_err=rel,
              finite=bool(jnp.isfinite(y).all()))


def config_kwargs(cfg, interpret):
  bm, bn, nw, ns, gps = cfg
  return dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, groups_per_step=gps,
              interpret=interpret)


def flops(m, k, n):
  return 2.0 * m * k * n


def gemm(layer, q, s, lr=None, *, with_lr=True, **kw):
  """The GEMM kernel on a layer's weights (with or without the low-rank branch and bias)."""
  return w4a4.w4a4_gemm(q, s, layer.qweight, layer.wscale, lr if with_lr else None,
                        layer.lora_up if with_lr else None, layer.bias if with_lr else None,
                        w_channel_scale=layer.wcscale, act_format=layer.act_format, **kw)


def run_shape(m, k, n, rank, cfg, act_cfg, key, interpret, full, fmt="int4"):
  layer = make_layer(k, n, rank, key, fmt)
  x = activations(m, k, jax.random.fold_in(key, 1))
  w_bf16 = jax.random.normal(jax.random.fold_in(key, 2), (k, n), jnp.bfloat16)
  a8 = jax.random.randint(jax.random.fold_in(key, 3), (m, k), -8, 8, jnp.int8)
  w8 = jax.random.randint(jax.random.fold_in(key, 4), (n, k), -8, 8, jnp.int8)
  gemm_kw = config_kwargs(cfg, interpret)
  act_kw = dict(block_m=act_cfg[0], num_warps=act_cfg[1], act_format=fmt, interpret=interpret)
  q, s, lr = w4a4.quantize_act(x, layer.smooth, layer.lora_down, **act_kw)

  fns = {
      "xla_bf16": (jax.jit(lambda a, b: a @ b), (x, w_bf16)),
      "xla_int8": (jax.jit(lambda a, b: jax.lax.dot_general(
          a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)), (a8, w8)),
      "fused": (jax.jit(functools.partial(_fused, gemm_kw=gemm_kw, act_kw=act_kw)),
                (layer, x)),
      "gemm": (jax.jit(functools.partial(gemm, **gemm_kw)), (layer, q, s, lr)),
      "gemm_no_lowrank": (jax.jit(functools.partial(gemm, with_lr=False, **gemm_kw)),
                          (layer, q, s)),
      "act_kernel": (jax.jit(lambda *a: w4a4.quantize_act(*a, **act_kw)),
                     (x, layer.smooth, layer.lora_down)),
  }
  if full:
    fns["unfused_jnp"] = (jax.jit(qlinear.reference_apply), (layer, x))
  times = {name: median_seconds(f, *a) for name, (f, a) in fns.items()}
  return layer, x, times


def _diag_kernel(a_ref, w_ref, o_ref, *, mode, gps):
  """Time-attribution variants of the GEMM loop (numerically not the W4A4 product):
  'int_only': unpack + two int8 dots per group, int32 accumulation, no per-group scaling;
  'no_unpack': the packed bytes used as int8 directly, one K=32 dot per group;
  'int8_k64': a plain int8 matmul over the bytes, K=64 per step (the loop's MMA ceiling)."""
  bm, kh = a_ref.shape
  width = 64 if mode == "int8_k64" else w4a4.HALF

  def one(g, acc):
    a, w = a_ref[:, pl.ds(g * width, width)], w_ref[:, pl.ds(g * width, width)]
    if mode == "int_only":
      (a_lo, a_hi), (w_lo, w_hi) = w4a4._unpack(a, True), w4a4._unpack(w, True)
      return acc + plgpu.dot(a_lo, w_lo, trans_b=True) + plgpu.dot(a_hi, w_hi, trans_b=True)
    return acc + plgpu.dot(a.astype(jnp.int8), w.astype(jnp.int8), trans_b=True)

  def step(i, acc):
    for j in range(gps):
      acc = one(i * gps + j, acc)
    return acc

  acc = jax.lax.fori_loop(0, kh // width // gps, step,
                          jnp.zeros((bm, w_ref.shape[0]), jnp.int32))
  o_ref[...] = acc.astype(jnp.float32).astype(o_ref.dtype)


def diagnostic(mode, a_packed, w_packed, cfg, interpret):
  bm, bn, nw, ns, gps = cfg
  m, kh = a_packed.shape
  n = w_packed.shape[0]
  return pl.pallas_call(
      functools.partial(_diag_kernel, mode=mode, gps=gps), grid=(m // bm, n // bn),
      in_specs=[pl.BlockSpec((bm, kh), lambda i, j: (i, 0)),
                pl.BlockSpec((bn, kh), lambda i, j: (j, 0))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
      compiler_params=plgpu.CompilerParams(num_warps=nw, num_stages=ns),
      interpret=interpret)(a_packed, w_packed)


def _fused(layer, x, gemm_kw, act_kw):
  q, s, lr = w4a4.quantize_act(x, layer.smooth, layer.lora_down, **act_kw)
  return gemm(layer, q, s, lr, **gemm_kw)


ACT_SWEEP = [  # (block_m, num_warps, groups_per_program); 10**6: the whole K in one program
    (16, 4, 10**6), (16, 4, 16), (16, 4, 8), (16, 4, 4), (32, 4, 16), (32, 4, 8),
    (64, 4, 16), (16, 2, 16), (32, 8, 16)]


def act_sweep(m, rank, key, interpret, say) -> dict:
  """Times activation-kernel configs at FLUX's input widths; checks that every config's codes
  and scales equal the single-chunk kernel's exactly and its low-rank output within f32
  summation order. Returns {K: {config: ms}}."""
  out = {}
  for k in ((128, 256) if interpret else (3072, 12288, 15360)):
    layer = make_layer(k, 128, rank, key)
    x = activations(m, k, jax.random.fold_in(key, k))
    base = None
    out[k] = {}
    for bm, nw, gpp in ([(16, 4, 10**6), (16, 4, 1)] if interpret else ACT_SWEEP):
      kw = dict(block_m=bm, num_warps=nw, groups_per_program=gpp, interpret=interpret)
      f = jax.jit(lambda *a, kw=kw: w4a4.quantize_act(*a, **kw))
      try:
        q, sc, lr = f(x, layer.smooth, layer.lora_down)
        base = base or (q, sc, lr)
        exact = bool((q == base[0]).all() and (sc == base[1]).all())
        lr_err = float(jnp.abs(lr - base[2]).max() / jnp.abs(base[2]).max())
        ms = median_seconds(f, x, layer.smooth, layer.lora_down) * 1e3
        gbs = (m * k * 2 + m * k // 2 + m * k // 16) / ms / 1e6
        out[k][str((bm, nw, gpp))] = ms
        say(f"act K={k} {(bm, nw, gpp)}: {ms:.3f} ms, {gbs:.0f} GB/s, codes+scales exact "
            f"{exact}, lr rel diff {lr_err:.1e}")
      except Exception as e:  # a config the compiler rejects
        say(f"act K={k} {(bm, nw, gpp)}: failed: {type(e).__name__}: {str(e)[:200]}")
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--m", type=int, default=4608)
  p.add_argument("--rank", type=int, default=32)
  p.add_argument("--out", default=os.environ.get("OUT", "out/bench"))
  p.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (CPU)")
  p.add_argument("--act-only", action="store_true",
                 help="only the activation-kernel config sweep (act_sweep.json)")
  p.add_argument("--configs", default=None,
                 help="GEMM tile configs to sweep instead of GEMM_CONFIGS, e.g. "
                      "'128,128,8,4,2;64,128,4,4,1' (block_m,block_n,warps,stages,groups/step)")
  p.add_argument("--fmt", default="int4", choices=("int4", "nvfp4"),
                 help="layer format (weights and activations); nvfp4 skips the INT4-only "
                      "loop diagnostics")
  args = p.parse_args()
  fmt = args.fmt
  interpret = args.smoke
  m = 40 if args.smoke else args.m
  shapes = [(128, 128), (256, 128)] if args.smoke else FLUX_SHAPES
  configs = [(16, 64, 4, 2, 2)] if args.smoke else GEMM_CONFIGS
  if args.configs:
    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")]
  key = jax.random.key(0)
  os.makedirs(args.out, exist_ok=True)
  log = open(os.path.join(args.out, "bench.log"), "w")

  def say(*a):
    line = " ".join(str(v) for v in a)
    print(line, flush=True)
    log.write(line + "\n")

  say(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, "
      f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}")
  if args.act_only:
    sweep = act_sweep(m, args.rank, key, interpret, say)
    with open(os.path.join(args.out, "act_sweep.json"), "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "m": m, "rank": args.rank,
                 "ms": sweep}, f, indent=1)
    return
  # 1. GEMM tile configs on the second shape (3072 -> 12288)
  k0, n0 = shapes[1]
  cfg_times = {}
  for cfg in configs:
    try:
      layer = make_layer(k0, n0, args.rank, key, fmt)
      x = activations(m, k0, key)
      q, s, lr = w4a4.quantize_act(x, layer.smooth, layer.lora_down, act_format=fmt,
                                   interpret=interpret)
      f = jax.jit(functools.partial(gemm, **config_kwargs(cfg, interpret)))
      cfg_times[cfg] = median_seconds(f, layer, q, s, lr)
      say(f"gemm config {cfg}: {cfg_times[cfg] * 1e3:.3f} ms "
          f"({flops(m, k0, n0) / cfg_times[cfg] / 1e12:.0f} TOP/s)")
    except Exception as e:  # a config the compiler rejects (shared memory, registers)
      say(f"gemm config {cfg}: failed: {type(e).__name__}: {str(e)[:200]}")
  best = min(cfg_times, key=cfg_times.get)
  say(f"best gemm config: {best}")
  diag_ms = {"full W4A4 gemm": cfg_times[best] * 1e3}
  if fmt == "int4":  # the diagnostics time INT4's unpack and int8 dots
    layer = make_layer(k0, n0, args.rank, key)
    q, _, _ = w4a4.quantize_act(activations(m, k0, key), None, None, interpret=interpret)
    for mode in ("int_only", "no_unpack", "int8_k64"):
      try:
        f = jax.jit(functools.partial(diagnostic, mode, cfg=best, interpret=interpret))
        diag_ms[mode] = median_seconds(f, q, layer.qweight) * 1e3
      except Exception as e:
        say(f"diagnostic {mode}: failed: {type(e).__name__}: {str(e)[:200]}")
  for mode, ms in diag_ms.items():
    say(f"diagnostic {mode} ({k0} -> {n0}): {ms:.3f} ms")

  act_times = {}
  layer = make_layer(k0, n0, args.rank, key, fmt)
  x = activations(m, k0, key)
  for bm, nw in ([(16, 4)] if args.smoke else ACT_CONFIGS):
    try:
      f = jax.jit(lambda *a, bm=bm, nw=nw: w4a4.quantize_act(
          *a, block_m=bm, num_warps=nw, act_format=fmt, interpret=interpret))
      act_times[(bm, nw)] = median_seconds(f, x, layer.smooth, layer.lora_down)
      say(f"act config {(bm, nw)}: {act_times[(bm, nw)] * 1e3:.3f} ms")
    except Exception as e:
      say(f"act config {(bm, nw)}: failed: {type(e).__name__}: {str(e)[:200]}")
  best_act = min(act_times, key=act_times.get)
  say(f"best act config: {best_act}")

  rows = []
  for i, (k, n) in enumerate(shapes):
    layer, x, t = run_shape(m, k, n, args.rank, best, best_act, jax.random.fold_in(key, i),
                            interpret, full=not args.smoke, fmt=fmt)
    chk = check(layer, x[:min(m, 1000)], interpret)
    bf16_bytes = k * n * 2
    q_bytes = layer.nbytes
    row = dict(m=m, k=k, n=n, times_ms={a: b * 1e3 for a, b in t.items()}, check=chk,
               bf16_weight_bytes=bf16_bytes, quantized_weight_bytes=q_bytes)
    rows.append(row)
    say(json.dumps(row))

  header = ("| K -> N | bf16 ms | int8 ceiling ms | fused ms | speed-up vs bf16 | gemm ms | "
            "gemm no-LR ms | LR overhead | act kernel ms | unfused jnp ms | "
            "fused TOP/s | weights vs bf16 | rel err | codes exact |")
  lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    t = r["times_ms"]
    lines.append(
        f"| {r['k']} -> {r['n']} | {t['xla_bf16']:.3f} | {t['xla_int8']:.3f} | "
        f"{t['fused']:.3f} | {t['xla_bf16'] / t['fused']:.2f}x | {t['gemm']:.3f} | "
        f"{t['gemm_no_lowrank']:.3f} | {t['gemm'] / t['gemm_no_lowrank'] - 1:+.1%} | "
        f"{t['act_kernel']:.3f} | {t.get('unfused_jnp', float('nan')):.3f} | "
        f"{flops(r['m'], r['k'], r['n']) / t['fused'] / 1e9:.0f} | "
        f"{r['quantized_weight_bytes'] / r['bf16_weight_bytes']:.3f} | "
        f"{r['check']['rel_err']:.1e} | {r['check']['codes_equal']:.4f} |")
  table = "\n".join(lines)
  with open(os.path.join(args.out, "bench.json"), "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "format": fmt, "m": m,
               "rank": args.rank, "gemm_configs_ms": {str(c): v * 1e3 for c, v in cfg_times.items()},
               "best_gemm_config": best, "diagnostics_ms": diag_ms,
               "act_configs_ms": {str(c): v * 1e3 for c, v in act_times.items()},
               "best_act_config": best_act, "rows": rows}, f,
              indent=1)
  with open(os.path.join(args.out, "bench.md"), "w") as f:
    f.write(f"{fmt}, M = {m}, rank {args.rank}, GEMM config {best} (block_m, block_n, warps, "
            f"stages, groups per step), activation kernel config {best_act} (block_m, "
            f"warps), device {jax.devices()[0].device_kind}\n\n{table}\n\n"
            + "\n".join(f"- diagnostic {k}: {v:.3f} ms" for k, v in diag_ms.items()) + "\n")
  say(table)


if __name__ == "__main__":
  main()
