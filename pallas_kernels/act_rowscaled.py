"""Activation quantization for the row-scaled formats (Pallas, Triton backend).

Two passes over X [M, K] (bf16), each a grid of independent [block_m, block_k] tiles (many
programs in flight: the work is bound by HBM bandwidth, not by any tile's latency):

1. ``row_scales``: each tile's per-token max |x_hat|, x_hat = X * (1 / lambda) (the f32
   reciprocal, computed once by XLA: XLA itself rewrites X / lambda into this product, so
   writing it keeps kernel and reference bit-identical on every backend); a tile holding a
   NaN reports NaN. XLA reduces the [K / block_k, M] partial maxima to the token scales.
2. ``codes_and_lowrank``: each tile quantizes with its tokens' scales, writes the int8 codes and its
   part of the low-rank down projection X @ (L_down / lambda) (``qlinear.lowrank_down``; bf16
   operands, f32, tensor cores); XLA sums the [K / block_k, M, r] partials.

Reads X twice and writes int8 once (5 bytes per element), where XLA's fusions of the same
definition take 7 (docs/benchmarks; both passes over 512-2048 tokens at a time, so that the
second read came from L2, measured slower: 2026-12-05). X may be given as parts
(``qlinear.Gelu``, ``qlinear.Scaled``): each pass runs once per part, reading it where it lies
(through ``kernel_gelu`` for a GELU part, descaled to bf16 for an FP8 Scaled part), and the
parts' codes land in one [M, K] array. Per token:

  int8:    s = absmax * f32(1/127),  a = clip(round(x_hat * (1 / s)), -127, 127)
  int4_2l: s = unit = absmax * f32(1/112) (1 for an all-zero token), per 64-group
           m = clip(ceil(gmax * (1 / (7 unit))), 1, 16),
           q = clip(round(x_hat * (1 / (unit m))), -8, 7),   a = m q

exactly as ``formats.quantize`` (correctly rounded reciprocals, ties to even); a token holding
a NaN gets codes 0 and a NaN scale. Outputs are the operands of ``int8_hopper.int8_gemm``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from svdq_jax import formats, qlinear
from svdq_jax.pallas_kernels.w4a4 import (GROUP, _asm, _div, _pad_rank, _round_half_even,
                                           check_act_inputs)

ACT_FORMATS = formats.ROW_SCALED


def kernel_gelu(x: jax.Array, interpret: bool) -> jax.Array:
  """``qlinear.gelu_tanh`` as the kernel computes it: with the GPU's tanh.approx.f32, whose
  bf16-rounded output equals XLA's tanh's for every bf16 input (checked on an H200 for all
  65536, ``bench_rowscaled.py --parts``), at ~1/3 the time of libdevice's tanhf (FLUX's
  linear2 activation pass: 0.23 vs 0.71 ms, H200, 2026-12-03)."""
  if interpret:
    return qlinear.gelu_tanh(x)
  return qlinear.gelu_tanh(x, tanh=lambda u: _asm("tanh.approx.f32", u))


def _x_hat(x_ref, smooth_ref, row_ok, start, width, gelu_part, interpret, scale_ref=None):
  """(x, f32 x / lambda) [block_m, width]: columns start.. of the tile as loaded (descaled
  to bf16 for a Scaled part, through ``kernel_gelu`` for a GELU part) and times 1 / lambda
  (rows past M: 0)."""
  cols = pl.ds(start, width)
  # (Triton has no int -> FP8 cast for a 0 in the FP8 part's masked rows: they are left
  # undefined there, and every result of such a row is masked in turn)
  x = plgpu.load(x_ref.at[:, cols], mask=row_ok, other=0 if scale_ref is None else None)
  if scale_ref is not None:
    x = (x.astype(jnp.float32) * scale_ref[0]).astype(jnp.bfloat16)
  if gelu_part:
    x = kernel_gelu(x, interpret)
  v = x.astype(jnp.float32)
  if smooth_ref is not None:  # holds 1 / lambda
    v = v * smooth_ref[cols][None, :]
  return x, v


def _rows_ok(block_m, m):
  return ((pl.program_id(0) * block_m + jnp.arange(block_m)) < m)[:, None]


def _absmax_kernel(x_ref, smooth_ref, scale_ref, amax_ref, *, m, block_k, gelu, interpret):
  bm, width = x_ref.shape
  row_ok = _rows_ok(bm, m)
  amax = has_nan = jnp.zeros((bm,), jnp.float32)
  for start in range(0, width, block_k):  # unrolled: the loads are issued together
    _, v = _x_hat(x_ref, smooth_ref, row_ok, start, block_k, gelu, interpret, scale_ref)
    amax = jnp.maximum(amax, jnp.max(jnp.abs(v), axis=1))
    # max() drops NaN on the GPU: a block's NaN is reported on its own
    has_nan = jnp.maximum(has_nan, jnp.max(jnp.where(v != v, 1.0, 0.0), axis=1))
  plgpu.store(amax_ref, jnp.where(has_nan > 0, jnp.nan, amax), mask=row_ok[:, 0])


def _codes_kernel(x_ref, smooth_ref, scale_ref, s_ref, down_ref, a_ref, lr_ref, *, m,
                  act_format, block_k, gelu, interpret):
  bm, bk = x_ref.shape
  row_ok = _rows_ok(bm, m)
  scale = plgpu.load(s_ref, mask=row_ok[:, 0], other=1.0)
  is_nan = (scale != scale)[:, None]
  div_by = jnp.where((scale == 0) | is_nan[:, 0], 1.0, scale)[:, None]
  recip = lambda t: _div(jnp.ones_like(t), t, interpret)

  def codes(v):  # the products of formats.quantize, reciprocals correctly rounded
    if act_format == "int8":
      return jnp.clip(_round_half_even(v * recip(div_by), interpret), -127.0, 127.0)
    unit = div_by  # int4_2l: v is one 64-group
    gmax = jnp.max(jnp.abs(v), axis=1, keepdims=True)
    mult = jnp.clip(jnp.ceil(gmax * recip(7.0 * unit)), 1.0, float(formats.MULT_MAX))
    q = jnp.clip(_round_half_even(v * recip(unit * mult), interpret), -8.0, 7.0)
    return q * mult

  # int8 takes block_k columns at once, int4_2l one 64-group (its multiplier's span)
  width = block_k if act_format == "int8" else GROUP
  lr = None
  for start in range(0, bk, width):
    x, v = _x_hat(x_ref, smooth_ref, row_ok, start, width, gelu, interpret, scale_ref)
    a = jnp.where(is_nan, 0.0, codes(v))
    plgpu.store(a_ref.at[:, pl.ds(start, width)], a.astype(jnp.int32).astype(jnp.int8),
                mask=row_ok)
    if down_ref is not None:
      part = plgpu.dot(x.astype(jnp.bfloat16), down_ref[pl.ds(start, width), :])
      lr = part if lr is None else lr + part
  if down_ref is not None:
    plgpu.store(lr_ref, lr, mask=row_ok)


def row_max_partials(x: jax.Array, inv_smooth: jax.Array, group: int = GROUP) -> jax.Array:
  """f32 [C / group, M]: each ``group`` columns' per-token max |f32(x) * inv_smooth| (NaN
  where one is NaN) of x [M, C] (bf16) and inv_smooth f32 [C] (a layer's 1 / lambda): partial
  maxima of ``row_scales``, as a GEMM's epilogue computes them for the layer its output feeds
  (``w4a8_hopper.w4a8_gemm_t(row_max_inv=)``)."""
  m, c = x.shape
  bits = abs_bits(x.astype(jnp.float32) * inv_smooth)
  return lax.bitcast_convert_type(jnp.max(bits.reshape(m, c // group, group), axis=2).T,
                                  jnp.float32)


def abs_bits(v: jax.Array) -> jax.Array:
  """int32 bits of f32 |v|: ordered as the values, every NaN above inf, so that an integer
  max is the absmax with NaN propagated (a float max need not: on jax 0.11.2's CPU a max
  along the last axis of 64 or more rows skips NaNs, -inf for an all-NaN row: openxla/xla
  issue 21461)."""
  return lax.bitcast_convert_type(jnp.abs(v), jnp.int32)


def _tiling(parts, block_k: int, chunks: int) -> tuple[int, int]:
  """(block_k, chunks) reduced so that block_k (a power of two >= 64) and chunks divide every
  part's width and start (multiples of 64)."""
  k = 0
  for p in parts:
    k = math.gcd(k, p.x.shape[1] - p.start, p.start)
  while k % block_k:
    block_k //= 2
  block_k = max(block_k, GROUP)
  while (k // block_k) % chunks:
    chunks -= 1
  return block_k, chunks


def _specs(part, offset, inv_smooth, block_m, span):
  """Grid, the x tile's spec and the inputs (x, 1 / lambda, the part's scale) both passes
  share, for the part x[:, start:] of the layer's input, at its columns offset..
  (``qlinear.Part``)."""
  x, start = part.x, part.start
  grid = (pl.cdiv(x.shape[0], block_m), (x.shape[1] - start) // span)
  first, at = start // span, offset // span
  in_specs = [pl.BlockSpec((block_m, span), lambda i, j: (i, j + first))]
  args = [x]
  if inv_smooth is not None:
    in_specs.append(pl.BlockSpec((span,), lambda i, j: (j + at,)))
    args.append(inv_smooth)
  if part.scale is not None:
    in_specs.append(pl.BlockSpec((1,), lambda i, j: (0,)))
    args.append(jnp.reshape(part.scale, (1,)).astype(jnp.float32))
  return grid, in_specs, args


def _kernel_name(kind: str, part) -> str:
  """A pass's kernel name with the part's shape (tokens x columns; 'g': a GELU part, 's': a
  Scaled one), so that a profile tells the layers apart."""
  x = part.x
  return (f"{kind}_{x.shape[0]}x{x.shape[1] - part.start}{'g' if part.gelu else ''}"
          f"{'s' if part.scale is not None else ''}")


def _split_inputs(has_smooth, has_scale, refs):
  """(1 / lambda's ref or None, the part's scale's ref or None, the other refs)."""
  refs = list(refs)
  smooth = refs.pop(0) if has_smooth else None
  return smooth, (refs.pop(0) if has_scale else None), refs


def _offsets(parts):
  """Each part's first column in the layer's input."""
  widths = [p.x.shape[1] - p.start for p in parts]
  return [sum(widths[:i]) for i in range(len(parts))]


def row_scales(parts, inv_smooth, act_format, *, block_m, block_k, chunks, num_warps,
               interpret):
  """f32 [M] token scales (NaN for a token holding a NaN), from [K / span, M] partial maxima
  (a part's ``row_max`` where it has them: no pass over it); parts: ``qlinear.Part``s, x
  [M, K_i + start]; inv_smooth: f32 [K] 1 / lambda or None."""
  m = parts[0].x.shape[0]
  block_k, chunks = _tiling(parts, block_k, chunks)
  span = block_k * chunks
  partials = []
  for part, offset in zip(parts, _offsets(parts)):
    if part.row_max is not None:   # computed by the GEMM that wrote the part
      partials.append(part.row_max)
      continue
    grid, in_specs, args = _specs(part, offset, inv_smooth, block_m, span)

    def kernel(x_ref, *refs, part=part):
      sm, sc, (amax_ref,) = _split_inputs(inv_smooth is not None, part.scale is not None, refs)
      _absmax_kernel(x_ref, sm, sc, amax_ref, m=m, block_k=block_k, gelu=part.gelu,
                     interpret=interpret)

    partials.append(pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs,
        out_specs=pl.BlockSpec((None, block_m), lambda i, j: (j, i)),
        out_shape=jax.ShapeDtypeStruct((grid[1], m), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name=_kernel_name("svdq_absmax", part))(*args))
  partial = jnp.concatenate(partials) if len(partials) > 1 else partials[0]
  amax = jnp.where(jnp.isnan(partial).any(0), jnp.nan, jnp.max(partial, axis=0))
  return amax * formats.INV_127 if act_format == "int8" else formats.two_level_unit(amax)


def codes_and_lowrank(parts, inv_smooth, scale, down, act_format, *, block_m, block_k, chunks,
                      num_warps, interpret):
  """(int8 [M, K] codes, f32 [M, r] ``x @ down`` or None) for given token scales [M];
  parts as ``row_scales``; inv_smooth: f32 [K] 1 / lambda or None; down: bf16 [K, r] with
  lambda folded in (``qlinear.folded_down``) or None. A part after the first writes its
  columns of the first part's output in place (aliased), so the codes are never joined."""
  m = parts[0].x.shape[0]
  k = sum(p.x.shape[1] - p.start for p in parts)
  block_k, chunks = _tiling(parts, block_k, chunks)
  span = block_k * chunks
  down_p = None if down is None else _pad_rank(down, 1)
  a, lr = None, None
  for part, offset in zip(parts, _offsets(parts)):
    grid, in_specs, args = _specs(part, offset, inv_smooth, block_m, span)
    at = offset // span
    codes_spec = pl.BlockSpec((block_m, span), lambda i, j: (i, j + at))
    in_specs.append(pl.BlockSpec((block_m,), lambda i, j: (i,)))
    args.append(scale)
    out_shape = [jax.ShapeDtypeStruct((m, k), jnp.int8)]
    out_specs = [codes_spec]
    if down_p is not None:
      rp = down_p.shape[1]
      in_specs.append(pl.BlockSpec((span, rp), lambda i, j: (j + at, 0)))
      args.append(down_p)
      out_shape.append(jax.ShapeDtypeStruct((grid[1], m, rp), jnp.float32))
      out_specs.append(pl.BlockSpec((None, block_m, rp), lambda i, j: (j, i, 0)))
    aliases = {}
    if a is not None:   # the codes so far, written to in place
      in_specs.append(codes_spec)
      aliases = {len(args): 0}
      args.append(a)

    def kernel(x_ref, *refs, part=part, has_prev=a is not None):
      sm, sc, (s_ref, *rest) = _split_inputs(inv_smooth is not None, part.scale is not None,
                                             refs)
      down_ref = rest.pop(0) if down_p is not None else None
      if has_prev:
        rest.pop(0)
      a_ref, lr_ref = rest if down_p is not None else (*rest, None)
      _codes_kernel(x_ref, sm, sc, s_ref, down_ref, a_ref, lr_ref, m=m, act_format=act_format,
                    block_k=block_k, gelu=part.gelu, interpret=interpret)

    a, *part_lr = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_shape=out_shape, out_specs=out_specs,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name=_kernel_name(f"svdq_codes_{act_format}", part))(*args)
    if down_p is not None:
      lr = part_lr[0].sum(0) if lr is None else lr + part_lr[0].sum(0)
  return a, (lr[:, :down.shape[1]] if down is not None else None)


# The library's tiling of ``quantize_rows`` by K. H200, M = 4608, int8 codes + low-rank down,
# two runs (2026-12-02, 2026-12-03; docs/benchmarks/README.md): at K = 12288 / 15360 programs of
# [64 tokens, 4 x 128 columns] took 0.126-0.128 / 0.151-0.156 ms against 0.153-0.159 / 0.182-0.190
# for [64, 256] and 0.149-0.157 / 0.176-0.179 for XLA's fusions; at K = 3072 all tilings and XLA
# were within the timing's noise (0.05-0.06 ms).
WIDE_K = 8192
TILINGS = {"narrow": dict(block_m=64, block_k=256, chunks=1, num_warps=4),
           "wide": dict(block_m=64, block_k=128, chunks=4, num_warps=4)}


def tiling(k: int) -> dict:
  """``quantize_rows``' tile arguments for K input features."""
  return TILINGS["wide" if k >= WIDE_K else "narrow"]


def quantize_rows(x: jax.Array, smooth: jax.Array | None, down: jax.Array | None, *,
                  act_format: str = "int8", block_m: int = 64, block_k: int = 256,
                  chunks: int = 1, num_warps: int = 4, interpret: bool = False):
  """Per-token activation quantization with the low-rank down projection.

  Args:
    x: [M, K] (bf16 or f32), K a multiple of 64, or parts [M, K_i] (``qlinear.Gelu``) read
      where they lie (a part off the 64-column grid is joined by XLA first).
      smooth: f32 [K] or None.
    down: [K, r] or None. act_format: 'int8' or 'int4_2l'.
    block_m, block_k, chunks, num_warps: tiling: a program covers block_m tokens and
      chunks * block_k columns, loading block_k at a time (both reduced to divisors of K).

  Returns:
    (int8 [M, K] values, f32 [M] token scales, f32 [M, r] lr or None): identical to
    ``formats.row_scaled(formats.quantize(x_hat, act_format), act_format)`` and, up to
    f32 summation order, ``qlinear.lowrank_down(x, down, smooth)``.
  """
  check_act_inputs(_joined_shape(x), smooth, down)
  return quantize_rows_folded(x, *qlinear.folded_smoothing(smooth, down),
                              act_format=act_format, block_m=block_m, block_k=block_k,
                              chunks=chunks, num_warps=num_warps, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("act_format", "block_m", "block_k", "chunks",
                                              "num_warps", "interpret"))
def quantize_rows_folded(x: jax.Array, inv_smooth: jax.Array | None, down: jax.Array | None,
                         *, act_format: str = "int8", block_m: int = 64, block_k: int = 256,
                         chunks: int = 1, num_warps: int = 4, interpret: bool = False):
  """``quantize_rows`` on the layer's smoothing already folded into its operands
  (``qlinear.folded_smoothing``: inv_smooth f32 [K] = 1 / lambda, down bf16 [K, r] =
  L_down / lambda), as a loop computes them once (``qlinear.prepare``)."""
  if act_format not in ACT_FORMATS:
    raise ValueError(f"row-scaled activation kernel supports {ACT_FORMATS}, got {act_format!r}")
  check_act_inputs(_joined_shape(x), inv_smooth, down)
  parts = qlinear.input_parts(x)
  if any(p.start % GROUP or p.x.shape[1] % GROUP for p in parts):
    parts = qlinear.input_parts(qlinear.join(x))
  tiling = dict(block_m=block_m, block_k=block_k, chunks=chunks, num_warps=num_warps,
                interpret=interpret)
  scale = row_scales(parts, inv_smooth, act_format, **tiling)
  a, lr = codes_and_lowrank(parts, inv_smooth, scale, down, act_format, **tiling)
  return a, scale, lr


def _joined_shape(x) -> jax.ShapeDtypeStruct:
  """The shape of ``qlinear.join(x)`` ([M, K] for 2-D parts), after checking that each
  part is 2-D."""
  parts = qlinear.input_parts(x)
  if len(parts) > 1 and any(p.x.ndim != 2 for p in parts):
    raise ValueError("activation kernel takes x [M, K] or parts [M, K_i], got shapes "
                     f"{[p.x.shape for p in parts]}")
  return jax.ShapeDtypeStruct((*parts[0].x.shape[:-1], qlinear.input_width(x)),
                              qlinear.input_dtype(x))


def reference(x, smooth, down, act_format: str):
  """The jnp definition of ``quantize_rows`` (XLA fuses it: also the 'xla' activation path)."""
  return reference_folded(x, *qlinear.folded_smoothing(smooth, down), act_format)


def reference_folded(x, inv_smooth, down, act_format: str):
  """``reference`` on folded operands (``quantize_rows_folded``): the same operations."""
  x = qlinear.join(x)
  xf = x.astype(jnp.float32)
  if inv_smooth is not None:
    xf = xf * inv_smooth
  a, s = formats.row_scaled(formats.quantize(xf, act_format), act_format)
  return a, s, (None if down is None else qlinear.bf16_dot(x, down))


def _expand_kernel(q_ref, m_ref, o_ref):
  """[rows, pairs] of 64-group pairs: packed codes [rows, pairs, 64] and multiplier bytes
  [rows, pairs] -> int8 m * q [rows, pairs, 128]. Byte b of a group holds the group's values
  b (low nibble) and b + 32 (high nibble); a multiplier byte holds group 2j's m - 1 in its
  low nibble and 2j + 1's in its high nibble."""
  mb = m_ref[...].astype(jnp.int32)[:, :, None]
  for g in range(2):          # group 2j, then 2j + 1
    mult = ((mb >> (4 * g)) & 0xF) + 1
    packed = q_ref[:, :, pl.ds(g * GROUP // 2, GROUP // 2)].astype(jnp.int32)
    lo = packed & 0xF
    hi = (packed >> 4) & 0xF
    lo = jnp.where(lo >= 8, lo - 16, lo)   # two's complement nibbles
    hi = jnp.where(hi >= 8, hi - 16, hi)
    o_ref[:, :, pl.ds(g * GROUP, GROUP // 2)] = (lo * mult).astype(jnp.int8)
    o_ref[:, :, pl.ds(g * GROUP + GROUP // 2, GROUP // 2)] = (hi * mult).astype(jnp.int8)


@functools.partial(jax.jit, static_argnames=("block_n", "block_pairs", "num_warps", "interpret"))
def expand_two_level(qweight: jax.Array, mult: jax.Array, *, block_n: int = 16,
                     block_pairs: int = 4, num_warps: int = 2,
                     interpret: bool = False) -> jax.Array:
  """int4_2l weights as int8 products m * q (the int8 GEMM's operand), one pass.

  Args: qweight uint8 [N, K/2] packed codes, mult uint8 [N, K/128] packed multipliers
    (``formats.pack_multipliers``); K a multiple of 128. Each program expands [block_n rows,
    block_pairs pairs of 64-groups]. The defaults, on an H200 (2026-12-02, docs/benchmarks):
    0.7-0.8x the time of the former [64 rows, 512 columns] tiles and within 11% of the best
    tiling tried at 5 of the 6 FLUX weight shapes; 1.13x the former at 3072 x 3072.
  Returns: int8 [N, K], equal to ``QuantizedLinear.row_scaled_weight()[0]``.
  """
  n, kh = qweight.shape
  k = 2 * kh
  if k % 128 or mult.shape != (n, k // 128):
    raise ValueError(f"expand_two_level needs K % 128 == 0 and multipliers [N, K/128], got "
                     f"K={k} and {mult.shape}")
  pairs = k // 128
  out = pl.pallas_call(
      _expand_kernel, grid=(pl.cdiv(n, block_n), pl.cdiv(pairs, block_pairs)),
      in_specs=[pl.BlockSpec((block_n, block_pairs, GROUP), lambda i, j: (i, j, 0)),
                pl.BlockSpec((block_n, block_pairs), lambda i, j: (i, j))],
      out_specs=pl.BlockSpec((block_n, block_pairs, 2 * GROUP), lambda i, j: (i, j, 0)),
      out_shape=jax.ShapeDtypeStruct((n, pairs, 2 * GROUP), jnp.int8),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="svdq_expand_int4_2l")(qweight.reshape(n, pairs, GROUP), mult)
  return out.reshape(n, k)
