"""Probe: what a grouped image + text launch of the double blocks' W4A8 GEMMs could save.

Times w4a8_gemm_t (its default tiling, rank 32 + bias) at the image stream's 4096 tokens,
the text stream's 512 and the joint 4608 (one launch over both streams' tokens, same
weights: the grouped launch's ceiling), by device kernel time.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp

from svdq_jax.pallas_kernels import w4a8_hopper
from svdq_jax.timing import device_kernel_seconds, median_seconds

KINDS = [("qkv", 3072, 9216, None), ("proj", 3072, 3072, None), ("fc1", 3072, 12288, 0),
         ("fc2", 12288, 3072, None)]


def operands(m, k, n, key):
  ks = jax.random.split(key, 8)
  a = jax.random.randint(ks[0], (m, k), -127, 128, jnp.int8)
  sa = jax.random.uniform(ks[1], (m,), jnp.float32, 1e-3, 2e-3)
  codes = jax.random.randint(ks[2], (n, k // 2), 0, 256, jnp.uint8)
  mult = jax.random.randint(ks[3], (k // 128, n), 0, 256, jnp.uint8)
  sw = jax.random.uniform(ks[4], (n,), jnp.float32, 1e-3, 2e-3)
  lr = jax.random.normal(ks[5], (m, 32), jnp.bfloat16)
  up = jax.random.normal(ks[6], (n, 32), jnp.bfloat16)
  bias = jax.random.normal(ks[7], (n,), jnp.float32)
  return a, sa, codes, mult, sw, lr, up, bias


def kernel_ms(m, k, n, gelu, tiles=None):
  ops = operands(m, k, n, jax.random.key(m))
  tiles = tiles or w4a8_hopper.tiling(m, k, n, 32)
  f = jax.jit(lambda *o: w4a8_hopper.w4a8_gemm_t(*o, gelu_from=gelu, **tiles))
  per = device_kernel_seconds(f, *ops)
  return sum(v for name, v in per.items() if "w4a8" in name) * 1e3, tiles


rows = []
for name, k, n, gelu in KINDS:
  r = dict(kind=name, K=k, N=n)
  for m in (4096, 512, 4608):
    r[f"m{m}_ms"], r[f"m{m}_tiles"] = kernel_ms(m, k, n, gelu)
  r["m512_wide_ms"], _ = kernel_ms(512, k, n, gelu, dict(w4a8_hopper.WIDE))
  r["saved_ms"] = r["m4096_ms"] + r["m512_ms"] - r["m4608_ms"]
  print(json.dumps(r), flush=True)
  rows.append(r)
print("| kind | 4096 | 512 | 512 wide | 4608 | saved per layer | x19 |")
for r in rows:
  print(f"| {r['kind']} | {r['m4096_ms']:.4f} | {r['m512_ms']:.4f} | {r['m512_wide_ms']:.4f} | "
        f"{r['m4608_ms']:.4f} | {r['saved_ms']:.4f} | {19 * r['saved_ms']:.3f} |")
print("total saved a step (19 double blocks):", round(19 * sum(r["saved_ms"] for r in rows), 3))
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "grouped_probe.json"), "w"), indent=1)
