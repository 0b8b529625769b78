"""Runs W4A4 GEMM variants (or, with --act, the activation kernel) once each at one FLUX
shape, for a hardware-counter profiler.

    ncu --clock-control none -k regex:w4a4 --section ... \\
      python3 scripts/profile_w4a4_hopper.py --variants "s8 g2 s4,e4m3 g2 s4"
    ncu --clock-control none -k regex:quantize_act --set full \\
      python3 scripts/profile_w4a4_hopper.py --act --shape 4608x12288x3072

Each variant's kernel is named after it (``w4a4_<mma>_<rescale>_m..n..w..a..g..s..``), so
the profiler's report tells them apart. Variants as in bench_w4a4_hopper.variant_kwargs.
"""

from __future__ import annotations

import argparse
import functools

import jax

from svdq_jax.pallas_kernels import w4a4, w4a4_hopper as hop

from bench_w4a4 import activations, make_layer
from bench_w4a4_hopper import e4m3_operands, operands, variant_kwargs


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variants", default="s8 g2 s4")
  p.add_argument("--shape", default="4608x3072x3072", help="MxKxN")
  p.add_argument("--rank", type=int, default=32)
  p.add_argument("--act", action="store_true",
                 help="run the activation kernel (codes, as the Hopper path) instead")
  args = p.parse_args()
  m, k, n = map(int, args.shape.split("x"))
  if args.act:
    layer = make_layer(k, n, args.rank, jax.random.key(0))
    x = activations(m, k, jax.random.key(1))
    q, *_ = jax.jit(functools.partial(w4a4.quantize_act, codes=True))(
        x, layer.smooth, layer.lora_down)
    print("act", int(q[0, 0]), flush=True)
    return
  ops = operands(m, k, n, args.rank, jax.random.key(0))
  for name in args.variants.split(","):
    kwargs = variant_kwargs(name)
    call = e4m3_operands(ops) if kwargs.get("mma") == "e4m3" else ops
    y = jax.jit(functools.partial(hop.w4a4_gemm_t, **kwargs))(*call)
    print(name, float(y[0, 0]), flush=True)


if __name__ == "__main__":
  main()
