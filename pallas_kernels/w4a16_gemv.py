"""Weight-only int4_2l GEMV for a few rows (Pallas, Triton backend): FLUX's modulation linears.

A weight-only (W4A16) layer's product, as ``qlinear.weight_only_product`` defines it: the
weight dequantized to bf16, ``w[n, k] = bf16(q[n, k] * (m[n, g] * unit[n]))``, times the bf16
input with f32 accumulation. Its callers in FLUX (the modulation linears, ``models.flux.
quant_config``) take one vector per image, M = batch, or, with the sampling loop's
modulations computed before it (``sampling.sample(hoist_modulation=True)``), one per image and
step (FLUX.1-dev's 28 steps: M = 28 a image). XLA computes that from the jnp definition as a
reduction over the dequantized weight (46 us per 3072 -> 18432 layer at M = 1 on an H200,
against 28 us for the bf16 GEMV) and, from M = 2, as a GEMM on a materialized weight (173
us). This kernel reads the packed codes once: N / block_n programs, each owning block_n
output features, step over K ``groups_per_step`` 64-groups at a time:

  b = codes[n, cols]                       uint8 [block_n, 32 groups_per_step], both nibbles
  s = f32(m[n, g]) * unit[n]               dequantize's scale, broadcast over its 32 bytes
  w_lo, w_hi = bf16(f32(q) * s)            q: b's low / high nibbles (``formats.pack``: a
                                           64-group's first 32 values, then its last 32)
  M = 1:  acc[n] += sum_cols w_lo * x_lo[cols] + w_hi * x_hi[cols]      (CUDA cores)
  M > 1:  acc[r, n] += x_lo[r, cols] . w_lo[n, cols] + x_hi . w_hi       (bf16 tensor cores,
                                                              rows padded to a multiple of 16)

Past ``ROW_BLOCK`` rows (padded to a multiple of it) a second grid axis takes the row blocks,
each program reading its weight tile again (from L2, after the first: FLUX.1-dev's largest
modulation weight is 28 MB packed).

where x_lo / x_hi [M, K/2] are x's groups' first / last halves (split before the call).
At M = 1 (by default) the same arithmetic runs on 4-D tiles shaped by the format
(``_grouped_kernel``: codes [block_n, K/128, 2, 32], x [1, K/128, 2, 64], both free reshapes),
where a group's scale broadcasts over its bytes and x's halves are slices of one ref: 20-28%
faster than the 2-D tiles at FLUX's modulation shapes (H100, 2026-12-06; ``TILING_GROUPED``).

Numerics: the weight values are the reference's bit for bit; the f32 sums are ordered
differently than XLA's dot (float agreement, not bits).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from svdq_jax.pallas_kernels.w4a4 import _MIN_DOT, GROUP, HALF, _unpack

# rows of x one call takes: past it XLA's GEMM on the dequantized weight is faster (H200,
# 2026-12-05, scripts/bench_gemv.py, 3072 -> 18432 / 9216: the layer 0.086 / 0.053 ms against
# XLA's 0.115 / 0.062 at 112 rows, 0.159 / 0.085 against 0.124 / 0.067 at 224)
MAX_ROWS = 128
ROW_BLOCK = 64       # rows of x a program takes: more rows, more programs over the same weight
# (block_n, groups_per_step, num_warps, num_stages), the fastest of the sweeps at K = 3072,
# N = 9216 and 18432 on an H200 (scripts/bench_gemv.py; kernel alone, us): the CUDA-core path
# at M = 1 (2026-12-03) 22.0 / 35.4 (16 features x 8 groups 36.5 / 22.1, 32 x 4 27.2 / 42.0,
# 64 x 4 37.2 / 51.7).
TILING_ROWS = (16, 16, 4, 3)
# The tensor-core path by a program's rows (up to): 16 rows at M = 2 (2026-12-03) 23.6 / 37.4
# (64 x 4 x 4 stages 29.8 / 40.8, 16 x 8 37.4 / 62.6; at M = 16, 2026-12-05, still the
# fastest: 22.8 / 36.2 against 32 x 2 25.5 / 37.6, 64 x 4 28.4 / 39.1); 32 rows at M = 28
# (FLUX.1-dev's hoisted modulations, 2026-12-05) 37.1 / 50.4 (32 x 4 39.9 / 63.6, 64 x 2
# 37.3 / 52.6, 32 x 2 40.2 / 65.5, 32 x 8 43.8 / 67.6, 16 x 8 46.1 / 74.3); 64 rows at M = 56
# and 112 (the same day) 31.1 / 52.9 and 51.3 / 84.5 (64 x 2 38.2 / 50.2 and 50.2 / 81.3:
# slower at N = 9216, M = 56; more groups a step slower at both).
TILING_MMA = ((16, (32, 8, 4, 3)), (32, (64, 4, 4, 3)), (ROW_BLOCK, (32, 2, 4, 3)))
# The one-row path on 4-D tiles (``_grouped_kernel``), the default at M = 1. H100, 2026-12-06
# (scripts/bench_gemv.py, three runs on one machine; kernel alone, us, 3072 -> 18432 / 9216):
# 4 features x 16 groups, 2 warps, 3 stages 26.9 / 14.5 (2 or 4 stages the same) against the
# 2-D path's TILING_ROWS 33.3-33.8 / 19.8-20.0; 8 x 16 x 2 27.4 / 16.0, 8 x 16 x 4 30.2 /
# 16.2, 16 x 16 x 4 31.3 / 18.5, 2 x 16 x 2 28.3 / 15.3, one warp 30.4 / 16.2-17.5, 8 groups
# a step 29.4 / 16.1; summing elementwise across steps and reducing once at the end the same
# or slower (26.9 / 14.5 at 4 x 16 x 2; 29.7 / 16.8 with one warp).
TILING_GROUPED = (4, 16, 2, 3)
_grouped_on = True


def set_grouped(on: bool) -> None:
  """Whether one-row products run ``_grouped_kernel`` (4-D tiles, TILING_GROUPED; the
  default) or the 2-D CUDA-core path (as before 2026-12-06's thirty-ninth session;
  scripts/bench_flux_full.py --rows-gemv). The same weight values; the f32 sums in another
  order."""
  global _grouped_on
  _grouped_on = bool(on)


def _rows_and_tiling(m: int, mma: bool) -> tuple[int, tuple]:
  """A program's rows of x (padded to a dot's smallest M, at most ROW_BLOCK; 1 on the CUDA
  cores) and the default (block_n, groups_per_step, num_warps, num_stages) for them."""
  if not mma:
    return 1, TILING_ROWS
  rows = min(-(-m // _MIN_DOT) * _MIN_DOT, ROW_BLOCK)
  return rows, next(t for most, t in TILING_MMA if rows <= most)


# The codes' int -> f32 conversions: at M = 1 the kernel moves its 4-bit weights at 0.6-0.8
# TB/s whatever the tiling (docs/benchmarks, 2026-12-03 / -05). ``_bit_unpack`` makes each
# code's f32 by bit operations and one f32 subtraction instead of a conversion: measured on an
# H100 (2026-12-06, scripts/bench_gemv.py '+bits' tilings), 5-10% faster at M = 1 and 2, at M =
# 28 faster at N = 9216 and slower at 18432 (one tiling); the FLUX.1 step 88.10 against 88.25
# ms. So the default; the conversions stay as the switch (bench_flux_full.py
# --int-convert-gemv). Still ~0.85 TB/s at best: the conversions were not what holds it.
_bit_unpack = True


def set_bit_unpack(on: bool) -> None:
  """Whether the kernel makes the codes' f32 values by bit operations (``_signed_f32``: the
  code plus 8 in the mantissa of 2^23, minus 2^23 + 8; the default) or by integer-to-float
  conversions. The same values (exact either way)."""
  global _bit_unpack
  _bit_unpack = bool(on)


def _signed_f32(b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """uint8 [R, C] packed signed nibbles -> (low, high) f32 [R, C], exactly ``_unpack``'s int4
  values: a nibble n (two's complement q) XOR 8 is q + 8 in 0..15; in the mantissa of 2^23
  (bits 0x4B000000) that is 2^23 + q + 8, and subtracting 2^23 + 8 leaves q, all exact."""
  u = b.astype(jnp.uint32)
  f = lambda nib: jax.lax.bitcast_convert_type((nib ^ 8) | 0x4B000000, jnp.float32) - 8388616.0
  return f(u & 0xF), f(u >> 4)


_enabled = True


def set_enabled(on: bool) -> None:
  """Whether ``qlinear.apply`` runs eligible weight-only layers here (the default) or leaves
  them to XLA's fusion of the jnp reference (scripts/bench_flux_full.py --xla-gemv)."""
  global _enabled
  _enabled = bool(on)


def _takes_grouped(m: int) -> bool:
  """Whether ``layer_product`` runs an m-row product on the 4-D tiles: one row, while
  ``set_grouped`` and ``set_bit_unpack`` (the 4-D path makes its codes by bit operations)."""
  return m == 1 and _grouped_on and _bit_unpack


def supports(weight_format: str, m: int, k: int, n: int) -> bool:
  """Whether ``gemv`` takes an [m, k] input to a weight-only layer of this format."""
  tile_n = (TILING_GROUPED if _takes_grouped(m) else _rows_and_tiling(m, m > 1)[1])[0]
  return (weight_format == "int4_2l" and 0 < m <= MAX_ROWS and k % (2 * GROUP) == 0
          and n % tile_n == 0)


def supports_layer(layer, m: int, dtype) -> bool:
  """Whether a weight-only QuantizedLinear's product for an [m, K] input of ``dtype`` runs
  here (bf16 inputs only: the reference dequantizes the weight to the input's dtype; and
  while ``set_enabled``)."""
  return (_enabled and jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and layer.act_format is None
          and supports(layer.weight_format, m, layer.in_features, layer.out_features))


def layer_product(layer, xs: jax.Array, *, interpret: bool = False) -> jax.Array:
  """``qlinear.weight_only_product`` of an int4_2l layer: xs bf16 [M, K] -> f32 [M, N]."""
  return gemv(xs, layer.qweight, layer.wscale, layer.wcscale, bit_unpack=_bit_unpack,
              grouped=_takes_grouped(xs.shape[0]), interpret=interpret)


def _bf16_values(v: jax.Array, interpret: bool) -> jax.Array:
  """f32 v rounded to bf16 values (to nearest even), kept f32. In interpret mode as
  ``reduce_precision``: XLA removes an f32 -> bf16 -> f32 round trip as excess precision."""
  if interpret:
    return jax.lax.reduce_precision(v, exponent_bits=8, mantissa_bits=7)
  return v.astype(jnp.bfloat16).astype(jnp.float32)


def _kernel(xlo_ref, xhi_ref, c_ref, m_ref, u_ref, o_ref, *, groups_per_step, mma, bit_unpack,
            interpret):
  bn, kh = c_ref.shape
  rows = xlo_ref.shape[0]
  cols = groups_per_step * HALF        # code bytes per step
  pairs = groups_per_step // 2         # multiplier bytes per step (two groups each)
  unit = u_ref[...][:, None, None, None]
  second = jnp.arange(2)[None, None, :, None] == 1

  def step(i, acc):
    at = pl.ds(pl.multiple_of(i * cols, cols), cols)
    mb = m_ref[:, pl.ds(pl.multiple_of(i * pairs, pairs), pairs)]
    m = jnp.where(second, (mb >> 4)[:, :, None, None], (mb & 0xF)[:, :, None, None])
    s = (m.astype(jnp.float32) + 1.0) * unit                    # [bn, pairs, 2, 1]
    s = jnp.broadcast_to(s, (bn, pairs, 2, HALF)).reshape(bn, cols)
    if bit_unpack:
      lo, hi = _signed_f32(c_ref[:, at])
    else:
      lo, hi = (v.astype(jnp.float32) for v in _unpack(c_ref[:, at], signed=True))
    w_lo = _bf16_values(lo * s, interpret)
    w_hi = _bf16_values(hi * s, interpret)
    if mma:
      return acc + (plgpu.dot(xlo_ref[:, at], w_lo.astype(jnp.bfloat16), trans_b=True)
                    + plgpu.dot(xhi_ref[:, at], w_hi.astype(jnp.bfloat16), trans_b=True))
    return acc + jnp.sum(w_lo * xlo_ref[pl.ds(0, 1), at].astype(jnp.float32)
                         + w_hi * xhi_ref[pl.ds(0, 1), at].astype(jnp.float32), axis=1)

  acc = jnp.zeros((rows, bn) if mma else (bn,), jnp.float32)
  acc = jax.lax.fori_loop(0, kh // cols, step, acc)
  if mma:
    o_ref[...] = acc
  else:
    o_ref[0, :] = acc


def _grouped_kernel(x_ref, c_ref, m_ref, u_ref, o_ref, *, pairs_per_step, interpret):
  """The CUDA-core path (one row) on tiles shaped by the format: x_ref bf16 [1, P, 2, 64]
  (P = K/128 multiplier bytes, two 64-groups each), c_ref uint8 [bn, P, 2, 32], m_ref uint8
  [bn, P]: each 64-group's scale broadcasts over its 32 code bytes and a group's two halves
  are slices of x, where the 2-D path forms both by reshapes of [bn, cols] tiles."""
  bn = c_ref.shape[0]
  pps = pairs_per_step
  unit = u_ref[...][:, None, None, None]
  second = jnp.arange(2)[None, None, :, None] == 1

  def step(i, acc):
    at = pl.ds(pl.multiple_of(i * pps, pps), pps)
    mb = m_ref[:, at][:, :, None, None]
    s = (jnp.where(second, mb >> 4, mb & 0xF).astype(jnp.float32) + 1.0) * unit
    lo, hi = _signed_f32(c_ref[:, at, :, :])                    # [bn, pps, 2, 32]
    w_lo = _bf16_values(lo * s, interpret)
    w_hi = _bf16_values(hi * s, interpret)
    x_lo = x_ref[:, at, :, pl.ds(0, HALF)].astype(jnp.float32)  # [1, pps, 2, 32]
    x_hi = x_ref[:, at, :, pl.ds(HALF, HALF)].astype(jnp.float32)
    # one axis at a time, as Pallas lowers jnp.sum(axis=(1, 2, 3)) (the same Triton IR, the
    # double negation included), which under an explicit-axes mesh fails in jax 0.11.2 (its
    # lowering keeps the 4-D sharding on the 3-D partial sums)
    t = jnp.sum(w_lo * x_lo + w_hi * x_hi, axis=3)
    t = jnp.sum(-(-t), axis=2)
    return acc + jnp.sum(-(-t), axis=1)

  acc = jax.lax.fori_loop(0, m_ref.shape[1] // pps, step, jnp.zeros((bn,), jnp.float32))
  o_ref[0, :] = acc


def _grouped(x, codes, mults, unit, *, block_n, groups_per_step, num_warps, num_stages,
             interpret):
  """``gemv``'s one-row product on ``_grouped_kernel``: f32 [1, N]."""
  k, n = x.shape[1], codes.shape[0]
  pairs = k // (2 * GROUP)
  return pl.pallas_call(
      functools.partial(_grouped_kernel, pairs_per_step=groups_per_step // 2,
                        interpret=interpret),
      grid=(n // block_n,),
      in_specs=[pl.BlockSpec((1, pairs, 2, GROUP), lambda i: (0, 0, 0, 0)),
                pl.BlockSpec((block_n, pairs, 2, HALF), lambda i: (i, 0, 0, 0)),
                pl.BlockSpec((block_n, pairs), lambda i: (i, 0)),
                pl.BlockSpec((block_n,), lambda i: (i,))],
      out_specs=pl.BlockSpec((1, block_n), lambda i: (0, i)),
      out_shape=jax.ShapeDtypeStruct((1, n), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="svdq_w4a16_gemv")(
          x.astype(jnp.bfloat16).reshape(1, pairs, 2, GROUP),
          codes.reshape(n, pairs, 2, HALF), mults, unit.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("block_n", "groups_per_step", "num_warps",
                                             "num_stages", "mma", "bit_unpack", "grouped",
                                             "interpret"))
def gemv(x: jax.Array, codes: jax.Array, mults: jax.Array, unit: jax.Array, *,
         block_n: int | None = None, groups_per_step: int | None = None,
         num_warps: int | None = None, num_stages: int | None = None,
         mma: bool | None = None, bit_unpack: bool = True, grouped: bool = False,
         interpret: bool = False) -> jax.Array:
  """f32 [M, N] = bf16(x) . w^T with f32 accumulation, w the int4_2l weight at bf16.

  Args:
    x: [M, K] (any float dtype; rounded to bf16 as the reference's matmul does), M <=
      MAX_ROWS (128).
    codes: uint8 [N, K/2], ``formats.pack``'s layout. mults: uint8 [N, K/128] (K/64
      multipliers, ``formats.pack_multipliers``). unit: f32 [N] the row units.
    mma: the products on the bf16 tensor cores (rows padded to a multiple of 16) or, for
      M = 1 only, on the CUDA cores; None: by M. block_n: output features per program (a
      power of two dividing N); groups_per_step: 64-groups per loop step (a power of two >= 2
      dividing K/64); num_warps, num_stages: Triton's. None: ``TILING_ROWS``, or
      ``TILING_MMA`` by a program's rows (groups_per_step reduced to what divides K/64).
    bit_unpack: the codes' f32 values by bit operations (``_signed_f32``), else by
      conversions; the same values. ``layer_product`` passes ``set_bit_unpack``'s choice.
    grouped: the CUDA-core path on 4-D tiles (``_grouped_kernel``; bit operations only);
      the same weight values, its sums in another order.
  """
  m, k = x.shape
  n = codes.shape[0]
  mma = m > 1 if mma is None else mma
  if m > 1 and not mma:
    raise ValueError(f"the CUDA-core path takes one row, got x {x.shape}")
  if not 0 < m <= MAX_ROWS:
    raise ValueError(f"the W4A16 GEMV takes x [M <= {MAX_ROWS}, K], got x {x.shape}")
  groups = k // GROUP
  rows, (tile_n, tile_groups, warps, stages) = _rows_and_tiling(m, mma)
  if grouped:
    tile_n, tile_groups, warps, stages = TILING_GROUPED
  block_n = tile_n if block_n is None else block_n
  if groups_per_step is None:   # the largest power of two up to the tiling's dividing K/64
    groups_per_step = math.gcd(tile_groups, groups)
  num_warps = warps if num_warps is None else num_warps
  num_stages = stages if num_stages is None else num_stages
  if not (k % (2 * GROUP) == 0 and n % block_n == 0):
    raise ValueError(f"the W4A16 GEMV takes x [M, K % 128 == 0] and N % {block_n} == 0, "
                     f"got x {x.shape}, N={n}")
  if codes.shape != (n, k // 2) or mults.shape != (n, groups // 2) or unit.shape != (n,):
    raise ValueError(f"int4_2l weight operands must be codes [N, K/2], multipliers "
                     f"[N, K/128], units [N] for K={k}; got {codes.shape}, {mults.shape}, "
                     f"{unit.shape}")
  if groups_per_step < 2 or groups_per_step & (groups_per_step - 1) or groups % groups_per_step:
    raise ValueError(f"groups_per_step={groups_per_step} must be a power of two >= 2 "
                     f"dividing K/64={groups}")
  if grouped:
    if mma or not bit_unpack:
      raise ValueError("the grouped path is the CUDA-core path (one row) with bit_unpack")
    return _grouped(x, codes, mults, unit, block_n=block_n, groups_per_step=groups_per_step,
                    num_warps=num_warps, num_stages=num_stages, interpret=interpret)
  padded = -(-m // rows) * rows
  halves = jnp.pad(x.astype(jnp.bfloat16), ((0, padded - m), (0, 0)))
  halves = halves.reshape(padded, groups, 2, HALF)
  y = pl.pallas_call(
      functools.partial(_kernel, groups_per_step=groups_per_step, mma=mma,
                        bit_unpack=bit_unpack, interpret=interpret),
      grid=(n // block_n, padded // rows),
      in_specs=[pl.BlockSpec((rows, k // 2), lambda i, j: (j, 0)),
                pl.BlockSpec((rows, k // 2), lambda i, j: (j, 0)),
                pl.BlockSpec((block_n, k // 2), lambda i, j: (i, 0)),
                pl.BlockSpec((block_n, groups // 2), lambda i, j: (i, 0)),
                pl.BlockSpec((block_n,), lambda i, j: (i,))],
      out_specs=pl.BlockSpec((rows, block_n), lambda i, j: (j, i)),
      out_shape=jax.ShapeDtypeStruct((padded, n), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="svdq_w4a16_gemv")(
          halves[:, :, 0].reshape(padded, k // 2), halves[:, :, 1].reshape(padded, k // 2),
          codes, mults, unit.astype(jnp.float32))
  return y[:m]


__all__ = ["MAX_ROWS", "ROW_BLOCK", "TILING_GROUPED", "TILING_MMA", "TILING_ROWS", "gemv",
           "layer_product", "set_bit_unpack", "set_enabled", "set_grouped", "supports",
           "supports_layer"]
