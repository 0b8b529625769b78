"""Probe (issue 4): a block-scaled int8 GEMM on the Mosaic GPU backend (wgmma s8 -> s32).

out[m, n] = sum_g f32(int32 dot(a[m, g], b[n, g])) * sa[g, m] * sw[g, n] over 64-groups g,
the arithmetic of the W4A4 GEMM with int8 operands in memory (no 4-bit unpacking yet).
Warp specialized: one TMA warpgroup streams A, B and the scale rows; two compute warpgroups
(each half of the N tile) run wgmma per group and rescale into an f32 register accumulator,
so one warpgroup's rescale can overlap the other's MMAs. Checks against jnp, times against
XLA bf16 and XLA int8, prints a table last.

    python3 scripts/probe_mosaic_scaled_int8.py
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
from svdq_jax.timing import median_seconds

GROUP = 64


def scaled_int8_matmul(a, b, sa_t, sw_t, *, tile_m=128, tile_n=128, steps=4, scaled=True,
                       gps=1):
  """a int8 [M, K], b int8 [N, K], sa_t f32 [K/64, M], sw_t f32 [K/64, N] -> bf16 [M, N].

  gps: 64-groups per pipeline step; with 2, the second group's wgmma runs while the first
  group is rescaled (wgmma_wait(1)).
  """
  m, k = a.shape
  n = b.shape[0]
  groups = k // GROUP // gps
  tile_k = GROUP * gps
  cta_tile_n = 2 * tile_n
  m_iters, n_iters = m // tile_m, n // cta_tile_n
  swizzle = plgpu.find_swizzle(GROUP * 8)
  transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
  out_swizzle = plgpu.find_swizzle(tile_n * 16)
  out_transforms = (plgpu.TilingTransform((8, out_swizzle // 2)),
                    plgpu.SwizzleTransform(out_swizzle))

  def kernel(a_gmem, b_gmem, sa_gmem, sw_gmem, out_gmem):
    def get_pipeline(body, context):
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(groups,), memory_registers=40,
          in_specs=[
              plgpu.BlockSpec((tile_m, tile_k), lambda g: (0, g), transforms=transforms,
                              memory_space=plgpu.SMEM),
              plgpu.BlockSpec((cta_tile_n, tile_k), lambda g: (0, g), transforms=transforms,
                              memory_space=plgpu.SMEM),
              plgpu.BlockSpec((gps, tile_m), lambda g: (g, 0), memory_space=plgpu.SMEM),
              plgpu.BlockSpec((gps, cta_tile_n), lambda g: (g, 0), memory_space=plgpu.SMEM),
          ],
          wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=steps,
          compute_context=context)

    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=get_pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem, sa_gmem, sw_gmem),
        out_smem=plgpu.SMEM((2, tile_m, tile_n), jnp.bfloat16, transforms=out_transforms),
        collective_axes="wg")
    def _scope(allocs, out_smem):
      wg = lax.axis_index("wg")

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
      def _tiles(info):
        (lin,) = info.index
        m_idx, n_idx = lin // n_iters, lin % n_iters
        m_slice = pl.ds(m_idx * tile_m, tile_m)
        n_slice = pl.ds(n_idx * cta_tile_n, cta_tile_n)
        wg_n = pl.ds(wg * tile_n, tile_n)

        def context(eval_pipeline):
          zero = plgpu.layout_cast(jnp.zeros((tile_m, tile_n), jnp.float32),
                                   plgpu.Layout.WGMMA)
          total = eval_pipeline(zero)
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          out_smem[wg] = total.astype(jnp.bfloat16)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[m_slice, n_slice].at[:, wg_n])

        def rescale(part, sa_smem, sw_smem, j):
          if not scaled:
            return part.astype(jnp.float32)
          sa = plgpu.load(sa_smem.at[j], layout=plgpu.Layout.WGMMA.reduce(1))
          sw = plgpu.load(sw_smem.at[j, wg_n], layout=plgpu.Layout.WGMMA.reduce(0))
          scale = (lax.broadcast_in_dim(sa, (tile_m, tile_n), [0])
                   * lax.broadcast_in_dim(sw, (tile_m, tile_n), [1]))
          return part.astype(jnp.float32) * scale

        def body(_, a_smem, b_smem, sa_smem, sw_smem, total):
          def mma(*accs):
            for j, acc in enumerate(accs):
              cols = pl.ds(j * GROUP, GROUP)
              plgpu.wgmma(acc, a_smem.at[:, cols], b_smem.at[wg_n, cols].transpose((1, 0)))
            out = total
            for j, acc in enumerate(accs):
              plgpu.wgmma_wait(gps - 1 - j)
              out = out + rescale(acc[...], sa_smem, sw_smem, j)
            return out

          return pl.run_scoped(mma, *[plgpu.ACC((tile_m, tile_n), jnp.int32)] * gps)

        get_pipeline(body, context)(a_gmem.at[m_slice, :], b_gmem.at[n_slice, :],
                                    sa_gmem.at[:, m_slice], sw_gmem.at[:, n_slice],
                                    allocations=allocs)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  num_sms = jax.devices()[0].core_count
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((m, n), jnp.bfloat16), grid=(num_sms,),
      grid_names=("sm",), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup))(a, b, sa_t, sw_t)


def reference(a, b, sa_t, sw_t):
  g = a.shape[1] // GROUP
  part = jnp.einsum("mgk,ngk->gmn", a.reshape(a.shape[0], g, GROUP).astype(jnp.int32),
                    b.reshape(b.shape[0], g, GROUP).astype(jnp.int32))
  return jnp.einsum("gmn,gm,gn->mn", part.astype(jnp.float32), sa_t, sw_t)




def main():
  key = jax.random.key(0)
  ks = jax.random.split(key, 6)
  m, k = 4608, 3072
  # correctness at a small shape first
  ms, ns, kk = 256, 512, 512
  a = jax.random.randint(ks[0], (ms, kk), -8, 8, jnp.int8)
  b = jax.random.randint(ks[1], (ns, kk), -8, 8, jnp.int8)
  sa = jax.random.uniform(ks[2], (kk // GROUP, ms), minval=0.5, maxval=2.0)
  sw = jax.random.uniform(ks[3], (kk // GROUP, ns), minval=0.5, maxval=2.0)
  ref = reference(a, b, sa, sw)
  for gps in (1, 2):
    y = jax.jit(functools.partial(scaled_int8_matmul, gps=gps, tile_m=64))(a, b, sa, sw)
    rel = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    print(f"check {ms}x{kk}x{ns} groups/step={gps}: rel err {rel:.2e} "
          f"(bf16 output rounding ~2e-3)", flush=True)
  rows = []
  for n in (3072, 12288):
    a = jax.random.randint(ks[0], (m, k), -8, 8, jnp.int8)
    b = jax.random.randint(ks[1], (n, k), -8, 8, jnp.int8)
    sa = jax.random.uniform(ks[2], (k // GROUP, m), minval=0.5, maxval=2.0)
    sw = jax.random.uniform(ks[3], (k // GROUP, n), minval=0.5, maxval=2.0)
    x16 = jax.random.normal(ks[4], (m, k), jnp.bfloat16)
    w16 = jax.random.normal(ks[5], (k, n), jnp.bfloat16)
    t_bf16 = median_seconds(jax.jit(lambda p, q: p @ q), x16, w16)
    t_int8 = median_seconds(jax.jit(lambda p, q: lax.dot_general(
        p, q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)), a, b)
    rows.append((n, "xla bf16", t_bf16, ""))
    rows.append((n, "xla int8", t_int8, ""))
    for tile_m, tile_n, steps, gps in ((128, 64, 4, 2), (64, 256, 3, 1), (64, 256, 2, 2),
                                       (64, 192, 3, 1), (128, 64, 6, 1)):
      for scaled in (True, False):
        try:
          f = jax.jit(functools.partial(scaled_int8_matmul, tile_m=tile_m, tile_n=tile_n,
                                        steps=steps, scaled=scaled, gps=gps))
          t = median_seconds(f, a, b, sa, sw)
          rows.append((n, f"mosaic scaled={scaled} tile=({tile_m}, 2x{tile_n}) steps={steps}"
                       f" groups/step={gps}", t, f"{t_bf16 / t:.2f}x"))
          print(rows[-1], flush=True)
        except Exception as e:
          print(f"n={n} {tile_m},{tile_n},{steps},{scaled}: failed {type(e).__name__}: "
                f"{str(e)[:300]}", flush=True)
  print(f"\nM={m} K={k}, {jax.devices()[0].device_kind}")
  print("| N | variant | ms | vs XLA bf16 |\n| --- | --- | ---: | ---: |")
  for n, name, t, r in rows:
    print(f"| {n} | {name} | {t * 1e3:.3f} | {r} |")


if __name__ == "__main__":
  main()
