"""Times candidate GEMM loop structures on the GPU (timing only, not the W4A4 numerics).

Each variant loops over K one 64-group at a time over [BM, BN] tiles and accumulates int32
per group ('scaled' variants also apply a per-group f32 rescale like the real kernel):
  a_lhs_split32   the current kernel: both operands packed, split halves -> two K=32 dots
  a_lhs_pair128   both packed, a byte holds one element of group 2b and of 2b+1 -> K=64 dots
  w_lhs_pair128   weights packed as pair128 and unpacked as the dot's LHS (registers),
                  activations int8 in memory as the RHS; computes the transposed tile
  int8_both       both operands int8 in memory (no unpack): the scaling cost alone
    python scripts/probe_gemm_layouts.py
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from svdq_jax.timing import median_seconds


def unpack(b):
  s = b.astype(jnp.int8)
  return (jax.lax.shift_right_arithmetic(jax.lax.shift_left(s, jnp.int8(4)), jnp.int8(4)),
          jax.lax.shift_right_arithmetic(s, jnp.int8(4)))


def kernel(a_ref, sa_ref, w_ref, sw_ref, o_ref, *, variant, scaled):
  bm = a_ref.shape[0]
  bn = w_ref.shape[0]
  groups = sa_ref.shape[1]
  transposed = variant == "w_lhs_pair128"
  shape = (bn, bm) if transposed else (bm, bn)

  def scale(part, g):
    if not scaled:
      return part
    sa, sw = sa_ref[:, g], sw_ref[:, g].astype(jnp.float32)
    outer = sw[:, None] * sa[None, :] if transposed else sa[:, None] * sw[None, :]
    return part.astype(jnp.float32) * outer

  def pair(b, acc):  # groups 2b and 2b+1
    g0, g1 = 2 * b, 2 * b + 1
    if variant == "a_lhs_split32":
      for g in (g0, g1):
        (al, ah), (wl, wh) = unpack(a_ref[:, pl.ds(g * 32, 32)]), unpack(w_ref[:, pl.ds(g * 32, 32)])
        acc += scale(plgpu.dot(al, wl, trans_b=True) + plgpu.dot(ah, wh, trans_b=True), g)
      return acc
    if variant == "a_lhs_pair128":
      (a0, a1), (w0, w1) = unpack(a_ref[:, pl.ds(b * 64, 64)]), unpack(w_ref[:, pl.ds(b * 64, 64)])
      acc += scale(plgpu.dot(a0, w0, trans_b=True), g0)
      return acc + scale(plgpu.dot(a1, w1, trans_b=True), g1)
    if variant == "w_lhs_pair128":
      w0, w1 = unpack(w_ref[:, pl.ds(b * 64, 64)])
      a0, a1 = a_ref[:, pl.ds(g0 * 64, 64)], a_ref[:, pl.ds(g1 * 64, 64)]
      acc += scale(plgpu.dot(w0, a0, trans_b=True), g0)
      return acc + scale(plgpu.dot(w1, a1, trans_b=True), g1)
    a0, a1 = a_ref[:, pl.ds(g0 * 64, 64)], a_ref[:, pl.ds(g1 * 64, 64)]
    w0, w1 = w_ref[:, pl.ds(g0 * 64, 64)], w_ref[:, pl.ds(g1 * 64, 64)]
    acc += scale(plgpu.dot(a0, w0, trans_b=True), g0)
    return acc + scale(plgpu.dot(a1, w1, trans_b=True), g1)

  acc = jax.lax.fori_loop(0, groups // 2, pair,
                          jnp.zeros(shape, jnp.float32 if scaled else jnp.int32))
  acc = acc.astype(jnp.float32)
  o_ref[...] = (acc.T if transposed else acc).astype(o_ref.dtype)


def call(variant, scaled, a, sa, w, sw, bm, bn, nw, ns):
  m, n = a.shape[0], w.shape[0]
  return pl.pallas_call(
      functools.partial(kernel, variant=variant, scaled=scaled), grid=(m // bm, n // bn),
      in_specs=[pl.BlockSpec((bm, a.shape[1]), lambda i, j: (i, 0)),
                pl.BlockSpec((bm, sa.shape[1]), lambda i, j: (i, 0)),
                pl.BlockSpec((bn, w.shape[1]), lambda i, j: (j, 0)),
                pl.BlockSpec((bn, sw.shape[1]), lambda i, j: (j, 0))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
      compiler_params=plgpu.CompilerParams(num_warps=nw, num_stages=ns))(a, sa, w, sw)




def main():
  m, k, n = 4608, 3072, 12288
  key = jax.random.key(0)
  ks = jax.random.split(key, 6)
  a_packed = jax.random.randint(ks[0], (m, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
  w_packed = jax.random.randint(ks[1], (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
  a8 = jax.random.randint(ks[2], (m, k), -8, 8, jnp.int8)
  w8 = jax.random.randint(ks[3], (n, k), -8, 8, jnp.int8)
  sa = jax.random.uniform(ks[4], (m, k // 64))
  sw = jax.random.uniform(ks[5], (n, k // 64)).astype(jnp.bfloat16)
  operands = {"a_lhs_split32": (a_packed, w_packed), "a_lhs_pair128": (a_packed, w_packed),
              "w_lhs_pair128": (a8, w_packed), "int8_both": (a8, w8)}
  configs = [(64, 128, 4, 4), (128, 128, 8, 3), (128, 64, 4, 4), (64, 256, 8, 3),
             (128, 256, 8, 3)]
  rows = []
  xla = median_seconds(jax.jit(lambda x, y: x @ y),
                       jax.random.normal(ks[0], (m, k), jnp.bfloat16),
                       jax.random.normal(ks[1], (k, n), jnp.bfloat16))
  print(f"xla bf16: {xla * 1e3:.3f} ms", flush=True)
  for variant, (a, w) in operands.items():
    for scaled in (False, True):
      best = None
      for cfg in configs:
        try:
          f = jax.jit(functools.partial(call, variant, scaled, bm=cfg[0], bn=cfg[1],
                                        nw=cfg[2], ns=cfg[3]))
          t = median_seconds(f, a, sa, w, sw)
        except Exception as e:
          print(f"{variant} scaled={scaled} {cfg}: failed {type(e).__name__}: {str(e)[:150]}")
          continue
        print(f"{variant} scaled={scaled} {cfg}: {t * 1e3:.3f} ms", flush=True)
        best = min(best or (t, cfg), (t, cfg))
      if best:
        rows.append((variant, scaled, best[0] * 1e3, best[1], xla / best[0]))
  print(f"\nM={m} K={k} N={n}, {jax.devices()[0].device_kind}; xla bf16 {xla * 1e3:.3f} ms")
  print("| variant | per-group scaling | best ms | config | vs bf16 |")
  print("| --- | --- | ---: | --- | ---: |")
  for v, s, t, c, r in rows:
    print(f"| {v} | {s} | {t:.3f} | {c} | {r:.2f}x |")


if __name__ == "__main__":
  main()
