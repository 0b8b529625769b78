"""Row-scaled int8 GEMM on Hopper (Pallas, Mosaic GPU: TMA, wgmma s8, warp specialization).

The GEMM of the Hopper-native SVDQuant formats (``formats.ROW_SCALED``): W4A8 (``int4_2l``
weights, per-token ``int8`` activations) and two-level W4A4 (``int4_2l`` both sides). Both
operands are int8 with one f32 scale per row, so the whole K reduction is one exact int32
accumulation and the scales are applied once, in the epilogue:

  Y[m, n] = (f32(sum_k a[m, k] w[n, k]) * s_a[m]) * s_w[n] + bf16(lr[m]) . up[:, n] + bias[n]

Structure (the jax Hopper matmul example's): one memory warpgroup streams [CTA_M, tile_k]
activation and [CTA_N, tile_k] weight tiles into shared memory with TMA, ``steps`` deep; two
compute warpgroups each own a [tile_m, tile_n] int32 accumulator and issue wgmma with both
operands in shared memory (both K-major, as 8-bit wgmma requires). The epilogue converts
once, scales by the token and channel scales, adds the low-rank up projection with one bf16
wgmma (lr [tile_m, r] times up^T [r, tile_n]) and the bias, and stores the tile with TMA.
The grid is persistent (one program per SM looping over output tiles).

Weights rest 4-bit (``int4_2l``: packed codes and multipliers); ``act_rowscaled.
expand_two_level`` turns them into the int8 products ``m * q`` right before the call (one
Pallas pass, N K / 2 bytes read and N K written: 0.017-0.037 ms at the FLUX shapes on an
H200 in back-to-back calls, near copy bandwidth; 4.7 ms of a FLUX.1-dev 1024x1024 step, where
the int8 GEMM takes 47; docs/benchmarks, 2026-12-02). Layers with bf16 outputs and K, N
multiples of 128 skip that pass: ``w4a8_hopper`` expands the packed weights in its registers.
This kernel serves prepared layers (``qlinear.prepare``: expanded once per loop), f32
outputs, other shapes, and W8A8.

Ragged M: the TMA unit zero-fills out-of-bounds reads and drops out-of-bounds writes; M is
padded to a multiple of 8 rows (a TMA row tile) only when it is not one already.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import llvm
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

from svdq_jax.pallas_kernels.w4a4_hopper import (ROW_ALIGN, _swizzled, _wgmma_onto, on_hopper,
                                                 settles_when_interpreted, sm_count)

WG_DIMS = ("m", "n")


def check_shapes(a, sa, w, sw, lr, up_t, bias) -> None:
  m, k = a.shape
  n = w.shape[0]
  if a.dtype != jnp.int8 or w.dtype != jnp.int8:
    raise ValueError(f"int8 GEMM takes int8 operands, got {a.dtype} and {w.dtype}")
  if w.shape != (n, k):
    raise ValueError(f"weights {w.shape} do not match activations [M, K] = {a.shape}: "
                     f"expected [N, {k}]")
  check_epilogue(m, n, sa, sw, lr, up_t, bias)


def check_epilogue(m: int, n: int, sa, sw, lr, up_t, bias) -> None:
  """The epilogue operands of an [M, N] output: scales [M] and [N], lr [M, r] with up_t
  [N, r] (or both None), bias [N] (or None)."""
  if sa.shape != (m,) or sw.shape != (n,):
    raise ValueError(f"row scales must be [M] = [{m}] and [N] = [{n}], got {sa.shape} and "
                     f"{sw.shape}")
  if (lr is None) != (up_t is None):
    raise ValueError("the low-rank branch needs both lr [M, r] and up_t [N, r]")
  if lr is not None and (lr.shape[0] != m or up_t.shape != (n, lr.shape[1])):
    raise ValueError(f"low-rank operands must be lr [M, r] and up_t [N, r], got {lr.shape} "
                     f"and {up_t.shape}")
  if bias is not None and bias.shape != (n,):
    raise ValueError(f"bias must be [N] = [{n}], got {bias.shape}")


def cta_cols(tile_n: int, wg_dim: str) -> int:
  """The CTA tile's output columns: both compute warpgroups' when they split it along N."""
  return tile_n * (2 if wg_dim == "n" else 1)


@settles_when_interpreted
@functools.partial(jax.jit, static_argnames=(
    "tile_m", "tile_n", "tile_k", "steps", "wg_dim", "grid_minor", "grid_tile_width",
    "delay_release", "out_splits", "out_dtype", "gelu_from", "packed_gelu", "num_sms",
    "interpret"))
def int8_gemm(a, sa, w, sw, lr=None, up_t=None, bias=None, *, tile_m: int = 128,
              tile_n: int = 128, tile_k: int = 128, steps: int = 4, wg_dim: str = "m",
              grid_minor: str = "n", grid_tile_width: int = 1, delay_release: int = 0,
              out_splits: int = 1, out_dtype=jnp.bfloat16, gelu_from: int | None = None,
              packed_gelu: bool = True, num_sms: int | None = None, interpret: bool = False):
  """Y = (a . w^T) * s_a s_w + lr . up_t^T + bias, on int8 tensor cores.

  Args:
    a: int8 [M, K] activation values (per-token int8, or int4_2l's m * q).
    sa: f32 [M] token scales. w: int8 [N, K] weight values. sw: f32 [N] channel scales.
    lr: bf16 [M, r] low-rank activations and up_t: bf16 [N, r] (``L_up`` transposed), r a
      multiple of 16, or both None. bias: [N] (bf16 or f32 read as given, else as f32) or
      None.
    tile_m, tile_n: each compute warpgroup's output tile; wg_dim: the axis along which the
      two compute warpgroups split the CTA tile ('m': CTA tile [2 tile_m, tile_n]).
    tile_k: K per pipeline step; steps: pipeline depth. grid_minor, grid_tile_width: the
      order of output tiles over the persistent grid (``plgpu.planar_snake``).
    delay_release: wgmma groups left in flight at the end of a pipeline step (0 or 1; with
      1 a step's shared-memory tiles are released one step later).
    out_splits: the output tile is staged and stored in this many column slices, one after
      the other, through a staging buffer that much smaller (shared memory for a wider
      low-rank branch at the same pipeline depth, for one wait per slice).
    out_dtype: bf16 or f32. gelu_from: None, or the first of the output columns stored
      through the tanh GELU (``qlinear.gelu_tanh`` of the bf16 output, each operation rounded
      to bf16, the tanh the GPU's tanh.approx.f32: FLUX's linear1 / fc1, whose GELU'd output
      the next layer's activation kernel then reads as it is); bf16 outputs, a multiple of
      the CTA tile's N. packed_gelu: that GELU in bf16x2 instructions (``_gelu``; the same
      bits).
    num_sms: programs (default: the GPU's SMs; interpret: tiles).
    interpret: Pallas' GPU interpret mode (CPU; needs PJRT_NPROC >= 4, tests/conftest.py).

  Returns:
    [M, N] in out_dtype. K must be a multiple of tile_k (reduced to 64 when it is not),
    N of the CTA tile's N.
  """
  check_shapes(a, sa, w, sw, lr, up_t, bias)
  if wg_dim not in WG_DIMS or grid_minor not in WG_DIMS:
    raise ValueError(f"wg_dim and grid_minor must be one of {WG_DIMS}")
  m_out, k = a.shape
  n = w.shape[0]
  cta_m = tile_m * (2 if wg_dim == "m" else 1)
  cta_n = cta_cols(tile_n, wg_dim)
  if k % tile_k:
    tile_k = 64
  if k % tile_k:
    raise ValueError(f"int8 GEMM needs K to be a multiple of 64, got K={k}")
  if n % cta_n:
    raise ValueError(f"N={n} is not a multiple of the CTA tile's {cta_n} columns")
  if out_splits < 1 or tile_n % (64 * out_splits):
    raise ValueError(f"out_splits={out_splits} must cut tile_n={tile_n} into slices of a "
                     "multiple of 64 columns")
  out_cols = tile_n // out_splits
  has_lr, has_bias = lr is not None, bias is not None
  rank = lr.shape[1] if has_lr else 0
  if rank % 16:
    raise ValueError(f"low-rank rank must be a multiple of 16 (wgmma's K step), got {rank}")
  out_dtype = jnp.dtype(out_dtype)
  if out_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
    raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
  if gelu_from is not None and (out_dtype != jnp.dtype(jnp.bfloat16) or gelu_from % cta_n
                                or not 0 <= gelu_from < n):
    raise ValueError(f"gelu_from={gelu_from} must be a column of the bf16 output [M, {n}] on "
                     f"the CTA tile's grid ({cta_n} columns)")
  a, sa, lr, m_iters = padded_tokens(a, sa, lr, cta_m)
  m, n_iters = a.shape[0], n // cta_n
  sw = sw.astype(jnp.float32)
  if num_sms is None:
    num_sms = m_iters * n_iters if interpret else sm_count()
  k_iters = k // tile_k
  steps = min(steps, k_iters)

  def kernel(a_gmem, w_gmem, sa_gmem, sw_gmem, *refs):
    it = iter(refs)
    lr_gmem, up_gmem = (next(it), next(it)) if has_lr else (None, None)
    bias_gmem = next(it) if has_bias else None
    out_gmem, out_smem, sa_smem, sw_smem, lr_smem, up_smem, bias_smem, barriers = it

    def pipeline(body, context):
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(k_iters,), memory_registers=40,
          in_specs=[
              plgpu.BlockSpec((cta_m, tile_k), lambda kk: (0, kk),
                              transforms=_swizzled(tile_k, jnp.int8), memory_space=plgpu.SMEM,
                              delay_release=delay_release),
              plgpu.BlockSpec((cta_n, tile_k), lambda kk: (0, kk),
                              transforms=_swizzled(tile_k, jnp.int8), memory_space=plgpu.SMEM,
                              delay_release=delay_release),
          ],
          wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=steps,
          compute_context=context)

    ignore = lambda *_, **__: None

    @functools.partial(pl.run_scoped,
                       allocs=pipeline(ignore, ignore).get_allocations(a_gmem, w_gmem),
                       collective_axes="wg")
    def _scope(allocs):
      wg = lax.axis_index("wg")
      wg_m = pl.ds(wg * tile_m, tile_m) if wg_dim == "m" else pl.ds(0, tile_m)
      wg_n = pl.ds(wg * tile_n, tile_n) if wg_dim == "n" else pl.ds(0, tile_n)

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
      def _tiles(info):
        (lin,) = info.index
        m_idx, n_idx = plgpu.planar_snake(
            lin, (m_iters, n_iters),
            1 if grid_minor == "n" else 0,
            grid_tile_width)
        m_slice = pl.ds(m_idx * cta_m, cta_m)
        n_slice = pl.ds(n_idx * cta_n, cta_n)

        def context(eval_pipeline):  # the compute warpgroups only
          bar = lambda i: barriers.at[5 * wg + i]
          # the epilogue's operands arrive while the K loop runs
          plgpu.copy_gmem_to_smem(sa_gmem.at[m_slice].at[wg_m], sa_smem.at[wg], bar(0))
          plgpu.copy_gmem_to_smem(sw_gmem.at[n_slice].at[wg_n], sw_smem.at[wg], bar(1))
          if has_lr:
            plgpu.copy_gmem_to_smem(lr_gmem.at[m_slice].at[wg_m], lr_smem.at[wg], bar(2))
            plgpu.copy_gmem_to_smem(up_gmem.at[n_slice].at[wg_n], up_smem.at[wg], bar(3))
          if has_bias:
            plgpu.copy_gmem_to_smem(bias_gmem.at[n_slice].at[wg_n], bias_smem.at[wg], bar(4))

          def accumulate(acc):
            eval_pipeline(acc)
            plgpu.wgmma_wait(0)
            return acc[...]

          acc = pl.run_scoped(accumulate, plgpu.ACC((tile_m, tile_n), jnp.int32))
          plgpu.barrier_wait(bar(0))
          plgpu.barrier_wait(bar(1))
          total = scaled(acc, sa_smem.at[wg], sw_smem.at[wg], token_axis=0)
          if has_lr:
            plgpu.barrier_wait(bar(2))
            plgpu.barrier_wait(bar(3))
            total = _wgmma_onto(total, lambda acc_ref: plgpu.wgmma(
                acc_ref, lr_smem.at[wg], up_smem.at[wg].transpose((1, 0))), interpret)
          if has_bias:
            plgpu.barrier_wait(bar(4))
            total = plus_bias(total, bias_smem.at[wg], token_axis=0)
          out_tile = out_gmem.at[m_slice, n_slice].at[wg_m, wg_n]

          def store(gelu):
            for part in range(out_splits):   # the staging buffer is free once TMA has read it
              cols = slice(part * out_cols, (part + 1) * out_cols)
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)
              y = (total if out_splits == 1 else total[:, cols]).astype(out_dtype)
              out_smem[wg] = _gelu(y, packed_gelu, interpret) if gelu else y
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(out_smem.at[wg],
                                      out_tile.at[:, pl.ds(cols.start, out_cols)])

          store_with_gelu(store, gelu_from, n_idx * cta_n)

        def body(_, a_smem, w_smem, acc):
          plgpu.wgmma(acc, a_smem.at[wg_m], w_smem.at[wg_n].transpose((1, 0)))
          plgpu.wgmma_wait(delay_release)
          return acc

        pipeline(body, context)(a_gmem.at[m_slice], w_gmem.at[n_slice], allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel.__name__ = (f"int8_rowscaled_m{tile_m}n{tile_n}k{tile_k}{wg_dim}s{steps}"
                     f"d{delay_release}o{out_splits}{'' if gelu_from is None else 'gelu'}")
  args = [a, w, sa, sw]
  if has_lr:
    args += [lr.astype(jnp.bfloat16), up_t.astype(jnp.bfloat16)]
  if has_bias:
    bias = bias_operand(bias)
    args.append(bias)
  lr_cols = rank if has_lr else 64
  lr_rows = lambda rows: rows if has_lr else 8
  y = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(num_sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
      scratch_types=[
          plgpu.SMEM((2, tile_m, out_cols), out_dtype,
                     transforms=_swizzled(out_cols, out_dtype)),
          plgpu.SMEM((2, tile_m), jnp.float32),
          plgpu.SMEM((2, tile_n), jnp.float32),
          plgpu.SMEM((2, lr_rows(tile_m), lr_cols), jnp.bfloat16,
                     transforms=_swizzled(lr_cols, jnp.bfloat16)),
          plgpu.SMEM((2, lr_rows(tile_n), lr_cols), jnp.bfloat16,
                     transforms=_swizzled(lr_cols, jnp.bfloat16)),
          plgpu.SMEM((2, tile_n), bias.dtype if has_bias else jnp.float32),
          plgpu.Barrier(num_barriers=10),
      ],
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
          approx_math=gelu_from is not None),   # the GELU's tanh: tanh.approx.f32
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*args)
  return y[:m_out]


def padded_tokens(a, sa, lr, tile_rows: int):
  """The GEMMs' token-side operands for TMA: a [M, K] and lr [M, r] (or None) padded to a
  multiple of ROW_ALIGN rows (a TMA row tile) where M is not one already, the f32 token
  scales sa [M] to whole tiles of ``tile_rows`` (a tile reads its scales with one 1-D copy).
  Returns (a, sa, lr, token tiles)."""
  m_out = a.shape[0]
  pad = -m_out % ROW_ALIGN
  if pad:
    a = jnp.pad(a, ((0, pad), (0, 0)))
    lr = None if lr is None else jnp.pad(lr, ((0, pad), (0, 0)))
  m_iters = pl.cdiv(a.shape[0], tile_rows)
  return a, jnp.pad(sa.astype(jnp.float32), (0, m_iters * tile_rows - m_out)), lr, m_iters


def scaled(acc, sa_ref, sw_ref, token_axis: int):
  """The epilogue's first step: f32(acc) * s_a * s_w in the reference's order, for a wgmma
  accumulator tile whose ``token_axis`` runs over tokens (0; 1 for a transposed Y^T tile)
  and the other over output channels. sa_ref / sw_ref: the tile's f32 scales in smem."""
  chan_axis = 1 - token_axis
  s_a = plgpu.load(sa_ref, layout=plgpu.Layout.WGMMA.reduce(chan_axis))
  s_w = plgpu.load(sw_ref, layout=plgpu.Layout.WGMMA.reduce(token_axis))
  return (acc.astype(jnp.float32) * lax.broadcast_in_dim(s_a, acc.shape, [token_axis])
          * lax.broadcast_in_dim(s_w, acc.shape, [chan_axis]))


def scaled_rows(total, scale_ref, token_axis: int):
  """total * scale along the output channels (the axis other than ``token_axis``)."""
  c = plgpu.load(scale_ref, layout=plgpu.Layout.WGMMA.reduce(token_axis))
  return total * lax.broadcast_in_dim(c, total.shape, [1 - token_axis])


def plus_bias(total, bias_ref, token_axis: int):
  """total + bias along the output channels (the axis other than ``token_axis``); a bf16
  bias widened to f32 first (exact)."""
  b = plgpu.load(bias_ref, layout=plgpu.Layout.WGMMA.reduce(token_axis)).astype(jnp.float32)
  return total + lax.broadcast_in_dim(b, total.shape, [1 - token_axis])


def bias_operand(bias):
  """The bias as the GEMM kernels read it: bf16 or f32 as given (a bf16 bias widened in
  the epilogue, so that no convert runs before the call), any other dtype as f32."""
  return bias if bias.dtype in (jnp.bfloat16, jnp.float32) else bias.astype(jnp.float32)


def store_with_gelu(store, gelu_from: int | None, first_col):
  """store(gelu: bool) for an output tile starting at column ``first_col``: through the GELU
  when the tile lies at or past ``gelu_from`` (whole CTA tiles sit on one side of it)."""
  if gelu_from is None:
    store(False)
    return
  in_gelu = first_col >= gelu_from
  pl.when(in_gelu)(lambda: store(True))
  pl.when(jnp.logical_not(in_gelu))(lambda: store(False))


def _gelu(y, packed: bool = False, interpret: bool = False):
  """``qlinear.gelu_tanh`` of the bf16 output tile (any shape, the WGMMA layout).

  packed=False: written in f32 operations, ``jnp.tanh`` the GPU's tanh.approx.f32
  (``approx_math``), as in ``act_rowscaled.kernel_gelu``. Its product that a sum adds is
  rounded by integer operations (``round_bits``): with casts, 0.22% of an H200's results
  differed from the definition by a bf16 ulp (2026-12-03). packed=True (the kernels'
  default; GPU only, interpret mode computes the former): two values a 32-bit register in
  bf16x2 PTX (``GELU_BF16X2``), the same bits; fc1 0.320 against 0.355 ms, the FLUX.1-dev
  FP8 step 88.40 against 89.15 ms (H100, 2026-12-06, docs/benchmarks)."""
  if packed and not interpret:
    return _gelu_bf16x2(y)
  from svdq_jax.qlinear import gelu_tanh
  return gelu_tanh(y, round_bits=True)


# ``qlinear.gelu_tanh`` on the two bf16 values of $1, into $0. Each of its operations rounds
# to bf16 the f32 result of two bf16 operands, which is the bf16 operation itself (an f32
# sum or product of two bf16 values rounded to bf16 equals their correctly rounded bf16
# result: 24 >= 2 x 8 + 2 bits), so the bf16x2 instructions give the definition's bits at
# half the instructions of the f32 ones and their conversions; the explicit .rn keeps ptxas
# from contracting a product into a sum (an fma rounds once where the definition rounds
# twice). The tanh stays tanh.approx.f32 on each half, as in the f32 form. Subnormals are
# kept, as the f32 form keeps them on the GPU (XLA's CPU flushes them: there the definition
# gives 0 for |x| < 2^-125). Checked on every bf16 input by an emulator of these lines
# (tests/test_epilogue_gelu.py) and on the GPU (scripts/bench_rowscaled.py --parts).
# Constants: bf16 0.044715 (0x3D37), sqrt(2 / pi) (0x3F4C), 1 and 0.5, in both halves.
GELU_BF16X2 = """{
.reg .b32 g_t, g_c, g_l, g_h;
.reg .f32 g_fl, g_fh;
mul.rn.bf16x2 g_t, $1, $1;
mul.rn.bf16x2 g_t, g_t, $1;
mov.b32 g_c, 0x3D373D37;
mul.rn.bf16x2 g_t, g_t, g_c;
add.rn.bf16x2 g_t, $1, g_t;
mov.b32 g_c, 0x3F4C3F4C;
mul.rn.bf16x2 g_t, g_t, g_c;
shl.b32 g_l, g_t, 16;
and.b32 g_h, g_t, 0xFFFF0000;
mov.b32 g_fl, g_l;
mov.b32 g_fh, g_h;
tanh.approx.f32 g_fl, g_fl;
tanh.approx.f32 g_fh, g_fh;
cvt.rn.bf16x2.f32 g_t, g_fh, g_fl;
mov.b32 g_c, 0x3F803F80;
add.rn.bf16x2 g_t, g_t, g_c;
mov.b32 g_c, 0x3F003F00;
mul.rn.bf16x2 g_t, g_t, g_c;
mul.rn.bf16x2 $0, $1, g_t;
}"""


def _gelu_bf16x2(y):
  """``GELU_BF16X2`` on each register (two bf16 values) of y, bf16 in the WGMMA layout."""
  layout = plgpu.Layout.WGMMA

  @plgpu.inline_mgpu(arg_types=(layout,), return_type=plgpu.ShapeDtypeStruct(
      y.shape, jnp.bfloat16, layout=layout))
  def gelu(_, frag):
    i32 = ir.IntegerType.get_signless(32)
    regs = np.empty_like(frag.registers)
    for idx in np.ndindex(regs.shape):
      word = mgpu.utils.bitcast(frag.registers[idx], i32)
      out = llvm.inline_asm(i32, [word], GELU_BF16X2, "=r,r")
      regs[idx] = mgpu.utils.bitcast(out, frag.registers[idx].type)
    return mgpu.FragmentedArray(_registers=regs, _layout=frag.layout, _is_signed=None)

  return gelu(y)


def reference(a, sa, w, sw, lr=None, up_t=None, bias=None):
  """jnp semantics of ``int8_gemm`` (f32, before the output rounding; ``gelu_from``: the
  bf16 output's columns from there through ``qlinear.gelu_tanh``)."""
  from svdq_jax.qlinear import lowrank_up, row_scaled_matmul
  y = row_scaled_matmul(a, sa, w, sw)
  if lr is not None:
    y = y + lowrank_up(lr, up_t.T)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y


# Output tilings of the library path, first that fits N wins. H200, M = 4608, GEMM alone:
# - N = 3072 (K = 3072, 12288, 15360): a 128 x 128 CTA tile with K steps of 128 bytes (4
#   steps) ran 7-13% faster than the 256 x 128 one with K steps of 64, the same CTA tile with K
#   steps of 64 25-40% slower (2026-12-02, 2026-12-02-gemm-tiles-n3072-h200.json).
# - N = 12288, 21504 (K = 3072): a 256 x 128 CTA tile with K steps of 128 (3 steps; at rank 32
#   the output is stored in halves to fit) ran 4% / 12% faster than K steps of 64, and faster
#   than XLA's own int8 GEMM (0.250 vs 0.286 ms, 0.395 vs 0.407 ms); 64 x 256 per warpgroup
#   was as fast but does not fit with the low-rank operands (2026-12-02,
#   2026-12-02-gemm-tiles-wide-n-h200.json). In the FLUX.1-dev step the kernel's time did not
#   move (26.72 vs 26.75 ms per step, 2026-12-03): kept, as it loses nowhere.
# ``max_n`` bounds a tiling's N, ``min_steps`` the pipeline depth it may fall to before the
# next tiling is tried (K steps of 128 only 2 deep ran 1.6-1.9x slower, 2026-11-29); a wider
# low-rank branch (a LoRA) then falls back to K steps of 64. All fit shared memory with the
# rank-32 low-rank operands and a bf16 output tile.
# Order of the output tiles (``grid_tile_width``: bands of that many N tiles, walked along M):
# M = 4608, GEMM alone, one run (2026-12-03, ``bench_rowscaled.py --gemm-only``,
# 2026-12-03-gemm-grid-order-h200.json): bands of 12 at N = 3072 took 0.077 / 0.259 / 0.310 ms
# at K = 3072 / 12288 / 15360 against 0.077 / 0.267 / 0.325 for bands of 1; bands of 8 at
# N = 12288 / 21504 0.239 / 0.394 against 0.246 / 0.395 ms. All outputs equal the reference.
TILINGS = (dict(tile_m=64, tile_n=128, tile_k=128, steps=4, wg_dim="m", grid_tile_width=12,
                max_n=3072, min_steps=3),
           dict(tile_m=128, tile_n=128, tile_k=128, steps=3, wg_dim="m", grid_tile_width=8,
                min_steps=3),
           dict(tile_m=128, tile_n=128, tile_k=64, steps=4, wg_dim="m"),
           dict(tile_m=128, tile_n=64, tile_k=64, steps=4, wg_dim="m"))
F32_TILING = dict(tile_m=64, tile_n=128, tile_k=64, steps=4, wg_dim="m")  # f32 output tile


# Hopper's shared memory per block (227 KiB) less a margin for the barriers (144 bytes
# measured on the H200) and alignment
SMEM_BYTES = 232448 - 1024


def smem_bytes(tile_m, tile_n, tile_k, steps, wg_dim, rank=0, out_dtype=jnp.bfloat16,
               out_splits=1, grid_minor="n", grid_tile_width=1, delay_release=0) -> int:
  """Shared memory of ``int8_gemm``'s scratch and pipeline buffers, in bytes. Matched Mosaic's
  count to the byte, less 144 bytes of barriers, at ranks 64 / 96 / 160 (H200, 2026-12-02).
  Takes every ``int8_gemm`` tile argument; the grid's order and delay_release take none."""
  del grid_minor, grid_tile_width, delay_release
  cta_m = tile_m * (2 if wg_dim == "m" else 1)
  cta_n = cta_cols(tile_n, wg_dim)
  lr_rows, lr_cols = (tile_m, rank) if rank else (8, 64)
  up_rows = tile_n if rank else 8
  return (steps * (cta_m + cta_n) * tile_k                       # int8 operand tiles
          + 2 * tile_m * tile_n // out_splits * jnp.dtype(out_dtype).itemsize  # output staging
          + 2 * 4 * (tile_m + 2 * tile_n)                        # token/channel scales, bias
          + 2 * 2 * (lr_rows + up_rows) * lr_cols)               # bf16 low-rank operands


# Whether ``tiling`` may store the output tile in two halves (``out_splits=2``) to keep the
# pipeline's depth for a wider low-rank branch: at rank 64 (SVDQuant's 32 + a rank-32 LoRA)
# the 4-step tiling misses shared memory by 144 bytes and would lose a step. Measured on an
# H200 (2026-12-02, ``scripts/bench_rowscaled.py --ranks 32,64,96,160 --split-store``): the
# layer 7-12% faster at rank 64, 15-20% at rank 96, unchanged at 32 and 160; a rank-32 LoRA
# on every FLUX.1-dev linear costs +3.4% of the step with it, +12.3% without.
SPLIT_STORE = True


def tiling(n: int, out_dtype=jnp.bfloat16, rank: int = 0) -> dict | None:
  """The ``int8_gemm`` tile arguments for N output features and a low-rank branch of ``rank``
  (a multiple of 16; 0: none), or None if none fits. A wider branch (32 + a LoRA's rank) takes
  the output staging's halves (with ``SPLIT_STORE``), then pipeline depth (down to the
  tiling's ``min_steps``, default 2), then the next tiling, to stay in shared memory."""
  tilings = (F32_TILING,) if jnp.dtype(out_dtype) == jnp.dtype(jnp.float32) else TILINGS
  for t in tilings:
    t = dict(t)
    max_n, min_steps = t.pop("max_n", None), t.pop("min_steps", 2)
    if n % cta_cols(t["tile_n"], t["wg_dim"]) or (max_n and n > max_n):
      continue
    splits = (1, 2) if SPLIT_STORE and t["tile_n"] % 128 == 0 else (1,)
    for steps in range(t["steps"], min_steps - 1, -1):
      for out_splits in splits:
        tiles = dict(t, steps=steps, out_splits=out_splits)
        if smem_bytes(**tiles, rank=rank, out_dtype=out_dtype) <= SMEM_BYTES:
          return tiles
  return None


def supports(k: int, n: int, out_dtype=jnp.bfloat16) -> bool:
  """Whether ``int8_gemm`` takes this problem at the library tiling (low-rank branch apart:
  one too wide for any tiling is added outside the kernel)."""
  return k % 64 == 0 and tiling(n, out_dtype) is not None


__all__ = ["SPLIT_STORE", "cta_cols", "int8_gemm", "reference", "smem_bytes", "supports", "tiling", "on_hopper"]
