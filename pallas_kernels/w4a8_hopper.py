"""W4A8 GEMM with the int4_2l weights expanded in registers (Pallas, Mosaic GPU; transposed).

  Y^T[n, m] = (f32(sum_k (m q)[n, k] a[m, k]) * s_a[m]) * s_w[n] + up[n] . bf16(lr[m]) + bias[n]

The arithmetic of ``int8_hopper.int8_gemm`` on ``act_rowscaled.expand_two_level``'s weights
(bit for bit, bf16 output), without the expanded copy: the packed codes become the register
operand of wgmma. One memory warpgroup streams, per K step of 128, the activation tile
[tile_m, 128] (int8), the packed codes [2 x 64 rows, 64 bytes] and a multiplier byte per row
into shared memory (TMA); each of two (``compute_wgs=3``: three, 192 rows a CTA) compute
warpgroups owns 64 weight rows, expands its codes
to the int8 products m * q in registers (``_expand``) and issues wgmma(acc [64, tile_m] int32,
w, activations^T), the activations K-major in shared memory as 8-bit wgmma wants them. The
epilogue scales, adds the low-rank up projection (one bf16 wgmma) and the bias, optionally the
GELU, and stores the tile transposed through shared memory.

Measured on an H200 (2026-12-03, docs/benchmarks README, "fourteenth session"), M = 4608 with
the rank-32 branch and a bias, bit-identical outputs: 0.091 / 0.272 / 0.280 / 0.431 / 0.339
ms at 3072 -> 3072 / 3072 -> 12288 / 12288 -> 3072 / 3072 -> 21504 / 15360 -> 3072, against
0.126 / 0.308 / 0.312 / 0.491 / 0.361 for the expansion pass plus ``int8_gemm``: the same
speed as the int8 GEMM alone at wide N, 13-15% behind it at N = 3072. The two warpgroups
taking turns (one expanding under the other's MMA, a barrier between them; commit e684f23)
ran 10-20% slower than letting them run free; expanding into shared memory for an smem x smem
wgmma instead (each warpgroup half the rows, both synchronized per step; commit 4d76ee6) 15-61%
slower than the separate pass. Neither did these help (2026-12-04, M = 4608, 256-token tiles;
commit 4d9f82d, reverted): pairs of CTAs in a cluster sharing the activation tile by TMA
multicast (half its L2 reads; 0-7% slower), nor each step as two wgmmas of one 64-group with
the second group expanded under the first's MMA (1-3% slower; with it 128-token tiles stay 12-34%
behind 256). Three compute warpgroups (192 weight rows a CTA, 192-token tiles; 2026-12-04,
seventeenth session) ran 0.077 / 0.262 / 0.227 / 0.447 / 0.292 ms at the same shapes, under
XLA's own int8 GEMM at the wide-K two: the default where ``tiling`` says. The persistent grid
walks the output tiles in bands of 8 weight tiles along the tokens, as the int8 GEMM's wide
tiling does (``grid_minor``, ``grid_tile_width``). At K = 3072 and wide N it trails XLA's
int8 GEMM by 10-15%, at wide K it beats it (H200, 2026-12-04; H100, 2026-12-07). The tile
order is not why: bands of 1, 4, 16 along N or 4 along M took at most 1-3% off a K = 3072
layer at M = 4608 (6% at M = 16384), and bands of 4 along M left the FLUX.1 step as it was
(96.88 against 96.74 ms). A per-tile cost is: at M = 4608, N = 12288 (192 x 192 tiles,
11.6 per SM) the time fits ~0.72 us per K step of 128 and ~5 us per tile, ~7 K steps' worth,
a quarter of a K = 3072 tile (0.055-0.061 ms of the layer's 0.257); XLA's int8 GEMM fits
0.030-0.034 ms fixed and a K loop 7-10% slower (2026-12-07, H100,
docs/benchmarks/2026-12-07-gemm-k-sweep-h100.json). Profiled in the kernel (``profile_dir``,
scripts/profile_w4a8_tiles.py; H100, 2026-12-07): the K loop runs at ~95% of the int8
tensor cores' peak (~1.22 kilocycles a step against 1.15); a tile's fixed ~6.4 kilocycles
are the epilogue (2.55, the three warpgroups at once), the copies of the next tile's
epilogue operands issued behind the memory warpgroup's burst of its first stages (~1.7) and
the first stage's wait. The copies now go under the K loop (``copies_at``, 1.5-13% off at
K = 3072 but for three cases 1% slower); what is left is the epilogue and the fill, which only overlapping tiles (two
CTAs an SM, or warpgroups on different tiles) would hide. No way measured faster (H100s,
2026-12-07, forty-third and forty-fourth sessions; docs/benchmarks README): a program's tile
pipelines chained (the next tile's first K steps loaded under the last ones of the tile
before; jax's ``pipeline_state``) ran the five FLUX.1 layers 3-18% faster on one H100 and
within 1.2% either way on another, and the FLUX.1 step in 95.30 ms against 95.18 (28-step
loop 2.567 against 2.578 s, run 41): removed (git history: 8eecb81). The warpgroups of
chained tiles started K steps apart (one's epilogue under the others' MMAs) ran 1-3% slower
than chained alone, and 128-token tiles on three warpgroups (room for a second accumulator)
16-34% slower than 192-token ones.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, memref
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

from svdq_jax import qlinear
from svdq_jax.pallas_kernels import act_rowscaled
from svdq_jax.pallas_kernels.int8_hopper import (SMEM_BYTES, WG_DIMS, _gelu, bias_operand,
                                                  check_epilogue, padded_tokens, plus_bias,
                                                  scaled, scaled_rows, store_with_gelu)
from svdq_jax.pallas_kernels.w4a4_hopper import (_swizzled, _wgmma_onto, settles_when_interpreted,
                                                  sm_count)

ROWS = 64     # weight rows per compute warpgroup (one wgmma M group)
CTA_N = 2 * ROWS
TILE_K = 128  # two packed 64-groups per step
BARRIERS = 6  # a compute warpgroup's: sa, sw, lr, up, bias, row_max_inv (+ gate, residual)
GRID_TILE_WIDTH = 8  # the persistent grid's bands of CTA tiles along N (``w4a8_gemm_t``)
# The K step at which a tile's epilogue operands are copied (``w4a8_gemm_t(copies_at=)``):
# issued before the K loop, the first copy waited ~1.25 kilocycles behind the memory
# warpgroup's burst of the tile's first stages (H100, 2026-12-07,
# scripts/profile_w4a8_tiles.py: a third of the ~3.3 kilocycles between one tile's epilogue
# and the next K loop). GEMM alone with the rank-32 branch and bias, H100s, 2026-12-07
# (docs/benchmarks README): at K = 3072 step 4 took 1.5-13% off at M = 1024 / 4608 / 16384,
# but for 3072 -> 12288 at M = 1024 and 16384 and 3072 -> 3072 at M = 4608 on one of two
# machines (each 1% slower); at K = 12288, before the K loop was faster at M = 1024 and
# 16384 (4%, 8%): "auto" takes step 4 up to COPIES_MAX_K. On a third H100 (forty-third
# session) 3072 -> 3072 ran 0.0843 ms at step 4 against 0.0707 before the K loop (19%
# slower), 3072 -> 21504 0.4370 against 0.4356; the FLUX.1 step moved by less than the
# machines' spread (run 40: 95.39 / 85.82 ms against run 39's 95.67 / 85.83), and in one run
# (run 41, H100, 2026-12-07) "auto" against None everywhere: step 95.18 / 95.28 ms, 28-step
# loop 2.578 / 2.583 s.
COPIES_AT, COPIES_MAX_K = 4, 6144


def check_shapes(a, sa, codes, w_mult, sw, lr, up_t, bias, compute_wgs: int = 2) -> None:
  m, k = a.shape
  n = codes.shape[0]
  if a.dtype != jnp.int8:
    raise ValueError(f"the W4A8 GEMM takes int8 activations, got {a.dtype}")
  if k % TILE_K or codes.dtype != jnp.uint8 or codes.shape != (n, k // 2):
    raise ValueError(f"packed int4_2l weights must be uint8 [N, K/2] with K % {TILE_K} == 0, "
                     f"got {codes.dtype} {codes.shape} for activations [M, K] = {a.shape}")
  if n % (compute_wgs * ROWS) or n < mult_box(compute_wgs):
    raise ValueError(f"N={n} is not a multiple of {compute_wgs * ROWS} of at least "
                     f"{mult_box(compute_wgs)}")
  if w_mult.dtype != jnp.uint8 or w_mult.shape != (k // TILE_K, n):
    raise ValueError(f"packed multipliers must be uint8 [K/128, N] = [{k // TILE_K}, {n}], "
                     f"got {w_mult.dtype} {w_mult.shape}")
  check_epilogue(m, n, sa, sw, lr, up_t, bias)
  if lr is not None and lr.shape[1] % 16:
    raise ValueError(f"the low-rank rank must be a multiple of 16 (wgmma's K step), got "
                     f"{lr.shape[1]}")


def mult_box(compute_wgs: int) -> int:
  """Multiplier bytes a pipeline step loads: a CTA's rows rounded up to 128, since TMA writes
  only to 128-byte aligned shared memory (192-byte stages misaligned every other one:
  CUDA_ERROR_MISALIGNED_ADDRESS on the H200, 2026-12-04)."""
  return -(-compute_wgs * ROWS // 128) * 128


def smem_bytes(tile_m: int, steps: int, rank: int = 0, compute_wgs: int = 2) -> int:
  """Shared memory of ``w4a8_gemm_t``'s pipeline buffers and scratch, in bytes."""
  lr_cols, w = (rank if rank else 64), compute_wgs
  return (steps * (tile_m * TILE_K + w * ROWS * TILE_K // 2 + mult_box(w))  # a, codes, m
          + w * tile_m * ROWS * 2                                    # bf16 output staging
          + w * 4 * (2 * tile_m + 3 * ROWS)       # scales, bias, row maxima, their 1 / lambda
          + ((tile_m if rank else 8) + w * (ROWS if rank else 8)) * lr_cols * 2)  # lr, up


# What ``smem_bytes`` leaves out (the 1024-byte alignment of the swizzled buffers, the
# pipeline's barriers) came to ~4.9 KB at 256 tokens 2 deep with a rank-96 branch, where the
# residual's gate and two barriers took the kernel 168 bytes past the H100's / H200's 227 KB
# (lowered 2026-12-06): it takes the residual only with this much room left.
RESIDUAL_ROOM = 8192


def takes_residual(tile_m: int, steps: int, rank: int = 0, compute_wgs: int = 2) -> bool:
  """Whether a tiling leaves the room for ``w4a8_gemm_t``'s ``residual`` (RESIDUAL_ROOM)."""
  return smem_bytes(tile_m, steps, rank, compute_wgs) + RESIDUAL_ROOM <= SMEM_BYTES


# Output tilings (tokens per tile, pipeline depth). H200, GEMM + rank-32 branch: at M = 4608
# 256 tokens 3 deep ran the FLUX shapes 1.17-1.48x faster than 128 tokens 4 deep (2026-12-03;
# each weight tile is expanded once per token tile); at M = 512 (the text stream) 128 tokens
# 4 deep ran N = 3072 / 12288 and 15360 -> 3072 in 0.043 / 0.057 / 0.076 ms against 0.055 /
# 0.060 / 0.085 (256-token tiles: under two waves of the 132 SMs), but N = 21504 in 0.090
# against 0.070 (2.5 waves; 2026-12-04). The narrow tiling serves grids of wide tiles under
# MIN_WAVES waves; a wider low-rank branch gives up pipeline depth down to MIN_STEPS.
# (64-token tiles where even 128-token grids fill under one wave, the text stream's proj and
# fc2: the FLUX.1-dev step 101.8 ms against 100.4, H100, 2026-12-05: not taken.)
WIDE, NARROW = dict(tile_m=256, steps=3), dict(tile_m=128, steps=4)
MIN_WAVES, MIN_STEPS = 2, 2

_narrow_tiles = True
# Three compute warpgroups (192 weight rows a CTA, 192 tokens 3 deep), where N divides by 192
# and the wide tiling would run: H200, M = 4608, rank 32 + bias (2026-12-04), 0.077 / 0.262 /
# 0.227 / 0.291 ms at 3072 -> 3072 / 3072 -> 12288 / 12288 -> 3072 / 15360 -> 3072 against
# 0.090 / 0.280 / 0.281 / 0.333 for WIDE (the last two under XLA's int8 GEMM, 0.238 / 0.298),
# but 0.447 against 0.435 at 3072 -> 21504, hence THREE_WGS_MAX_N; 128 tokens 4 or 5 deep
# ran 7-17% behind WIDE. In the FLUX step (M = 4096 / 4608) the non-GELU layers' kernels took
# 19.26 ms against 20.70 on two warpgroups, but fc1 with the GELU epilogue 5.09 against 4.83:
# the GELU stays on two. Alone (M = 4608) the GELU layers ran the other way: 0.301 / 0.478 ms
# on three against 0.319 / 0.486 at 3072 -> 12288 / 21504 (2026-12-04, eighteenth session),
# and in the step of 2026-12-04 (nineteenth session) too: 18.22 + 5.16 ms against run 21's
# 18.46 + 5.20 on two, hence on for them as well (``set_three_warpgroups_gelu``).
THREE_WGS, THREE_WGS_MAX_N = dict(tile_m=192, steps=3, compute_wgs=3), 12288
_three_wgs = True
_three_wgs_gelu = True
def set_three_warpgroups(on: bool) -> None:
  """Whether ``tiling`` takes THREE_WGS (three compute warpgroups, 192 weight rows a tile)
  where it applies (the default) or two warpgroups always (as before 2026-12-04; kept to time
  the difference, scripts/bench_flux_full.py --two-warpgroups)."""
  global _three_wgs
  _three_wgs = bool(on)


def set_three_warpgroups_gelu(on: bool) -> None:
  """Whether ``tiling`` takes THREE_WGS for the GELU epilogue's layers too (FLUX.1's fc1 and
  linear1, the latter's N = 21504 included; on by default, see THREE_WGS;
  scripts/bench_flux_full.py --three-warpgroups-gelu times them off)."""
  global _three_wgs_gelu
  _three_wgs_gelu = bool(on)


def set_narrow_tiles(on: bool) -> None:
  """Whether ``tiling`` takes 128-token tiles where 256-token ones would fill fewer than
  MIN_WAVES waves of the SMs (the default) or 256-token tiles always (as before 2026-12-04;
  kept to time the difference, scripts/bench_flux_full.py --wide-tiles-only)."""
  global _narrow_tiles
  _narrow_tiles = bool(on)


def cta_rows(tiles: dict) -> int:
  """Weight rows (output columns) of one CTA tile of ``tiling``'s ``tiles``."""
  return tiles.get("compute_wgs", 2) * ROWS


def tiling(m: int, k: int, n: int, rank: int = 0, num_sms: int | None = None,
           gelu_from: int | None = None) -> dict | None:
  """``w4a8_gemm_t``'s tile arguments for an [M, K] x [K, N] problem with a rank-``rank``
  branch on ``num_sms`` SMs (default ``sm_count()``), the GELU epilogue from column
  ``gelu_from`` on if given (three warpgroups only where their 192-row CTAs divide it), or
  None if it does not take it (K not a multiple of 128, N of 128, or a low-rank branch too
  wide for shared memory)."""
  if k % TILE_K or n % CTA_N or rank % 16:
    return None
  def deepest(t):  # t with the deepest pipeline that fits shared memory, down to MIN_STEPS
    fits = [s for s in range(t["steps"], MIN_STEPS - 1, -1)
            if smem_bytes(t["tile_m"], s, rank, t.get("compute_wgs", 2)) <= SMEM_BYTES]
    return dict(t, steps=fits[0]) if fits else None

  num_sms = num_sms or sm_count()
  waves = lambda t: pl.cdiv(m, t["tile_m"]) * (n // CTA_N) / num_sms   # of t's two-wg grid
  if _narrow_tiles and waves(WIDE) < MIN_WAVES:
    tiles = deepest(NARROW)
  elif (_three_wgs and n % cta_rows(THREE_WGS) == 0
        and (n <= THREE_WGS_MAX_N if gelu_from is None
             else _three_wgs_gelu and gelu_from % cta_rows(THREE_WGS) == 0)
        and (three := deepest(THREE_WGS))):
    tiles = three
  else:
    tiles = deepest(WIDE)
  return tiles


@settles_when_interpreted
@functools.partial(jax.jit, static_argnames=("tile_m", "steps", "gelu_from", "packed_gelu",
                                             "compute_wgs", "num_sms", "cols", "grid_minor",
                                             "grid_tile_width", "copies_at",
                                             "profile_dir", "interpret"))
def w4a8_gemm_t(a, sa, codes, w_mult, sw, lr=None, up_t=None, bias=None, row_max_inv=None,
                residual=None, *,
                tile_m: int = 256, steps: int = 3, gelu_from: int | None = None,
                packed_gelu: bool = True, compute_wgs: int = 2, num_sms: int | None = None,
                cols: tuple[int, int] | None = None, grid_minor: str = "n",
                grid_tile_width: int = GRID_TILE_WIDTH, copies_at: int | None | str = "auto",
                profile_dir: str | None = None, interpret: bool = False):
  """bf16 [M, N] = (a . w^T) * s_a s_w + lr . up_t^T + bias, w = int4_2l's m * q.

  Args: a int8 [M, K], sa f32 [M]; codes uint8 [N, K/2] (``formats.pack``), w_mult uint8
    [K/128, N] (``formats.pack_multipliers(m).T``), sw f32 [N]; lr bf16 [M, r], up_t bf16
    [N, r] (r a multiple of 16) or both None; bias [N] (bf16 or f32 read as given, else
    as f32) or None. tile_m: tokens per output
    tile (the wgmma's N, <= 256); steps: pipeline depth. gelu_from: the output's columns from
    there go through ``qlinear.gelu_tanh`` (a multiple of the CTA's weight rows);
    packed_gelu: in bf16x2 instructions (``int8_hopper._gelu``; the same bits).
    compute_wgs: compute warpgroups of a CTA, 64 weight rows each (2, or 3: N and gelu_from
    multiples of 192, more warpgroups to hide each other's expansion). num_sms: programs
    (default: the GPU's SMs; interpret: tiles). interpret: Pallas' GPU interpret mode (CPU;
    PJRT_NPROC >= 4, tests/conftest.py). row_max_inv: f32 [N - gelu_from] or None, with
    gelu_from: the 1 / lambda of the layer input columns that the GELU columns feed.
    cols: (start, stop), multiples of the CTA's weight rows: only the output's columns
    start:stop, read from the weight-side operands (codes, w_mult, sw, up_t, bias) where
    they lie; N, gelu_from and row_max_inv then count from start (a layer's columns in
    separate launches: ``w4a4.set_split_gelu``). None: all of them.
    grid_minor, grid_tile_width: the order of the output tiles over the persistent grid:
      bands of grid_tile_width CTA tiles along grid_minor ("n" or "m"), each walked along
      the other dimension (``plgpu.planar_snake``; by default bands of 8 along N).
    copies_at: the K step (clipped to the last) at which a tile's epilogue operands
      (scales, lr, up_t, bias, ...) are copied into shared memory, their copies issued while
      the tile's MMAs run; None: before the K loop; "auto": COPIES_AT up to K =
      COPIES_MAX_K, None above.
    profile_dir: with it (GPU only), Mosaic GPU's in-kernel profiler writes each compute
      warpgroup's regions a tile, ``scale_copies`` (the token and channel scales' copies
      issued), ``lr_barrier`` (the warpgroups' barrier before the shared lr tile's copy),
      ``epilogue_copies`` (the other epilogue operands' copies issued), ``k_loop`` (the K
      loop) and ``epilogue`` (the rest of the tile's work; within it ``row_max``, the next
      layer's maxima), to a Chrome trace in that directory when the kernel runs
      (scripts/profile_w4a8_tiles.py reads it).
    residual: (r bf16 [M, N], gate [N]) or None: the output is then
    ``residual_rounded(r, gate, y)`` (not with gelu_from); r's tile is loaded where the
    output tile is staged, so it costs no shared memory.
  Returns: bf16 [M, N]; with row_max_inv also f32 [(N - gelu_from) / 64, M], each 64 GELU
  columns' max |y * row_max_inv| per token (NaN where one is NaN;
  ``act_rowscaled.row_max_partials``). M ragged (the TMA unit
  masks the last tile; padded to 8 rows).
  """
  if compute_wgs not in (2, 3):
    raise ValueError(f"compute_wgs={compute_wgs} must be 2 or 3")
  check_shapes(a, sa, codes, w_mult, sw, lr, up_t, bias, compute_wgs)
  m_out, k = a.shape
  n_all = codes.shape[0]
  cta_n, box = compute_wgs * ROWS, mult_box(compute_wgs)
  start, stop = cols or (0, n_all)
  if start % cta_n or stop % cta_n or not 0 <= start < stop <= n_all:
    raise ValueError(f"cols={cols} must be multiples of {cta_n} with 0 <= start < stop <= "
                     f"N={n_all}")
  n = stop - start
  if not (isinstance(grid_tile_width, int) and grid_tile_width >= 1
          and grid_minor in WG_DIMS):
    raise ValueError(f"grid_tile_width={grid_tile_width!r} must be a positive int and "
                     f"grid_minor={grid_minor!r} 'm' or 'n'")
  if copies_at == "auto":
    copies_at = COPIES_AT if k <= COPIES_MAX_K else None
  if copies_at is not None and not (isinstance(copies_at, int) and copies_at >= 0):
    raise ValueError(f"copies_at={copies_at!r} must be None, 'auto' or a K step >= 0")
  if profile_dir is not None and interpret:
    raise ValueError("profile_dir needs the GPU: interpret mode has no in-kernel profiler")
  if tile_m % 8 or not 64 <= tile_m <= 256:
    raise ValueError(f"tile_m={tile_m} must be a multiple of 8 in [64, 256] (wgmma's N)")
  if gelu_from is not None and (gelu_from % cta_n or not 0 <= gelu_from < n):
    raise ValueError(f"gelu_from={gelu_from} must be a multiple of {cta_n} below N={n}")
  has_lr, has_bias, has_rmax = lr is not None, bias is not None, row_max_inv is not None
  has_res = residual is not None
  if has_res and (gelu_from is not None or residual[0].shape != (m_out, n)
                  or residual[0].dtype != jnp.bfloat16 or jnp.shape(residual[1]) != (n,)):
    raise ValueError(f"residual must be (r bf16 [M, N] = [{m_out}, {n}], gate [N]) without "
                     f"gelu_from, got r {residual[0].dtype} {residual[0].shape}, gate "
                     f"{jnp.shape(residual[1])}, gelu_from={gelu_from}")
  if has_rmax and (gelu_from is None or row_max_inv.shape != (n - gelu_from,)):
    raise ValueError(f"row_max_inv must come with gelu_from and be [N - gelu_from], got "
                     f"{row_max_inv.shape} and gelu_from={gelu_from} for N={n}")
  rank = lr.shape[1] if has_lr else 0
  a, sa, lr, m_iters = padded_tokens(a, sa, lr, tile_m)
  m, n_iters = a.shape[0], n // cta_n
  if num_sms is None:
    num_sms = m_iters * n_iters if interpret else sm_count()
  k_iters = k // TILE_K
  steps = min(steps, k_iters)
  per_wg = BARRIERS + 2 * has_res   # the residual's: its gate's and its tile's

  def kernel(a_gmem, codes_gmem, mult_gmem, sa_gmem, sw_gmem, *refs):
    it = iter(refs)
    lr_gmem, up_gmem = (next(it), next(it)) if has_lr else (None, None)
    bias_gmem = next(it) if has_bias else None
    res_gmem, gate_gmem = (next(it), next(it)) if has_res else (None, None)
    rinv_gmem = next(it) if has_rmax else None
    out_gmem = next(it)
    rmax_gmem = next(it) if has_rmax else None
    (out_smem, sa_smem, sw_smem, lr_smem, up_smem, bias_smem, rinv_smem, rmax_smem, barriers,
     both, *stage) = it
    gate_smem = stage.pop(0) if has_res else None

    def pipeline(body, context):
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(k_iters,), memory_registers=40,
          in_specs=[
              plgpu.BlockSpec((tile_m, TILE_K), lambda kk: (0, kk),
                              transforms=_swizzled(TILE_K, jnp.int8), memory_space=plgpu.SMEM),
              plgpu.BlockSpec((cta_n, TILE_K // 2), lambda kk: (0, kk),
                              transforms=_swizzled(TILE_K // 2, jnp.int8),
                              memory_space=plgpu.SMEM),
              plgpu.BlockSpec((1, box), lambda kk: (kk, 0), memory_space=plgpu.SMEM)],
          wg_axis="wg", num_compute_wgs=compute_wgs, max_concurrent_steps=steps,
          compute_context=context)

    ignore = lambda *_, **__: None

    @functools.partial(pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(
        a_gmem, codes_gmem, mult_gmem), collective_axes="wg")
    def _scope(allocs):
      wg = lax.axis_index("wg")
      rows = pl.ds(wg * ROWS, ROWS)

      compute = wg < compute_wgs   # the memory warpgroup is the last
      if has_lr:   # as if a tile before the first were done with lr_smem
        pl.when(compute)(lambda: plgpu.barrier_arrive(both))

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
      def _tiles(info):   # a pipeline per tile
        (lin,) = info.index
        m_idx, n_idx = plgpu.planar_snake(lin, (m_iters, n_iters), WG_DIMS.index(grid_minor),
                                          grid_tile_width)
        m_slice = pl.ds(m_idx * tile_m, tile_m)
        n_slice = pl.ds(n_idx * cta_n, cta_n)   # of the output
        w_col = start + n_idx * cta_n
        w_slice = pl.ds(w_col, cta_n)            # of the weight-side operands
        # the multiplier box: the CTA's rows, within N (the last tile's sit at its end)
        box_start = jnp.minimum(w_col, n_all - box)
        mult_rows = pl.ds(w_col - box_start + wg * ROWS, ROWS)
        bar = lambda i: barriers.at[per_wg * wg + i]

        def context(eval_pipeline):
          # profiled regions (profile_dir): the copies' issue and the barrier (here or inside
          # the K loop, copies_at), the K loop, the epilogue
          if copies_at is None:
            copies()

          def accumulate(acc):
            eval_pipeline(acc)
            return acc[...]

          with jax.named_scope("k_loop"):
            acc = pl.run_scoped(accumulate, plgpu.ACC((ROWS, tile_m), jnp.int32))
          with jax.named_scope("epilogue"):
            epilogue(acc)

        def copies():   # the epilogue's operands into shared memory
          with jax.named_scope("scale_copies"):
            plgpu.copy_gmem_to_smem(sa_gmem.at[m_slice], sa_smem.at[wg], bar(0))
            plgpu.copy_gmem_to_smem(sw_gmem.at[w_slice].at[rows], sw_smem.at[wg], bar(1))
          if has_lr:  # lr [tile_m, r] is every warpgroup's: the first loads it once each
            with jax.named_scope("lr_barrier"):  # warpgroup's epilogue is done with the
              plgpu.barrier_wait(both)           # previous tile's (all wait: each observes
                                                 # a phase before arriving on the next)
          with jax.named_scope("epilogue_copies"):
            epilogue_copies()

        def epilogue_copies():   # the epilogue's operands but the scales
          if has_lr:
            pl.when(wg == 0)(lambda: plgpu.copy_gmem_to_smem(lr_gmem.at[m_slice], lr_smem,
                                                             barriers.at[2]))
            plgpu.copy_gmem_to_smem(up_gmem.at[w_slice].at[rows], up_smem.at[wg], bar(3))
          if has_bias:
            plgpu.copy_gmem_to_smem(bias_gmem.at[w_slice].at[rows], bias_smem.at[wg], bar(4))
          if has_rmax:  # the GELU tiles' (where the maxima are computed)
            pl.when(n_idx * cta_n >= gelu_from)(lambda: plgpu.copy_gmem_to_smem(
                rinv_gmem.at[pl.ds(n_idx * cta_n - gelu_from, cta_n)].at[rows],
                rinv_smem.at[wg], bar(5)))
          if has_res:  # r's tile into the output staging, once the last tile's store read it
            plgpu.copy_gmem_to_smem(gate_gmem.at[n_slice].at[rows], gate_smem.at[wg], bar(6))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.copy_gmem_to_smem(res_gmem.at[m_slice, n_slice].at[:, rows],
                                    out_smem.at[wg], bar(7))

        def epilogue(acc):   # the tile's output from its accumulator
          plgpu.barrier_wait(bar(0))
          plgpu.barrier_wait(bar(1))
          total = scaled(acc, sa_smem.at[wg], sw_smem.at[wg], token_axis=1)
          if has_lr:
            plgpu.barrier_wait(barriers.at[2])
            plgpu.barrier_wait(bar(3))
            total = _wgmma_onto(total, lambda acc_ref: plgpu.wgmma(
                acc_ref, up_smem.at[wg], lr_smem.transpose((1, 0))), interpret)
            plgpu.barrier_arrive(both)   # done with lr_smem
          if has_bias:
            plgpu.barrier_wait(bar(4))
            total = plus_bias(total, bias_smem.at[wg], token_axis=1)

          def row_max():
            # the next layer's per-token maxima over these 64 columns, from the stored
            # tile read back tokens x columns: a reduction within each warp (over the
            # accumulator's rows it would cross warps, through scratch shared by the
            # warpgroups). ~2 of the GELU tile's ~7.5-kilocycle epilogue (H100, 2026-12-07,
            # profile_w4a8_tiles.py --row-max); in 128- or 64-token steps no faster.
            plgpu.barrier_wait(bar(5))
            y_t = plgpu.load(out_smem.at[wg], layout=plgpu.Layout.WGMMA)
            v = scaled_rows(y_t.astype(jnp.float32), rinv_smem.at[wg], token_axis=0)
            rmax_smem.at[wg][...] = lax.bitcast_convert_type(
                jnp.max(act_rowscaled.abs_bits(v), axis=1), jnp.float32)
            plgpu.commit_smem()
            group = (n_idx * cta_n - gelu_from) // ROWS + wg
            plgpu.copy_smem_to_gmem(rmax_smem.at[wg], rmax_gmem.at[group, m_slice])

          def store(gelu):
            y = total.astype(jnp.bfloat16)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            if has_res:
              plgpu.barrier_wait(bar(6))
              plgpu.barrier_wait(bar(7))
              y = _residual_sum(out_smem.at[wg].transpose((1, 0)), gate_smem.at[wg], y)
            out_smem.at[wg].transpose((1, 0))[...] = (_gelu(y, packed_gelu, interpret) if gelu
                                                      else y)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[m_slice, n_slice].at[:, rows])
            if gelu and has_rmax:
              with jax.named_scope("row_max"):
                row_max()

          store_with_gelu(store, gelu_from, n_idx * cta_n)

        def body(idx, a_smem, codes_smem, mult_smem, acc):
          # the wgmma reads w from registers until it completes: waited before the next
          # step's expansion writes them again
          w = _expand(codes_smem.at[rows], mult_smem.at[0, mult_rows], interpret)
          if interpret:  # interpret mode takes wgmma operands from refs only
            stage[0][wg] = w
            w = stage[0].at[wg]
          plgpu.wgmma(acc, w, a_smem.transpose((1, 0)))
          if copies_at is not None:   # issued under the MMA
            pl.when(idx[0] == min(copies_at, k_iters - 1))(copies)
          plgpu.wgmma_wait(0)
          return acc

        pipeline(body, context)(a_gmem.at[m_slice], codes_gmem.at[w_slice],
                                mult_gmem.at[:, pl.ds(box_start, box)], allocations=allocs)

      if has_lr:   # the last tile's arrivals observed
        pl.when(compute)(lambda: plgpu.barrier_wait(both))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  # the tiling and the problem [M, K] x [K, N] in the name: a profile tells the layers apart
  order = f"b{grid_minor}{grid_tile_width}"
  kernel.__name__ = (f"w4a8_t_m{tile_m}s{steps}{'' if compute_wgs == 2 else 'w3'}"
                     f"{'' if gelu_from is None else 'gelu'}"
                     f"{'' if order == f'bn{GRID_TILE_WIDTH}' else order}"
                     f"_{m_out}x{k}x{n}{'' if cols is None else f'at{start}'}")
  args = [a, lax.bitcast_convert_type(codes, jnp.int8), w_mult, sa, sw.astype(jnp.float32)]
  if has_lr:
    args += [lr.astype(jnp.bfloat16), up_t.astype(jnp.bfloat16)]
  if has_bias:
    bias = bias_operand(bias)
    args.append(bias)
  if has_res:
    r = residual[0]
    args += [r if m == m_out else jnp.pad(r, ((0, m - m_out), (0, 0))),
             residual[1].astype(jnp.float32)]
  out_type = [jax.ShapeDtypeStruct((m, n), jnp.bfloat16)]
  if has_rmax:
    args.append(row_max_inv.astype(jnp.float32))
    # whole tiles of tokens: the last tile's copy stays inside the array (past M, a maxima
    # copy of a ragged last tile changed the FLUX.1 step's values on an H100, 2026-12-05)
    out_type.append(jax.ShapeDtypeStruct(((n - gelu_from) // ROWS, m_iters * tile_m),
                                         jnp.float32))
  lr_cols = rank if has_lr else 64
  lr_rows = lambda r: r if has_lr else 8
  # five regions a tile per warpgroup, six with the maxima (profile_space counts regions),
  # events past it dropped
  profiled = {} if profile_dir is None else dict(
      profile_dir=profile_dir, profile_bounds_check=True,
      profile_space=(5 + has_rmax) * pl.cdiv(m_iters * n_iters, num_sms) + 2)
  wgs = compute_wgs
  outs = plgpu.kernel(
      kernel, out_type=out_type,
      grid=(num_sms,), grid_names=("sm",), num_threads=wgs + 1, thread_name="wg",
      scratch_types=[
          plgpu.SMEM((wgs, tile_m, ROWS), jnp.bfloat16,
                     transforms=_swizzled(ROWS, jnp.bfloat16)),
          plgpu.SMEM((wgs, tile_m), jnp.float32),
          plgpu.SMEM((wgs, ROWS), jnp.float32),
          plgpu.SMEM((lr_rows(tile_m), lr_cols), jnp.bfloat16,
                     transforms=_swizzled(lr_cols, jnp.bfloat16)),
          plgpu.SMEM((wgs, lr_rows(ROWS), lr_cols), jnp.bfloat16,
                     transforms=_swizzled(lr_cols, jnp.bfloat16)),
          plgpu.SMEM((wgs, ROWS), bias.dtype if has_bias else jnp.float32),
          plgpu.SMEM((wgs, ROWS if has_rmax else 8), jnp.float32),
          plgpu.SMEM((wgs, tile_m if has_rmax else 8), jnp.float32),
          plgpu.Barrier(num_barriers=per_wg * wgs),
          plgpu.Barrier(num_arrivals=wgs),
      ] + ([plgpu.SMEM((wgs, ROWS), jnp.float32)] if has_res else [])   # the gate
        + ([plgpu.SMEM((wgs, ROWS, TILE_K), jnp.int8, transforms=_swizzled(TILE_K, jnp.int8))]
           if interpret else []),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
          approx_math=gelu_from is not None, **profiled),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*args)
  if has_rmax:
    return outs[0][:m_out], outs[1][:, :m_out]
  return outs[0][:m_out]


def residual_rounded(r: jax.Array, gate: jax.Array, y: jax.Array) -> jax.Array:
  """The epilogue's ``residual``, in jnp: ``qlinear.residual_sum``'s op-by-op semantics
  spelled out (bf16 r, gate, y broadcastable to r): the product gate * y, exact in f32,
  rounded to bf16 by ``round_bf16_bits`` (a NaN product kept), then the sum rounded once.
  The same bits as jnp's ``r + gate * y`` on the CPU; on a GPU XLA may round it otherwise."""
  p = gate.astype(jnp.float32) * y.astype(jnp.float32)
  p = jnp.where(p != p, p, qlinear.round_bf16_bits(p))
  return (r.astype(jnp.float32) + p).astype(jnp.bfloat16)


def _residual_sum(r_ref, gate_ref, y):
  """``residual_rounded(r, gate, y)`` of a transposed output tile y (bf16 [ROWS, tile_m],
  the WGMMA layout, output channels on axis 0): r_ref its residual tile (a transposed view of
  the staged [tile_m, ROWS] tile), gate_ref the f32 gate of its channels [ROWS]."""
  r = plgpu.load(r_ref, layout=plgpu.Layout.WGMMA)
  gate = plgpu.load(gate_ref, layout=plgpu.Layout.WGMMA.reduce(1))
  out = residual_rounded(r, lax.broadcast_in_dim(gate, y.shape, [0]), y)
  plgpu.commit_smem()   # every thread has read r before the tile is overwritten
  return out


def _expand(codes_ref, mult_ref, interpret: bool) -> jax.Array:
  """int4_2l weights of one pipeline step as int8 products m * q.

  codes_ref: int8 [R, 64], two 64-groups packed as in ``formats.pack`` (byte j of a group's
  32: element j in the low nibble, 32 + j in the high one); mult_ref: uint8 [R], the step's
  multiplier byte per row (``formats.pack_multipliers``: m - 1 of the first group low, of the
  second high). Returns int8 [R, 128] (R a multiple of 64).

  On the GPU each thread works on its 32-bit registers of 4 packed bytes in the wgmma 8-bit
  layout, where a byte's two nibbles land in the same thread's registers of the expanded
  tile (16 columns apart). With L the low nibbles (n, 0..15) of 4 bytes and S their sign bits
  (q = n - 16 s), the word m L + (256 - 16 m) S holds each byte's m * q in two's complement:
  every byte's term m q + 256 s lies in [0, 255], so no carry crosses a byte. The same for
  the high nibbles: 4 products per integer multiply-add.
  """
  rows = codes_ref.shape[0]
  if interpret:
    u = lax.bitcast_convert_type(codes_ref[...], jnp.uint8).astype(jnp.int32)
    q = lambda nib: jnp.where(nib >= 8, nib - 16, nib)
    lo, hi = q(u & 15), q(u >> 4)
    mb = mult_ref[...].astype(jnp.int32)[:, None]
    m0, m1 = (mb & 15) + 1, (mb >> 4) + 1
    return jnp.concatenate([lo[:, :32] * m0, hi[:, :32] * m0, lo[:, 32:] * m1,
                            hi[:, 32:] * m1], axis=1).astype(jnp.int8)
  layout = plgpu.Layout.WGMMA_8BIT

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), layout), return_type=plgpu.ShapeDtypeStruct(
      (rows, 128), jnp.int8, layout=layout))
  def expand(_, m_ref, frag):
    i32 = ir.IntegerType.get_signless(32)
    const = lambda v: arith.constant(i32, v)
    lo, hi = np.empty_like(frag.registers), np.empty_like(frag.registers)
    for idx, reg_idx in zip(frag.layout.thread_idxs(frag.shape),
                            np.ndindex(frag.registers.shape)):
      group = reg_idx[1] // 2   # axis 1 of the registers: 16-byte column tiles
      byte = arith.extui(i32, memref.load(m_ref, [idx[0]]))
      m = arith.addi(arith.andi(arith.shrui(byte, const(4 * group)), const(15)), const(1))
      c = arith.subi(const(256), arith.shli(m, const(4)))
      word = mgpu.utils.bitcast(frag.registers[reg_idx], i32)
      out = []
      for shift in (0, 4):
        nib = arith.andi(arith.shrui(word, const(shift)), const(0x0F0F0F0F))
        sign = arith.andi(arith.shrui(word, const(shift + 3)), const(0x01010101))
        out.append(arith.addi(arith.muli(m, nib), arith.muli(c, sign)))
      reg_t = frag.registers[reg_idx].type
      lo[reg_idx] = mgpu.utils.bitcast(out[0], reg_t)
      hi[reg_idx] = mgpu.utils.bitcast(out[1], reg_t)
    # expanded column tiles: group 0's low nibbles (elements 0-31), its high ones (32-63),
    # then group 1's
    regs = np.concatenate([lo[:, :2], hi[:, :2], lo[:, 2:], hi[:, 2:]], axis=1)
    return mgpu.FragmentedArray(_registers=regs, _layout=frag.layout, _is_signed=True)

  return expand(mult_ref, plgpu.load(codes_ref, layout=layout))
