"""Times GPTQ residual quantization (``svdq_jax.gptq``) per FLUX.1 linear shape on the
accelerator, against round-to-nearest, and estimates the whole FLUX.1-dev transformer from
the layer counts (19 double + 38 single blocks). Prints a table last.

    python3 scripts/bench_gptq.py [--samples 256] [--fmt int4_2l]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from svdq_jax import formats, gptq

# (K, N, layers of this shape in FLUX.1-dev: q/k/v fused as one group; the single blocks'
# modulation is 3072 -> 9216 too)
FLUX_LAYERS = [(3072, 9216, 2 * 19 + 38), (3072, 3072, 2 * 19), (3072, 12288, 2 * 19),
               (12288, 3072, 2 * 19), (3072, 21504, 38), (15360, 3072, 38),
               (3072, 18432, 2 * 19)]  # the last: double-block modulation (W4A16)


def seconds(f, *args):
  jax.block_until_ready(f(*args))  # compile
  t = time.perf_counter()
  jax.block_until_ready(f(*args))
  return time.perf_counter() - t


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--samples", type=int, default=256)
  ap.add_argument("--fmt", default="int4_2l")
  args = ap.parse_args()
  rows, total_gptq, total_rtn = [], 0.0, 0.0
  for k, n, count in FLUX_LAYERS:
    x = jax.random.normal(jax.random.key(0), (args.samples, k))
    w = jax.random.normal(jax.random.key(1), (n, k)) * 0.02
    h = jax.block_until_ready(gptq.hessian(x))
    t_h = seconds(gptq.hessian, x)
    t_g = seconds(lambda w, h: gptq.quantize_weight(w, h, args.fmt).q, w, h)
    t_r = seconds(jax.jit(lambda w: formats.quantize_weight(w, args.fmt).q), w)
    total_gptq += count * (t_g + t_h)
    total_rtn += count * t_r
    rows.append(f"| {k} -> {n} | {count} | {t_h:.3f} | {t_g:.3f} | {t_r:.4f} |")
    print(rows[-1], flush=True)
  print(f"device: {jax.devices()[0].device_kind}, fmt {args.fmt}, {args.samples} samples")
  print("| K -> N | layers | Hessian s | GPTQ s | RTN s |\n| --- | ---: | ---: | ---: | ---: |")
  print("\n".join(rows))
  print(f"FLUX.1-dev estimate: GPTQ adds {total_gptq:.0f} s (RTN {total_rtn:.1f} s)")


if __name__ == "__main__":
  main()
