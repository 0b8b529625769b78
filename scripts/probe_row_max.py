"""One-off probe (issue 14): what the GELU epilogue's next-layer maxima cost in w4a8_gemm_t.

fc1's shape at M = 4608 (3072 -> 12288, GELU from column 0, the library's tiling), rank 32 +
bias: plain / GELU / GELU + maxima over the whole tile / 128 / 64 tokens a step. Outputs
compared bit for bit between the maxima variants. Run with MOSAIC_GPU_DUMP_PTXAS=1
MOSAIC_GPU_DUMP_TO=$OUT/dump to read ptxas' registers and spills.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from svdq_jax.pallas_kernels import w4a8_hopper
from svdq_jax.timing import median_seconds

from bench_rowscaled import gemm_operands
from bench_w4a4 import activations, make_layer


def main():
  out = os.environ.get("OUT", "out/probe")
  res = {}
  for m, k, n in [(4608, 3072, 12288), (4096, 3072, 12288)]:
    kx, kl = jax.random.split(jax.random.key(0))
    layer = make_layer(k, n, 32, kl, "int4_2l", "int8")
    a, sa, _, sw, *epi = gemm_operands(layer, activations(m, k, kx))
    ops = (a, sa, layer.qweight, layer.wscale.T, sw, *epi)
    inv = jax.random.uniform(kl, (n,), minval=0.5, maxval=2.0)
    tiles = w4a8_hopper.tiling(m, k, n, 32, gelu_from=0)
    variants = {"gelu_rmax": (dict(gelu_from=0), (inv,)),
                "gelu_rmax_r128": (dict(gelu_from=0, row_max_rows=128), (inv,))}
    r = dict(tiles=tiles)
    outs, fns = {}, {}
    for name, (kw, extra) in variants.items():
      fns[name] = jax.jit(lambda *o, kw=kw: w4a8_hopper.w4a8_gemm_t(*o, **tiles, **kw))
      outs[name] = jax.tree.map(np.asarray, fns[name](*ops, *extra))
    for rep in range(3):   # alternated: the machine's drift hits both alike
      for name, (kw, extra) in variants.items():
        r.setdefault(f"{name}_ms", []).append(median_seconds(fns[name], *ops, *extra) * 1e3)
    print(m, {k: v for k, v in r.items() if k.endswith("_ms")}, flush=True)
    r["r128_mismatches"] = sum(int((np.asarray(x, np.float32) != np.asarray(y, np.float32)).sum())
                               for x, y in zip(outs["gelu_rmax_r128"], outs["gelu_rmax"]))
    res[f"{m}x{k}x{n}"] = r
  with open(os.path.join(out, "probe_row_max.json"), "w") as f:
    json.dump(res, f, indent=1)
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  main()
