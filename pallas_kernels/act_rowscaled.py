"""Activation quantization for the row-scaled formats (Pallas, Triton backend).

One program per block of ``block_m`` tokens reads its rows of X [M, K] (bf16) twice, in
chunks of ``chunk`` columns: the first pass finds each token's absmax of x_hat = X * (1 /
lambda) (the f32 reciprocal, computed once by XLA: XLA itself rewrites X / lambda into this
product, so writing it keeps kernel and reference bit-identical on every backend),
the second quantizes (the second read mostly hits L2) and accumulates the low-rank down
projection x_hat @ L_down on the tensor cores. Per token:

  int8:    s = absmax * f32(1/127),  a = clip(round(x_hat * (1 / s)), -127, 127)
  int4_2l: s = unit = absmax * f32(1/112) (1 for an all-zero token), per 64-group
           m = clip(ceil(gmax * (1 / (7 unit))), 1, 16),
           q = clip(round(x_hat * (1 / (unit m))), -8, 7),   a = m q

exactly as ``formats.quantize`` (correctly rounded reciprocals, ties to even); a token holding
a NaN gets codes 0 and a NaN scale. Outputs are the operands of ``int8_hopper.int8_gemm``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from svdq_jax import formats
from svdq_jax.qlinear import inverse_smooth, lowrank_down, smoothed
from svdq_jax.pallas_kernels.w4a4 import (GROUP, _div, _pad_rank, _round_half_even,
                                           check_act_inputs)

ACT_FORMATS = formats.ROW_SCALED


def _kernel(x_ref, smooth_ref, down_ref, a_ref, s_ref, lr_ref, *, m, act_format, chunk,
            interpret):
  bm, k = x_ref.shape
  rows = pl.program_id(0) * bm + jnp.arange(bm)
  row_ok = (rows < m)[:, None]
  n_chunks = k // chunk

  def x_hat(start, width):
    cols = pl.ds(start, width)
    v = plgpu.load(x_ref.at[:, cols], mask=row_ok, other=0).astype(jnp.float32)
    if smooth_ref is not None:  # holds 1 / lambda
      v = v * smooth_ref[cols][None, :]
    return v

  def row_stats(c, carry):
    amax, nan = carry
    v = x_hat(c * chunk, chunk)
    # max() drops NaN on the GPU: NaN rows are tracked on their own
    return (jnp.maximum(amax, jnp.max(jnp.abs(v), axis=1)),
            jnp.maximum(nan, jnp.max(jnp.where(v != v, 1.0, 0.0), axis=1)))

  zeros = jnp.zeros((bm,), jnp.float32)
  amax, nan = jax.lax.fori_loop(0, n_chunks, row_stats, (zeros, zeros))
  is_nan = nan > 0
  if act_format == "int8":
    scale = amax * formats.INV_127
  else:
    scale = jnp.where(amax == 0, 1.0, amax * formats.INV_112)
  plgpu.store(s_ref, jnp.where(is_nan, jnp.nan, scale), mask=row_ok[:, 0])
  div_by = jnp.where(scale == 0, 1.0, scale)[:, None]

  def codes(v):  # the products of formats.quantize, reciprocals correctly rounded
    recip = lambda t: _div(jnp.ones_like(t), t, interpret)
    if act_format == "int8":
      return jnp.clip(_round_half_even(v * recip(div_by), interpret), -127.0, 127.0)
    unit = div_by  # int4_2l: v is one 64-group
    gmax = jnp.max(jnp.abs(v), axis=1, keepdims=True)
    mult = jnp.clip(jnp.ceil(gmax * recip(7.0 * unit)), 1.0, float(formats.MULT_MAX))
    q = jnp.clip(_round_half_even(v * recip(unit * mult), interpret), -8.0, 7.0)
    return q * mult

  # int8 takes a chunk at a time, int4_2l one 64-group (its multiplier's span) at a time
  width = chunk if act_format == "int8" else GROUP

  def quantize(c, lr):
    for j in range(chunk // width):
      start = c * chunk + j * width
      v = x_hat(start, width)
      a = jnp.where(is_nan[:, None], 0.0, codes(v))
      plgpu.store(a_ref.at[:, pl.ds(start, width)], a.astype(jnp.int32).astype(jnp.int8),
                  mask=row_ok)
      if down_ref is not None:
        lr += plgpu.dot(v.astype(jnp.bfloat16), down_ref[pl.ds(start, width), :])
    return lr

  lr = jax.lax.fori_loop(0, n_chunks, quantize,
                         jnp.zeros((bm, lr_ref.shape[1] if down_ref is not None else 1),
                                   jnp.float32))
  if down_ref is not None:
    plgpu.store(lr_ref, lr, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("act_format", "block_m", "chunk", "num_warps",
                                              "num_stages", "interpret"))
def quantize_rows(x: jax.Array, smooth: jax.Array | None, down: jax.Array | None, *,
                  act_format: str = "int8", block_m: int = 16, chunk: int = 256,
                  num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
  """Per-token activation quantization with the low-rank down projection.

  Args:
    x: [M, K] (bf16 or f32), K a multiple of 64. smooth: f32 [K] or None.
    down: [K, r] or None. act_format: 'int8' or 'int4_2l'.
    block_m, chunk, num_warps, num_stages: tiling (chunk reduced to a divisor of K).

  Returns:
    (int8 [M, K] values, f32 [M] token scales, f32 [M, r] lr or None): identical to
    ``formats.row_scaled(formats.quantize(x_hat, act_format), act_format)`` and, up to
    f32 summation order, ``qlinear.lowrank_down(x_hat, down)``, x_hat =
    ``qlinear.smoothed(x, smooth)``.
  """
  if act_format not in ACT_FORMATS:
    raise ValueError(f"row-scaled activation kernel supports {ACT_FORMATS}, got {act_format!r}")
  m, k = check_act_inputs(x, smooth, down)
  while k % chunk:
    chunk //= 2
  chunk = max(chunk, GROUP)
  r = 0 if down is None else down.shape[1]
  down_p = None if down is None else _pad_rank(down.astype(jnp.bfloat16), 1)
  rp = 1 if down_p is None else down_p.shape[1]
  row_block = lambda cols: pl.BlockSpec((block_m, cols), lambda i: (i, 0))
  in_specs = [row_block(k)]
  args = [x]
  if smooth is not None:
    in_specs.append(pl.BlockSpec((k,), lambda i: (0,)))
    args.append(inverse_smooth(smooth))
  if down_p is not None:
    in_specs.append(pl.BlockSpec((k, rp), lambda i: (0, 0)))
    args.append(down_p)

  def wrapped(x_ref, *refs):
    it = iter(refs)
    smooth_ref = next(it) if smooth is not None else None
    down_ref = next(it) if down_p is not None else None
    _kernel(x_ref, smooth_ref, down_ref, *it, m=m, act_format=act_format, chunk=chunk,
            interpret=interpret)

  a, s, lr = pl.pallas_call(
      wrapped, grid=(pl.cdiv(m, block_m),), in_specs=in_specs,
      out_shape=[jax.ShapeDtypeStruct((m, k), jnp.int8),
                 jax.ShapeDtypeStruct((m,), jnp.float32),
                 jax.ShapeDtypeStruct((m, rp), jnp.float32)],
      out_specs=[row_block(k), pl.BlockSpec((block_m,), lambda i: (i,)), row_block(rp)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name=f"svdq_quantize_{act_format}")(*args)
  return a, s, (lr[:, :r] if r else None)


def reference(x, smooth, down, act_format: str):
  """The jnp definition of ``quantize_rows`` (XLA fuses it: also the 'xla' activation path)."""
  xf = x.astype(jnp.float32) if smooth is None else smoothed(x, smooth)
  a, s = formats.row_scaled(formats.quantize(xf, act_format), act_format)
  return a, s, (None if down is None else lowrank_down(xf, down))


def _expand_kernel(q_ref, m_ref, o_ref):
  """One [rows, chunk] tile: packed int4_2l codes and multipliers -> int8 m * q."""
  for j in range(o_ref.shape[1] // GROUP):
    packed = q_ref[:, pl.ds(j * GROUP // 2, GROUP // 2)].astype(jnp.int32)
    lo = packed & 0xF
    hi = (packed >> 4) & 0xF
    lo = jnp.where(lo >= 8, lo - 16, lo)   # two's complement nibbles
    hi = jnp.where(hi >= 8, hi - 16, hi)
    mult = ((m_ref[:, pl.ds(j // 2, 1)].astype(jnp.int32) >> (4 * (j % 2))) & 0xF) + 1
    o_ref[:, pl.ds(j * GROUP, GROUP // 2)] = (lo * mult).astype(jnp.int8)
    o_ref[:, pl.ds(j * GROUP + GROUP // 2, GROUP // 2)] = (hi * mult).astype(jnp.int8)


@functools.partial(jax.jit, static_argnames=("block_n", "chunk", "num_warps", "interpret"))
def expand_two_level(qweight: jax.Array, mult: jax.Array, *, block_n: int = 64,
                     chunk: int = 512, num_warps: int = 4, interpret: bool = False) -> jax.Array:
  """int4_2l weights as int8 products m * q (the int8 GEMM's operand), one pass.

  Args: qweight uint8 [N, K/2] packed codes, mult uint8 [N, K/128] packed multipliers
    (``formats.pack_multipliers``); K a multiple of 128 (chunk reduced to a divisor of K).
  Returns: int8 [N, K], equal to ``QuantizedLinear.row_scaled_weight()[0]``.
  """
  n, kh = qweight.shape
  k = 2 * kh
  if k % 128 or mult.shape != (n, k // 128):
    raise ValueError(f"expand_two_level needs K % 128 == 0 and multipliers [N, K/128], got "
                     f"K={k} and {mult.shape}")
  while k % chunk:
    chunk //= 2
  return pl.pallas_call(
      _expand_kernel, grid=(pl.cdiv(n, block_n), k // chunk),
      in_specs=[pl.BlockSpec((block_n, chunk // 2), lambda i, j: (i, j)),
                pl.BlockSpec((block_n, chunk // 128), lambda i, j: (i, j))],
      out_specs=pl.BlockSpec((block_n, chunk), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((n, k), jnp.int8),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="svdq_expand_int4_2l")(qweight, mult)
