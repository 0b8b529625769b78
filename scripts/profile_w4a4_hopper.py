"""Runs W4A4 GEMM variants once each at one FLUX shape, for a hardware-counter profiler.

    ncu --clock-control none -k regex:w4a4 --section ... \\
      python3 scripts/profile_w4a4_hopper.py --variants "s8 g2 s4,e4m3 g2 s4"

Each variant's kernel is named after it (``w4a4_<mma>_<rescale>_m..n..w..a..g..s..``), so
the profiler's report tells them apart. Variants as in bench_w4a4_hopper.variant_kwargs.
"""

from __future__ import annotations

import argparse
import functools

import jax

from svdq_jax.pallas_kernels import w4a4_hopper as hop

from bench_w4a4_hopper import e4m3_operands, operands, variant_kwargs


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variants", default="s8 g2 s4")
  p.add_argument("--shape", default="4608x3072x3072", help="MxKxN")
  p.add_argument("--rank", type=int, default=32)
  args = p.parse_args()
  m, k, n = map(int, args.shape.split("x"))
  ops = operands(m, k, n, args.rank, jax.random.key(0))
  for name in args.variants.split(","):
    kwargs = variant_kwargs(name)
    call = e4m3_operands(ops) if kwargs.get("mma") == "e4m3" else ops
    y = jax.jit(functools.partial(hop.w4a4_gemm_t, **kwargs))(*call)
    print(name, float(y[0, 0]), flush=True)


if __name__ == "__main__":
  main()
