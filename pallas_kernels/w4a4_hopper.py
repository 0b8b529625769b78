"""W4A4 GEMM on Hopper's int8 tensor cores (Pallas, Mosaic GPU backend: wgmma, TMA).

Y[m, n] = sum_g s_a[m, g] s_w[n, g] (q_a[m, g, :] . q_w[n, g, :])
          + bf16(lr[m]) . up[:, n] + bias[n]

over 64-groups g, with the 4-bit values exact in int8. The tensor cores see the transposed
problem, Y^T = W A^T, so that the packed weights can be the register operand of wgmma:

  one memory warpgroup streams, per pipeline step of ``groups_per_step`` 64-groups, the
  activation codes (int8 [TM, 64 g]), the packed weights (uint8 [W TN, 32 g]) and both
  scale rows into shared memory (TMA, several steps deep);
  W compute warpgroups, each owning TN weight rows, per group j, ``accs`` accumulators
  taking turns (group j's rescale runs while group j + 1's MMAs are in flight):
      w = packed weights -> registers;  lo = w << 4,  hi = w & 0xF0  (int8: 16 x nibble)
      part_j = [lo | hi]_j . A_j^T                               (wgmma s8 -> s32)
      total += f32(part_j) * (s_w[n, j] / 16) * s_a[m, j]        (the /16 is exact)
  epilogue: total += up^T . bf16(lr)^T (one bf16 wgmma) + bias; stored transposed to Y.

mma='e4m3' runs the same integers exactly on the fp8 tensor cores instead (f32 partials, no
conversion; see ``_unpack_weights`` and ``w4a4_gemm_t``). Measured on the H100
(docs/benchmarks/2026-11-23-w4a4-hopper-variants-h100.md) it is exact but no faster than
s8 (0.58-0.65x vs 0.63-0.68x of XLA bf16), nor was an s32 accumulator started at the bits of
1.5 * 2**23 (int -> float as a bit cast and one subtraction; 0.57-0.61x). Without any
rescale the same pipeline reaches 1.01-1.09x: the rescale costs a third of the time.

What bounds it (ncu, 2026-11-23, docs/benchmarks/README.md): instruction issue. At the
library tiling (3 compute warpgroups x 64 x 64) one output element and 64-group (64 int8 MACs)
costs ~5.2 warp-instructions per 32 elements: one FMUL (s_a s_w), one FFMA (into the total),
one int -> float conversion, and ~2.2 of loads, broadcasts and moves around them; 69% of issue
slots are used. At the int8 tensor rate even 3 instructions would need 1.5x the SM's issue
rate. Starting each group's MMA with wgmma's scale-d = 0 (no zeroed accumulator; tried in
commit e506fc9 with an own wgmma emitter) changed neither the instruction count nor the time:
the zeroing was not costing instructions.

Ragged M is handled by the TMA unit (out-of-bounds reads give zeros, out-of-bounds writes are
dropped) down to a multiple of 8 rows; other M are padded to one (a copy of the activations).
K must be a multiple of 64 and N of W * tile_n.
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

GROUP = formats.PACK_BLOCK       # 64: one INT4 group = one packing block
HALF = GROUP // 2
ROW_ALIGN = 8                    # rows of a TMA tile
MMA_TYPES = ("s8", "e4m3")
RESCALES = ("convert", "unscaled")


def _unpack_weights(w: jax.Array, mma: str, interpret: bool) -> jax.Array:
  """int8 [R, 32] packed INT4 nibbles -> [R, 64] MMA operand (low nibbles | high nibbles).

  mma='s8': int8 16 x n, exact. The high nibble already sits in the high bits (``w & 0xF0``),
  the low one moves there with a 4-bit left shift; the 16 is divided out of the weight scales.
  mma='e4m3': float8_e4m3fn bytes n + 8 (offset binary: the nibble with its top bit flipped),
  whose e4m3 value is (n + 8) * 2**-9 exactly (bytes 0..15 are the subnormals and the first
  binade, evenly spaced); the 2**-9 goes into the weight scales and the offset 8 into a
  per-token correction (``w4a4_gemm_t``).

  Mosaic GPU has no 8-bit shifts, so on the GPU both run on each thread's 32-bit registers
  of 4 packed bytes, and the two halves are joined along K in the wgmma register layout
  (a 16-column tile axis).
  """
  dtype = jnp.int8 if mma == "s8" else jnp.float8_e4m3fn
  if interpret:
    u = lax.bitcast_convert_type(w, jnp.uint8)
    if mma == "s8":
      lo, hi = u << 4, u & 0xF0
    else:
      lo, hi = (u & 0xF) ^ 8, (u >> 4) ^ 8
    return lax.bitcast_convert_type(jnp.concatenate([lo, hi], axis=1), dtype)
  layout = plgpu.Layout.WGMMA_8BIT
  rows, half = w.shape
  i32 = lambda v: v - 2**32 if v >= 2**31 else v

  @plgpu.inline_mgpu(arg_types=(layout,), return_type=plgpu.ShapeDtypeStruct(
      (rows, 2 * half), dtype, layout=layout))
  def unpack(_, frag):
    t32 = ir.IntegerType.get_signless(32)
    const = lambda v: mgpu.c(i32(v), t32)
    lo, hi = np.empty_like(frag.registers), np.empty_like(frag.registers)
    for idx, reg in np.ndenumerate(frag.registers):
      word = mgpu.utils.bitcast(reg, t32)
      if mma == "s8":
        lo_w = arith.andi(arith.shli(word, const(4)), const(0xF0F0F0F0))
        hi_w = arith.andi(word, const(0xF0F0F0F0))
        out_t = reg.type
      else:
        lo_w = arith.xori(arith.andi(word, const(0x0F0F0F0F)), const(0x08080808))
        hi_w = arith.xori(arith.andi(arith.shrui(word, const(4)), const(0x0F0F0F0F)),
                          const(0x08080808))
        out_t = ir.VectorType.get(ir.VectorType(reg.type).shape, ir.Float8E4M3FNType.get())
      lo[idx] = mgpu.utils.bitcast(lo_w, out_t)
      hi[idx] = mgpu.utils.bitcast(hi_w, out_t)
    # axis 1 of the register array runs over 16-column tiles
    return mgpu.FragmentedArray(_registers=np.concatenate([lo, hi], axis=1),
                                _layout=frag.layout, _is_signed=True if mma == "s8" else None)

  return unpack(w)


def _wgmma_zeros(shape, dtype) -> jax.Array:
  """A zero tile in the wgmma accumulator layout."""
  return plgpu.layout_cast(jnp.zeros(shape, dtype), plgpu.Layout.WGMMA)


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


def settles_when_interpreted(kernel):
  """``kernel`` (a jitted Mosaic GPU kernel taking ``interpret=``) that, interpreted and called
  outside a trace, returns only once its outputs are ready.

  The Mosaic GPU interpreter runs a kernel's warpgroups on host threads whose callbacks
  dispatch jax ops of their own; jax work dispatched meanwhile (the next eager op of a test or
  a layer) can leave those callbacks waiting for each other: the whole suite hung at one
  layer's eager ops behind an unfinished GEMM (2026-12-06, twice in three runs, at the same
  test, in CI and here). Waiting here leaves nothing else in flight while a kernel is
  interpreted; on a GPU, and under jit, nothing changes.
  """
  @functools.wraps(kernel)
  def call(*args, **kwargs):
    out = kernel(*args, **kwargs)
    if kwargs.get("interpret") and not any(isinstance(leaf, jax.core.Tracer)
                                           for leaf in jax.tree.leaves(out)):
      jax.block_until_ready(out)
    return out
  return call


def check_shapes(a_q, a_scale_t, w_packed, w_scale_t, cta_n: int) -> None:
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
  if n % cta_n:
    raise ValueError(f"N={n} is not a multiple of {cta_n} (compute warpgroups x tile_n)")


@settles_when_interpreted
@functools.partial(jax.jit, static_argnames=("tile_m", "tile_n", "steps", "groups_per_step",
                                              "accs", "compute_wgs", "mma", "rescale",
                                              "out_dtype", "num_sms", "interpret"))
def w4a4_gemm_t(a_q, a_scale_t, w_packed, w_scale_t, lr=None, up_t=None, bias=None,
                a_group_sum_t=None, *,
                tile_m: int = 128, tile_n: int = 64, steps: int = 4, groups_per_step: int = 2,
                accs: int = 2, compute_wgs: int = 2, mma: str = "s8", rescale: str = "convert",
                out_dtype=jnp.bfloat16, num_sms: int | None = None, interpret: bool = False):
  """The W4A4 GEMM with Hopper-native operand layouts.

  Args:
    a_q: [M, K] activation codes (INT4 [-8, 7] or UINT4 [0, 15] values), int8, or for
      mma='e4m3' int8 or float8_e4m3fn (the same values, converted once upstream).
    a_scale_t: f32 [K/64, M] activation group scales.
    w_packed: uint8 [N, K/2] INT4 weights, packed as in ``formats.pack``.
    w_scale_t: f32 [K/64, N] weight group scales.
    lr: bf16 [M, r] low-rank activations or None; up_t: bf16 [N, r] (``L_up`` transposed),
      r a multiple of 16; bias: f32 [N] or None.
    tile_m: tokens per output tile; tile_n: weight rows per compute warpgroup; steps:
      pipeline depth; groups_per_step: 64-groups per pipeline step (reduced to a divisor
      of K/64); accs: accumulators in rotation per compute warpgroup (up to accs - 1
      groups' MMAs run while one group is rescaled); compute_wgs: compute warpgroups, each
      owning tile_n weight rows of the output tile.
    mma: 's8' (int8 MMA, int32 partials) or 'e4m3' (fp8 MMA, f32 partials: no int -> float
      conversion; the weights enter offset by +8 and sum(a) over the group corrects it).
    rescale: for mma='s8': 'convert' (int32 partials -> f32, times both scales, added to
      the total), or 'unscaled', which adds the raw bits of the partials: a timing-only
      diagnostic of the rescale's cost (wrong results).
    a_group_sum_t: for mma='e4m3', f32 [K/64, M] sums of each group's activation codes
      (computed here from a_q if None).
    out_dtype: bf16 or f32.
    num_sms: programs of the persistent grid (default: the GPU's SMs; in interpret mode one
      per output tile).
    interpret: run in Pallas' GPU interpret mode (CPU). Each warpgroup becomes a host thread
      whose callbacks wait in XLA's CPU thread pool: with fewer pool threads than
      compute_wgs + 1 it deadlocks; set PJRT_NPROC (e.g. 8) before jax starts.

  Returns:
    [M, N] in out_dtype.
  """
  check_shapes(a_q, a_scale_t, w_packed, w_scale_t, compute_wgs * tile_n)
  if accs < 1 or compute_wgs not in (1, 2, 3):
    raise ValueError(f"accs must be >= 1 and compute_wgs 1, 2 or 3 (registers), got {accs} "
                     f"and {compute_wgs}")
  if mma not in MMA_TYPES or rescale not in RESCALES:
    raise ValueError(f"mma must be one of {MMA_TYPES} and rescale one of {RESCALES}, got "
                     f"{mma!r} and {rescale!r}")
  n = w_packed.shape[0]
  has_lr, has_bias = lr is not None, bias is not None
  rank = lr.shape[1] if has_lr else 0
  if has_lr and (rank % 16 or up_t.shape != (n, rank)):
    raise ValueError(f"low-rank branch needs lr [M, r] and up_t [N, r] with r a multiple of "
                     f"16, got {lr.shape} and {None if up_t is None else up_t.shape}")
  out_dtype = jnp.dtype(out_dtype)
  if out_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
    raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
  # TMA tiles need 8-row multiples (32 for the f32 Y^T store, tokens being its minor
  # dimension); a tile's tail rows are masked by the TMA unit, only this remainder is copied
  m_out = a_q.shape[0]
  pad = -m_out % (32 if out_dtype == jnp.float32 else ROW_ALIGN)
  if pad:
    pad_rows = lambda v, axis: None if v is None else jnp.pad(
        v, [(0, pad) if i == axis else (0, 0) for i in range(v.ndim)])
    a_q, lr = pad_rows(a_q, 0), pad_rows(lr, 0)
    a_scale_t, a_group_sum_t = pad_rows(a_scale_t, 1), pad_rows(a_group_sum_t, 1)
  m, k = a_q.shape
  cta_n = compute_wgs * tile_n
  gps = math.gcd(groups_per_step, k // GROUP)
  # GPU interpret mode cannot store into a wgmma accumulator (jax 0.11.2), so there every
  # group of a step gets its own accumulator instead of reusing one in rotation
  n_acc = gps if interpret else min(accs, gps)
  steps = min(steps, k // GROUP // gps)  # a pipeline deeper than the K loop deadlocks
  m_iters, n_iters = pl.cdiv(m, tile_m), n // cta_n
  if num_sms is None:  # a persistent grid: one program per SM, looping over output tiles
    num_sms = m_iters * n_iters if interpret else sm_count()
  w_packed = lax.bitcast_convert_type(w_packed, jnp.int8)
  scale_ins = [a_scale_t]
  if mma == "s8":
    w_scale_t = w_scale_t.astype(jnp.float32) / 16  # the MMA sees 16 x the nibbles; exact
    acc_dtype = jnp.int32
  else:
    # sum_k a (n + 8) 2**-9 = 2**-9 (a . n) + 2**-6 sum(a): per (token, group), the
    # correction -2**-6 s_a sum(a) turns s_a (the MMA's f32) into 2**-9 s_a (a . n)
    if a_group_sum_t is None:
      a_group_sum_t = group_sums_t(a_q)
    scale_ins.append(-a_scale_t * a_group_sum_t * 2.0 ** -6)
    a_q = a_q.astype(jnp.float8_e4m3fn)
    w_scale_t = w_scale_t.astype(jnp.float32) * 2.0 ** 9  # exact
    acc_dtype = jnp.float32

  def kernel(a_gmem, w_gmem, sw_gmem, *refs):
    it = iter(refs)
    sa_gmems = [next(it) for _ in scale_ins]
    lr_gmem, up_gmem = (next(it), next(it)) if has_lr else (None, None)
    bias_gmem = next(it) if has_bias else None
    out_gmem, out_smem, lr_smem, up_smem, bias_smem, barriers, *w16_smem = it
    w16_smem = w16_smem[0] if interpret else None

    def pipeline(body, context):
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(k // GROUP // gps,), memory_registers=40,
          in_specs=[
              plgpu.BlockSpec((tile_m, gps * GROUP), lambda g: (0, g),
                              transforms=_swizzled(GROUP, a_q.dtype), memory_space=plgpu.SMEM),
              plgpu.BlockSpec((cta_n, gps * HALF), lambda g: (0, g),
                              transforms=_swizzled(HALF, jnp.int8), memory_space=plgpu.SMEM),
              plgpu.BlockSpec((gps, cta_n), lambda g: (g, 0), memory_space=plgpu.SMEM),
          ] + [plgpu.BlockSpec((gps, tile_m), lambda g: (g, 0), memory_space=plgpu.SMEM)
               for _ in scale_ins],
          wg_axis="wg", num_compute_wgs=compute_wgs, max_concurrent_steps=steps,
          compute_context=context)

    ignore = lambda *_, **__: None
    gmems = (a_gmem, w_gmem, sw_gmem, *sa_gmems)

    @functools.partial(
        pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(*gmems),
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
          total = eval_pipeline(_wgmma_zeros((tile_n, tile_m), jnp.float32))
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
          if transposed_out:
            out_smem[wg] = total
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[n_slice, m_slice].at[rows])
          else:
            out_smem.at[wg].transpose((1, 0))[...] = total.astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg],
                                    out_gmem.at[m_slice, n_slice].at[:, rows])

        def body(_, a_smem, w_smem, sw_smem, *rest):
          """One pipeline step of ``gps`` 64-groups. ``n_acc`` accumulators take turns:
          group j is rescaled while the MMAs of groups j + 1 .. j + n_acc - 1 run."""
          *sa_smems, total = rest

          def row(ref, j, axis):  # a scale row, broadcast over the [tile_n, tile_m] tile
            v = plgpu.load(ref.at[j, rows] if axis == 0 else ref.at[j],
                           layout=plgpu.Layout.WGMMA.reduce(1 - axis))
            return lax.broadcast_in_dim(v, total.shape, [axis])

          def rescaled(j, part):
            sw, sa = row(sw_smem, j, 0), row(sa_smems[0], j, 1)
            if mma == "e4m3":
              return (part * sa + row(sa_smems[1], j, 1)) * sw
            if rescale == "unscaled":
              return lax.bitcast_convert_type(part, jnp.float32)
            return part.astype(jnp.float32) * sw * sa

          def issue(j, acc):
            w = _unpack_weights(plgpu.load(w_smem.at[rows, pl.ds(j * HALF, HALF)],
                                           layout=plgpu.Layout.WGMMA_8BIT), mma, interpret)
            a_t = a_smem.at[:, pl.ds(j * GROUP, GROUP)].transpose((1, 0))
            if interpret:  # interpret mode takes wgmma operands from refs only
              w16_smem[wg, j % n_acc] = w
              w = w16_smem.at[wg, j % n_acc]
            plgpu.wgmma(acc, w, a_t)

          def run(*acc_refs):
            out = total
            for j in range(n_acc):
              issue(j, acc_refs[j])
            for j in range(gps):
              acc = acc_refs[j % n_acc]
              in_flight = min(j + n_acc, gps) - j - 1  # groups issued after j
              out = out + rescaled(j, plgpu.wgmma_accumulator_load(acc, wait_n=in_flight))
              if j + n_acc < gps:
                acc[...] = _wgmma_zeros(total.shape, acc_dtype)
                issue(j + n_acc, acc)
            return out

          return pl.run_scoped(run, *[plgpu.ACC(total.shape, acc_dtype)] * n_acc)

        pipeline(body, context)(a_gmem.at[m_slice], w_gmem.at[n_slice],
                                sw_gmem.at[:, n_slice],
                                *[g.at[:, m_slice] for g in sa_gmems], allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  # the name shows up in profiles and in MOSAIC_GPU_DUMP_* files
  kernel.__name__ = (f"w4a4_{mma}_{rescale}_m{tile_m}n{tile_n}w{compute_wgs}a{n_acc}g{gps}"
                     f"s{steps}")
  args = [a_q, w_packed, w_scale_t, *scale_ins]
  if has_lr:
    args += [lr, up_t]
  if has_bias:
    args.append(bias)
  lr_rows = tile_m if has_lr else 8
  lr_cols = rank if has_lr else 64
  # Mosaic GPU stores 16-bit WGMMA tiles transposed but not 32-bit ones: f32 results leave
  # as Y^T and XLA transposes them (a checking path, not the fast one)
  transposed_out = out_dtype == jnp.dtype(jnp.float32)
  out_tile = (tile_n, tile_m) if transposed_out else (tile_m, tile_n)
  y = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((n, m) if transposed_out else (m, n), out_dtype),
      grid=(num_sms,), grid_names=("sm",), num_threads=compute_wgs + 1, thread_name="wg",
      scratch_types=[
          plgpu.SMEM((compute_wgs, *out_tile), out_dtype,
                     transforms=_swizzled(out_tile[1], out_dtype)),
          plgpu.SMEM((compute_wgs, lr_rows, lr_cols), jnp.bfloat16,
                     transforms=_swizzled(lr_cols, jnp.bfloat16)),
          plgpu.SMEM((compute_wgs, tile_n if has_lr else 8, lr_cols), jnp.bfloat16,
                     transforms=_swizzled(lr_cols, jnp.bfloat16)),
          plgpu.SMEM((compute_wgs, tile_n), jnp.float32),
          plgpu.Barrier(num_barriers=3 * compute_wgs),
      ] + ([plgpu.SMEM((compute_wgs, n_acc, tile_n, GROUP), a_q.dtype)] if interpret else []),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
      )(*args)
  return (y.T if transposed_out else y)[:m_out]


def group_sums_t(a_q: jax.Array) -> jax.Array:
  """[M, K] activation codes -> f32 [K/64, M] per-group sums (exact)."""
  m, k = a_q.shape
  return a_q.astype(jnp.float32).reshape(m, k // GROUP, GROUP).sum(-1).T


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


H100_SMS = 132   # H100 / H200 SXM: the SMs assumed off a GPU (exported for CUDA on a CPU)


def sm_count() -> int:
  """The default device's SMs (a GPU kernel's persistent programs), ``H100_SMS`` off a GPU."""
  return getattr(jax.devices()[0], "core_count", None) or H100_SMS


def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.x)."""
  device = jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")) \
      .startswith("9")


# Output tilings of the library path, fastest first (H100, docs/benchmarks/2026-11-23-hopper-
# tilings-h100.md): 3 compute warpgroups x 64 weight rows x 64 tokens was 4-7% faster than
# 2 x 64 rows x 128 tokens at four FLUX shapes, and 0-1% at 3072 -> 21504 (two runs); the
# latter covers N that 192 does not divide.
TILINGS = (dict(tile_m=64, tile_n=64, compute_wgs=3), dict(tile_m=128, tile_n=64, compute_wgs=2))


def tiling(n: int) -> dict | None:
  """The ``w4a4_gemm_t`` tile arguments for N output features, or None if none fits."""
  for t in TILINGS:
    if n % (t["tile_n"] * t["compute_wgs"]) == 0:
      return t
  return None


def supports(m: int, k: int, n: int) -> bool:
  """Whether ``w4a4_gemm_t`` takes this problem (else use the Triton GEMM)."""
  del m
  return k % GROUP == 0 and tiling(n) is not None


def gemm(a_q, a_scale_t, w_packed, w_scale, lr=None, up=None, bias=None, *,
         out_dtype=jnp.bfloat16, interpret: bool = False):
  """``w4a4_gemm_t`` on a QuantizedLinear's weights (scales [N, K/64], ``L_up`` [r, N]),
  which XLA transposes around the call; activations as the activation kernel gives them
  with ``codes=True`` (int8 [M, K], f32 [K/64, M]). -> [M, N] in out_dtype."""
  if lr is not None:
    pad = -lr.shape[1] % 16  # wgmma takes K in steps of 16
    lr = jnp.pad(lr.astype(jnp.bfloat16), ((0, 0), (0, pad)))
    up = jnp.pad(up.astype(jnp.bfloat16).T, ((0, 0), (0, pad)))
  # f32 callers get the f32 result (a slower store); everything else is rounded once, to bf16
  f32 = jnp.dtype(out_dtype) == jnp.dtype(jnp.float32)
  y = w4a4_gemm_t(a_q, a_scale_t, w_packed, w_scale.astype(jnp.float32).T, lr, up,
                  None if bias is None else bias.astype(jnp.float32),
                  out_dtype=jnp.float32 if f32 else jnp.bfloat16, interpret=interpret,
                  **tiling(w_packed.shape[0]))
  return y.astype(out_dtype)
