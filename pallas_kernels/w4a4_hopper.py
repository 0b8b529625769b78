"""W4A4 GEMM on Hopper's int8 tensor cores (Pallas, Mosaic GPU backend: wgmma, TMA).

Y[m, n] = sum_g s_a[m, g] s_w[n, g] (q_a[m, g, :] . q_w[n, g, :])
          + bf16(lr[m]) . up[:, n] + bias[n]

over 64-groups g, with the 4-bit values exact in int8. The tensor cores see the transposed
problem, Y^T = W A^T, so that the packed weights can be the register operand of wgmma:

  one memory warpgroup streams, per pipeline step of ``groups_per_step`` 64-groups, the
  activation codes (int8 [TM, 64 g]), the packed weights (uint8 [2 TN, 32 g]) and both
  scale rows into shared memory (TMA, several steps deep);
  two compute warpgroups, each owning TN weight rows, per pair of groups:
      w = packed weights -> registers;  lo = w << 4,  hi = w & 0xF0  (int8: 16 x nibble)
      part_j = [lo | hi]_j . A_j^T            (wgmma s8 -> s32, both groups issued at once)
      total += f32(part_j) * (s_w[n, j] / 16) * s_a[m, j]   (the /16 is exact; group 0's
                                                            rescale overlaps group 1's MMA)
  epilogue: total += up^T . bf16(lr)^T (one bf16 wgmma) + bias; stored transposed to Y.

Measured on the H100 (docs/benchmarks/): starting the s32 accumulator at the bits of
1.5 * 2**23 so that int -> float is a bit cast and one exact subtraction was no faster than
``cvt``, so the plain conversion stays.

Ragged M is handled by the TMA unit (out-of-bounds reads give zeros, out-of-bounds writes are
dropped) down to a multiple of 8 rows; other M are padded to one (a copy of the activations).
K must be a multiple of 64 and N of 2 * tile_n.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from svdq_jax import formats

GROUP = 64
HALF = GROUP // 2
ROW_ALIGN = 8                    # rows of a TMA tile


def _unpack16(w: jax.Array, interpret: bool) -> jax.Array:
  """int8 [R, 32] packed nibbles -> int8 [R, 64]: 16 x (low nibbles | high nibbles), exact.

  The high nibble already sits in the high bits (``w & 0xF0``), the low one moves there with
  a 4-bit left shift; the factor 16 is divided out of the weight scales. Mosaic GPU has no
  8-bit shifts, so on the GPU both run on each thread's 32-bit registers of 4 packed bytes,
  and the two halves are joined along K in the wgmma register layout (a 16-column tile axis).
  """
  if interpret:
    return jnp.concatenate([lax.shift_left(w, jnp.int8(4)),
                            lax.bitwise_and(w, jnp.int8(-16))], axis=1)
  layout = plgpu.Layout.WGMMA_8BIT
  rows, half = w.shape

  @plgpu.inline_mgpu(arg_types=(layout,), return_type=plgpu.ShapeDtypeStruct(
      (rows, 2 * half), jnp.int8, layout=layout))
  def unpack(_, frag):
    i32 = ir.IntegerType.get_signless(32)
    high_bits = mgpu.c(0xF0F0F0F0 - 2**32, i32)
    lo, hi = np.empty_like(frag.registers), np.empty_like(frag.registers)
    for idx, reg in np.ndenumerate(frag.registers):
      word = mgpu.utils.bitcast(reg, i32)
      lo[idx] = mgpu.utils.bitcast(arith.andi(arith.shli(word, mgpu.c(4, i32)), high_bits),
                                   reg.type)
      hi[idx] = mgpu.utils.bitcast(arith.andi(word, high_bits), reg.type)
    # axis 1 of the register array runs over 16-column tiles
    return mgpu.FragmentedArray(_registers=np.concatenate([lo, hi], axis=1),
                                _layout=frag.layout, _is_signed=True)

  return unpack(w)


def _wgmma_onto(init: jax.Array, issue, interpret: bool) -> jax.Array:
  """``init`` + the products that ``issue(acc_ref)`` queues with wgmma (awaited)."""
  if interpret:  # GPU interpret mode has no pl.run_state; wgmma adds, so add init after
    def run(acc):
      issue(acc)
      plgpu.wgmma_wait(0)
      return acc[...]
    return init + pl.run_scoped(run, plgpu.ACC(init.shape, init.dtype))
  return pl.run_state(issue)(plgpu.ACC.init(init))


def _swizzled(cols: int, dtype) -> tuple:
  """Shared-memory transforms for tiles whose rows are ``cols`` elements of ``dtype``."""
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(cols * bits)
  return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def check_shapes(a_q, a_scale_t, w_packed, w_scale_t, tile_n: int) -> None:
  m, k = a_q.shape
  n = w_packed.shape[0]
  if k % GROUP:
    raise ValueError(f"W4A4 kernels need K to be a multiple of {GROUP}, got K={k}")
  if w_packed.shape != (n, k // 2):
    raise ValueError(f"packed weights {w_packed.shape} do not match activations [M, K]="
                     f"{a_q.shape}: expected [N, K/2]")
  if a_scale_t.shape != (k // GROUP, m) or w_scale_t.shape != (k // GROUP, n):
    raise ValueError(f"scales must be [K/64, M] and [K/64, N], got {a_scale_t.shape} and "
                     f"{w_scale_t.shape}")
  if n % (2 * tile_n):
    raise ValueError(f"N={n} is not a multiple of {2 * tile_n} (2 warpgroups x tile_n)")


@functools.partial(jax.jit, static_argnames=("tile_m", "tile_n", "steps", "groups_per_step",
                                              "num_sms", "interpret"))
def w4a4_gemm_t(a_q, a_scale_t, w_packed, w_scale_t, lr=None, up_t=None, bias=None, *,
                tile_m: int = 128, tile_n: int = 64, steps: int = 4, groups_per_step: int = 2,
                num_sms: int | None = None, interpret: bool = False):
  """The W4A4 GEMM with Hopper-native operand layouts.

  Args:
    a_q: int8 [M, K] activation codes (INT4 [-8, 7] or UINT4 [0, 15] values).
    a_scale_t: f32 [K/64, M] activation group scales.
    w_packed: uint8 [N, K/2] INT4 weights, packed as in ``formats.pack``.
    w_scale_t: f32 [K/64, N] weight group scales (bf16 values: the exact rescale needs at
      most 22 significant bits).
    lr: bf16 [M, r] low-rank activations or None; up_t: bf16 [N, r] (``L_up`` transposed),
      r a multiple of 16; bias: f32 [N] or None.
    tile_m: tokens per output tile; tile_n: weight rows per compute warpgroup; steps:
      pipeline depth; groups_per_step: 64-groups per pipeline step (reduced to a divisor
      of K/64).

  Returns:
    bf16 [M, N].
  """
  check_shapes(a_q, a_scale_t, w_packed, w_scale_t, tile_n)
  if a_q.shape[0] % ROW_ALIGN:  # TMA tiles need 8-row multiples; a tile's tail rows are
    pad = -a_q.shape[0] % ROW_ALIGN  # masked by the TMA unit, only this remainder is copied
    y = w4a4_gemm_t(jnp.pad(a_q, ((0, pad), (0, 0))), jnp.pad(a_scale_t, ((0, 0), (0, pad))),
                    w_packed, w_scale_t, None if lr is None else jnp.pad(lr, ((0, pad), (0, 0))),
                    up_t, bias, tile_m=tile_m, tile_n=tile_n, steps=steps,
                    groups_per_step=groups_per_step, num_sms=num_sms, interpret=interpret)
    return y[:a_q.shape[0]]
  m, k = a_q.shape
  n = w_packed.shape[0]
  has_lr, has_bias = lr is not None, bias is not None
  rank = lr.shape[1] if has_lr else 0
  if has_lr and (rank % 16 or up_t.shape != (n, rank)):
    raise ValueError(f"low-rank branch needs lr [M, r] and up_t [N, r] with r a multiple of "
                     f"16, got {lr.shape} and {None if up_t is None else up_t.shape}")
  cta_n = 2 * tile_n
  gps = math.gcd(groups_per_step, k // GROUP)
  steps = min(steps, k // GROUP // gps)  # a pipeline deeper than the K loop deadlocks
  m_iters, n_iters = pl.cdiv(m, tile_m), n // cta_n
  if interpret:  # GPU interpret mode hangs when a program loops over several tiles
    num_sms = m_iters * n_iters
  elif num_sms is None:  # a persistent grid: one program per SM, looping over output tiles
    num_sms = jax.devices()[0].core_count
  w_packed = lax.bitcast_convert_type(w_packed, jnp.int8)
  w_scale_t = w_scale_t.astype(jnp.float32) / 16  # the MMA sees 16 x the nibbles; exact

  def kernel(a_gmem, sa_gmem, w_gmem, sw_gmem, *refs):
    it = iter(refs)
    lr_gmem, up_gmem = (next(it), next(it)) if has_lr else (None, None)
    bias_gmem = next(it) if has_bias else None
    out_gmem, out_smem, lr_smem, up_smem, bias_smem, barriers, *w16_smem = it
    w16_smem = w16_smem[0] if interpret else None

    def pipeline(body, context):
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(k // GROUP // gps,), memory_registers=40,
          in_specs=[
              plgpu.BlockSpec((tile_m, gps * GROUP), lambda g: (0, g),
                              transforms=_swizzled(GROUP, jnp.int8), memory_space=plgpu.SMEM),
              plgpu.BlockSpec((cta_n, gps * HALF), lambda g: (0, g),
                              transforms=_swizzled(HALF, jnp.int8), memory_space=plgpu.SMEM),
              plgpu.BlockSpec((gps, tile_m), lambda g: (g, 0), memory_space=plgpu.SMEM),
              plgpu.BlockSpec((gps, cta_n), lambda g: (g, 0), memory_space=plgpu.SMEM),
          ],
          wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=steps,
          compute_context=context)

    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(a_gmem, w_gmem, sa_gmem, sw_gmem),
        collective_axes="wg")
    def _scope(allocs):
      wg = lax.axis_index("wg")
      rows = pl.ds(wg * tile_n, tile_n)

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
      def _tiles(info):
        (lin,) = info.index
        m_idx, n_idx = lin // n_iters, lin % n_iters
        m_slice = pl.ds(m_idx * tile_m, tile_m)
        n_slice = pl.ds(n_idx * cta_n, cta_n)
        def context(eval_pipeline):  # runs on the compute warpgroups only
          if has_lr:  # the epilogue's operands arrive while the K loop runs
            plgpu.copy_gmem_to_smem(lr_gmem.at[m_slice], lr_smem.at[wg], barriers.at[3 * wg])
            plgpu.copy_gmem_to_smem(up_gmem.at[n_slice].at[rows], up_smem.at[wg],
                                    barriers.at[3 * wg + 1])
          if has_bias:
            plgpu.copy_gmem_to_smem(bias_gmem.at[n_slice].at[rows], bias_smem.at[wg],
                                    barriers.at[3 * wg + 2])
          zero = plgpu.layout_cast(jnp.zeros((tile_n, tile_m), jnp.float32),
                                   plgpu.Layout.WGMMA)
          total = eval_pipeline(zero)
          if has_lr:
            plgpu.barrier_wait(barriers.at[3 * wg])
            plgpu.barrier_wait(barriers.at[3 * wg + 1])

            total = _wgmma_onto(total, lambda acc: plgpu.wgmma(
                acc, up_smem.at[wg], lr_smem.at[wg].transpose((1, 0))), interpret)
          if has_bias:
            plgpu.barrier_wait(barriers.at[3 * wg + 2])
            b = plgpu.load(bias_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            total = total + lax.broadcast_in_dim(b, total.shape, [0])
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          out_smem.at[wg].transpose((1, 0))[...] = total.astype(jnp.bfloat16)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[m_slice, n_slice].at[:, rows])

        def body(_, a_smem, w_smem, sa_smem, sw_smem, total):
          """One pipeline step: ``gps`` 64-groups, wgmma'd in pairs so that the first
          group's rescale overlaps the second group's MMAs."""
          def rescaled(j, part):
            sw = plgpu.load(sw_smem.at[j, rows], layout=plgpu.Layout.WGMMA.reduce(1))
            sa = plgpu.load(sa_smem.at[j], layout=plgpu.Layout.WGMMA.reduce(0))
            return (part.astype(jnp.float32) * lax.broadcast_in_dim(sw, part.shape, [0])
                    * lax.broadcast_in_dim(sa, part.shape, [1]))

          def pair(groups, total):
            w16 = [_unpack16(plgpu.load(w_smem.at[rows, pl.ds(j * HALF, HALF)],
                                        layout=plgpu.Layout.WGMMA_8BIT), interpret)
                   for j in groups]

            def run(*accs):
              for i, (j, acc) in enumerate(zip(groups, accs)):
                a_t = a_smem.at[:, pl.ds(j * GROUP, GROUP)].transpose((1, 0))
                if interpret:  # interpret mode takes wgmma operands from refs only
                  w16_smem[wg, i] = w16[i]
                  plgpu.wgmma(acc, w16_smem.at[wg, i], a_t)
                else:
                  plgpu.wgmma(acc, w16[i], a_t)
              out = total
              for i, (j, acc) in enumerate(zip(groups, accs)):
                plgpu.wgmma_wait(len(groups) - 1 - i)
                out = out + rescaled(j, acc[...])
              return out

            return pl.run_scoped(run, *[plgpu.ACC(total.shape, jnp.int32)] * len(groups))

          for start in range(0, gps, 2):
            total = pair(range(start, min(start + 2, gps)), total)
          return total

        pipeline(body, context)(a_gmem.at[m_slice], w_gmem.at[n_slice],
                                sa_gmem.at[:, m_slice], sw_gmem.at[:, n_slice],
                                allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  args = [a_q, a_scale_t, w_packed, w_scale_t]
  if has_lr:
    args += [lr, up_t]
  if has_bias:
    args.append(bias)
  lr_rows = tile_m if has_lr else 8
  lr_cols = rank if has_lr else 64
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((m, n), jnp.bfloat16), grid=(num_sms,),
      grid_names=("sm",), num_threads=3, thread_name="wg",
      scratch_types=[
          plgpu.SMEM((2, tile_m, tile_n), jnp.bfloat16,
                     transforms=_swizzled(tile_n, jnp.bfloat16)),
          plgpu.SMEM((2, lr_rows, lr_cols), jnp.bfloat16,
                     transforms=_swizzled(lr_cols, jnp.bfloat16)),
          plgpu.SMEM((2, tile_n if has_lr else 8, lr_cols), jnp.bfloat16,
                     transforms=_swizzled(lr_cols, jnp.bfloat16)),
          plgpu.SMEM((2, tile_n), jnp.float32),
          plgpu.Barrier(num_barriers=6),
      ] + ([plgpu.SMEM((2, 2, tile_n, GROUP), jnp.int8)] if interpret else []),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      )(*args)


def reference(a_q, a_scale_t, w_packed, w_scale_t, lr=None, up_t=None, bias=None):
  """jnp semantics of ``w4a4_gemm_t`` (f32 result, before the bf16 output rounding)."""
  m, k = a_q.shape
  w = formats.unpack(w_packed, "int4")
  g = k // GROUP
  part = jnp.einsum("mgk,ngk->gmn", a_q.reshape(m, g, GROUP).astype(jnp.int32),
                    w.reshape(-1, g, GROUP).astype(jnp.int32))
  y = jnp.einsum("gmn,gm,gn->mn", part.astype(jnp.float32), a_scale_t, w_scale_t,
                 precision=lax.Precision.HIGHEST)
  if lr is not None:
    y = y + jnp.dot(lr.astype(jnp.bfloat16), up_t.astype(jnp.bfloat16).T,
                    preferred_element_type=jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y


def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.x)."""
  device = jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")) \
      .startswith("9")


def supports(m: int, k: int, n: int, tile_n: int = 64) -> bool:
  """Whether ``w4a4_gemm_t`` takes this problem (else use the Triton GEMM)."""
  del m
  return k % GROUP == 0 and n % (2 * tile_n) == 0


def gemm_packed(a_packed, a_scale, w_packed, w_scale, lr=None, up=None, bias=None, *,
                act_format: str = "int4", out_dtype=jnp.bfloat16, interpret: bool = False):
  """``w4a4.w4a4_gemm``'s contract (packed activations, [M, K/64] scales, ``L_up`` [r, N])
  on the Hopper kernel: the activation codes are unpacked to int8 and the small operands
  transposed by XLA around the call."""
  a_q = formats.unpack(a_packed, act_format)
  if lr is not None:
    pad = -lr.shape[1] % 16  # wgmma takes K in steps of 16
    lr = jnp.pad(lr.astype(jnp.bfloat16), ((0, 0), (0, pad)))
    up = jnp.pad(up.astype(jnp.bfloat16).T, ((0, 0), (0, pad)))
  y = w4a4_gemm_t(a_q, a_scale.T, w_packed, w_scale.astype(jnp.float32).T, lr, up,
                  None if bias is None else bias.astype(jnp.float32), interpret=interpret)
  return y.astype(out_dtype)
