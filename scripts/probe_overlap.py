"""One-off GPU probe (not committed): the W4A8 register GEMM with a step's wgmma left in
flight under the next step's expansion (overlap=True) against the default, and the ceiling
of cheaper expansion (the codes' bytes used as the products, no arithmetic: wrong values)."""
import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from svdq_jax import formats, timing
from svdq_jax.pallas_kernels import w4a8_hopper

SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]


def operands(m, k, n, r=32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 7)
  a = jax.random.randint(ks[0], (m, k), -128, 128, jnp.int8)
  w = jax.random.normal(ks[1], (n, k)) * jnp.linspace(0.1, 3.0, k)
  qt = formats.quantize_weight(w, "int4_2l")
  codes, mult = formats.pack(qt.q, "int4_2l"), formats.pack_multipliers(qt.scale)
  sa, sw = jax.random.uniform(ks[2], (m,)), qt.tensor_scale[:, 0]
  lr = jax.random.normal(ks[3], (m, r), jnp.bfloat16)
  up = jax.random.normal(ks[4], (n, r), jnp.bfloat16)
  bias = jax.random.normal(ks[5], (n,))
  return a, sa, codes, mult.T, sw, lr, up, bias


def raw_expand(codes_ref, mult_ref, interpret):
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.pallas import mosaic_gpu as plgpu
  layout = plgpu.Layout.WGMMA_8BIT
  rows = codes_ref.shape[0]

  @plgpu.inline_mgpu(arg_types=(layout,), return_type=plgpu.ShapeDtypeStruct(
      (rows, 128), jnp.int8, layout=layout))
  def expand(_, frag):
    r = frag.registers
    regs = np.concatenate([r[:, :2], r[:, :2], r[:, 2:], r[:, 2:]], axis=1)
    return mgpu.FragmentedArray(_registers=regs, _layout=frag.layout, _is_signed=True)
  return expand(plgpu.load(codes_ref, layout=layout))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--ms", default="4608,4096")
  args = ap.parse_args()
  rows = []
  orig = w4a8_hopper._expand
  for m in map(int, args.ms.split(",")):
    for k, n in SHAPES:
      ops = operands(m, k, n)
      a, sa, codes, mult_t, sw, lr, up, bias = ops
      tiles = w4a8_hopper.tiling(m, k, n, 32)
      row = dict(M=m, K=k, N=n, tiles=tiles)
      wbf = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16)
      xbf = a.astype(jnp.bfloat16)
      row["bf16_ms"] = 1e3 * timing.median_seconds(jax.jit(lambda x, w: x @ w), xbf, wbf)
      w8 = jax.random.randint(jax.random.key(2), (k, n), -128, 128, jnp.int8)
      row["xla_int8_ms"] = 1e3 * timing.median_seconds(jax.jit(
          lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.int32)), a, w8)
      outs = {}
      for name, kw in [("default", {}), ("overlap", dict(overlap=True)),
                       ("overlap_s4", dict(overlap=True, steps=tiles["steps"] + 1)),
                       ("raw_expand", {}), ("raw_expand_overlap", dict(overlap=True))]:
        w4a8_hopper._expand = raw_expand if name.startswith("raw") else orig
        jax.clear_caches()
        f = jax.jit(lambda *o, kw=kw: w4a8_hopper.w4a8_gemm_t(*o, **{**tiles, **kw}))
        try:
          outs[name] = np.asarray(f(*ops).astype(jnp.float32))
          row[f"{name}_ms"] = 1e3 * timing.median_seconds(f, *ops)
        except Exception as e:  # noqa: BLE001 (a probe: record and go on)
          row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      w4a8_hopper._expand = orig
      for name in ("overlap", "overlap_s4"):
        if name in outs:
          row[f"{name}_mismatches"] = int((outs[name] != outs["default"]).sum())
      print(json.dumps(row), flush=True)
      rows.append(row)
  json.dump(rows, open(os.path.join(args.out, "probe_overlap.json"), "w"), indent=1)
  cols = ["bf16", "xla_int8", "default", "overlap", "overlap_s4", "raw_expand",
          "raw_expand_overlap"]
  print("| M | K | N | " + " | ".join(cols) + " | mismatches overlap / s4 |")
  for r in rows:
    print(f"| {r['M']} | {r['K']} | {r['N']} | " + " | ".join(
        f"{r[c + '_ms']:.3f}" if c + "_ms" in r else "err" for c in cols)
        + f" | {r.get('overlap_mismatches')} / {r.get('overlap_s4_mismatches')} |")


if __name__ == "__main__":
  main()
