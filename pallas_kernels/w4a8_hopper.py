"""W4A8 GEMM with the int4_2l weights expanded in registers (Pallas, Mosaic GPU; transposed).

  Y^T[n, m] = (f32(sum_k (m q)[n, k] a[m, k]) * s_a[m]) * s_w[n] + up[n] . bf16(lr[m]) + bias[n]

The same arithmetic as ``int8_hopper.int8_gemm`` on ``act_rowscaled.expand_two_level``'s
weights, without the expanded copy: the packed codes are the register operand of wgmma. One
memory warpgroup streams, per K step of 128, the activation tile [CTA_M, 128] (int8), the
packed codes [2 x 64 rows, 64 bytes] and a multiplier byte per row into shared memory; each
of two compute warpgroups owns 64 weight rows, expands its codes to m * q in registers
(``int8_hopper._expand``) and issues wgmma(acc [64, CTA_M] int32, codes, activations^T). The
two take turns (a barrier between them), so that one expands while the other's MMA runs. The
epilogue scales, adds the low-rank up projection (one bf16 wgmma) and the bias, optionally the
GELU, and stores the tile transposed (bf16 only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from svdq_jax.pallas_kernels.int8_hopper import _expand, _gelu, check_shapes
from svdq_jax.pallas_kernels.w4a4_hopper import ROW_ALIGN, _swizzled, _wgmma_onto

ROWS = 64     # weight rows per compute warpgroup (one wgmma M group)
TILE_K = 128  # two packed 64-groups per step


@functools.partial(jax.jit, static_argnames=("tile_m", "steps", "pingpong", "gelu_from",
                                             "num_sms", "interpret"))
def w4a8_gemm_t(a, sa, codes, w_mult, sw, lr=None, up_t=None, bias=None, *, tile_m: int = 256,
                steps: int = 3, pingpong: bool = True, gelu_from: int | None = None,
                num_sms: int | None = None, interpret: bool = False):
  """bf16 [M, N] = (a . w^T) * s_a s_w + lr . up_t^T + bias, w = int4_2l's m * q.

  Args: a int8 [M, K], sa f32 [M]; codes uint8 [N, K/2] (``formats.pack``), w_mult uint8
    [K/128, N] (``formats.pack_multipliers(m).T``), sw f32 [N]; lr bf16 [M, r], up_t bf16
    [N, r] (r a multiple of 16) or both None; bias f32 [N] or None. tile_m: tokens per output
    tile (the wgmma's N, <= 256); steps: pipeline depth; pingpong: the two compute warpgroups
    alternate expansion and MMA. gelu_from: output columns from there through the GELU (a
    multiple of 128).
  """
  check_shapes(a, sa, codes, sw, lr, up_t, bias, w_mult)
  m_out, k = a.shape
  n = codes.shape[0]
  cta_n = 2 * ROWS
  if n % cta_n:
    raise ValueError(f"N={n} is not a multiple of {cta_n}")
  if gelu_from is not None and (gelu_from % cta_n or not 0 <= gelu_from < n):
    raise ValueError(f"gelu_from={gelu_from} must be a multiple of {cta_n} below N={n}")
  has_lr, has_bias = lr is not None, bias is not None
  rank = lr.shape[1] if has_lr else 0
  if rank % 16:
    raise ValueError(f"low-rank rank must be a multiple of 16, got {rank}")
  pad = -m_out % ROW_ALIGN
  if pad:
    a = jnp.pad(a, ((0, pad), (0, 0)))
    lr = None if lr is None else jnp.pad(lr, ((0, pad), (0, 0)))
  m = a.shape[0]
  m_iters, n_iters = pl.cdiv(m, tile_m), n // cta_n
  sa = jnp.pad(sa.astype(jnp.float32), (0, m_iters * tile_m - m_out))
  if num_sms is None:
    num_sms = m_iters * n_iters if interpret else jax.devices()[0].core_count
  k_iters = k // TILE_K
  steps = min(steps, k_iters)

  def kernel(a_gmem, codes_gmem, mult_gmem, sa_gmem, sw_gmem, *refs):
    it = iter(refs)
    lr_gmem, up_gmem = (next(it), next(it)) if has_lr else (None, None)
    bias_gmem = next(it) if has_bias else None
    (out_gmem, out_smem, sa_smem, sw_smem, lr_smem, up_smem, bias_smem, barriers, turn,
     *stage) = it

    def pipeline(body, context):
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(k_iters,), memory_registers=40,
          in_specs=[
              plgpu.BlockSpec((tile_m, TILE_K), lambda kk: (0, kk),
                              transforms=_swizzled(TILE_K, jnp.int8), memory_space=plgpu.SMEM),
              plgpu.BlockSpec((cta_n, TILE_K // 2), lambda kk: (0, kk),
                              transforms=_swizzled(TILE_K // 2, jnp.int8),
                              memory_space=plgpu.SMEM),
              plgpu.BlockSpec((1, cta_n), lambda kk: (kk, 0), memory_space=plgpu.SMEM)],
          wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=steps,
          compute_context=context)

    ignore = lambda *_, **__: None

    @functools.partial(pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(
        a_gmem, codes_gmem, mult_gmem), collective_axes="wg")
    def _scope(allocs):
      wg = lax.axis_index("wg")
      rows = pl.ds(wg * ROWS, ROWS)

      def take_turn(i=0):   # both compute warpgroups get here
        plgpu.barrier_arrive(turn.at[i])
        plgpu.barrier_wait(turn.at[i])

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
      def _tiles(info):
        (lin,) = info.index
        m_idx, n_idx = plgpu.planar_snake(lin, (m_iters, n_iters), 1, 8)
        m_slice = pl.ds(m_idx * tile_m, tile_m)
        n_slice = pl.ds(n_idx * cta_n, cta_n)

        def context(eval_pipeline):
          bar = lambda i: barriers.at[5 * wg + i]
          plgpu.copy_gmem_to_smem(sa_gmem.at[m_slice], sa_smem.at[wg], bar(0))
          plgpu.copy_gmem_to_smem(sw_gmem.at[n_slice].at[rows], sw_smem.at[wg], bar(1))
          if has_lr:  # lr [tile_m, r] is both warpgroups': the first loads it once the second
            take_turn(1)  # is done with the previous tile's
            pl.when(wg == 0)(lambda: plgpu.copy_gmem_to_smem(lr_gmem.at[m_slice], lr_smem,
                                                             barriers.at[2]))
            plgpu.copy_gmem_to_smem(up_gmem.at[n_slice].at[rows], up_smem.at[wg], bar(3))
          if has_bias:
            plgpu.copy_gmem_to_smem(bias_gmem.at[n_slice].at[rows], bias_smem.at[wg], bar(4))

          def accumulate(acc):
            eval_pipeline(acc)
            return acc[...]

          acc = pl.run_scoped(accumulate, plgpu.ACC((ROWS, tile_m), jnp.int32))
          plgpu.barrier_wait(bar(0))
          plgpu.barrier_wait(bar(1))
          s_a = plgpu.load(sa_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(0))
          s_w = plgpu.load(sw_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
          total = (acc.astype(jnp.float32) * lax.broadcast_in_dim(s_a, acc.shape, [1])
                   * lax.broadcast_in_dim(s_w, acc.shape, [0]))
          if has_lr:
            plgpu.barrier_wait(barriers.at[2])
            plgpu.barrier_wait(bar(3))
            total = _wgmma_onto(total, lambda acc_ref: plgpu.wgmma(
                acc_ref, up_smem.at[wg], lr_smem.transpose((1, 0))), interpret)
          if has_bias:
            plgpu.barrier_wait(bar(4))
            b = plgpu.load(bias_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            total = total + lax.broadcast_in_dim(b, total.shape, [0])

          def store(gelu):
            y = total.astype(jnp.bfloat16)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            out_smem.at[wg].transpose((1, 0))[...] = _gelu(y) if gelu else y
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[m_slice, n_slice].at[:, rows])

          if gelu_from is None:
            store(False)
          else:
            in_gelu = n_idx * cta_n >= gelu_from
            pl.when(in_gelu)(lambda: store(True))
            pl.when(jnp.logical_not(in_gelu))(lambda: store(False))

        def body(_, a_smem, codes_smem, mult_smem, acc):
          if pingpong:
            pl.when(wg == 0)(take_turn)
          w = _expand(codes_smem.at[rows], mult_smem.at[0, rows], interpret)
          if interpret:  # interpret mode takes wgmma operands from refs only
            stage[0][wg] = w
            w = stage[0].at[wg]
          if pingpong:
            take_turn()
          plgpu.wgmma(acc, w, a_smem.transpose((1, 0)))
          if pingpong:
            pl.when(wg == 1)(take_turn)
          plgpu.wgmma_wait(0)
          return acc

        pipeline(body, context)(a_gmem.at[m_slice], codes_gmem.at[n_slice],
                                mult_gmem.at[:, n_slice], allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel.__name__ = (f"w4a8_t_m{tile_m}s{steps}{'p' if pingpong else ''}"
                     f"{'' if gelu_from is None else 'gelu'}")
  args = [a, lax.bitcast_convert_type(codes, jnp.int8), w_mult, sa, sw.astype(jnp.float32)]
  if has_lr:
    args += [lr.astype(jnp.bfloat16), up_t.astype(jnp.bfloat16)]
  if has_bias:
    args.append(bias.astype(jnp.float32))
  lr_cols = rank if has_lr else 64
  lr_rows = lambda r: r if has_lr else 8
  y = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
      grid=(num_sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
      scratch_types=[
          plgpu.SMEM((2, tile_m, ROWS), jnp.bfloat16, transforms=_swizzled(ROWS, jnp.bfloat16)),
          plgpu.SMEM((2, tile_m), jnp.float32),
          plgpu.SMEM((2, ROWS), jnp.float32),
          plgpu.SMEM((lr_rows(tile_m), lr_cols), jnp.bfloat16,
                     transforms=_swizzled(lr_cols, jnp.bfloat16)),
          plgpu.SMEM((2, lr_rows(ROWS), lr_cols), jnp.bfloat16,
                     transforms=_swizzled(lr_cols, jnp.bfloat16)),
          plgpu.SMEM((2, ROWS), jnp.float32),
          plgpu.Barrier(num_barriers=10),
          plgpu.Barrier(num_arrivals=2, num_barriers=2),
      ] + ([plgpu.SMEM((2, ROWS, TILE_K), jnp.int8, transforms=_swizzled(TILE_K, jnp.int8))]
           if interpret else []),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
          approx_math=gelu_from is not None),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*args)
  return y[:m_out]
