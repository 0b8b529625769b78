"""Weight-only 4-bit linear for a few tokens (W4A16 GEMV; Pallas, Triton backend).

FLUX's modulation linears (W4A16, one input vector per image: M = batch) read a 4-bit weight
once per call, so they are bound by memory; XLA fuses the dequantization into a reduction that
reads the packed weight far below the H200's bandwidth (2.6 ms of the W4A8 step for 76 calls
of 15-30 MB, docs/benchmarks). Here each program dequantizes [block_n rows, one 64-group] of
the weight at a time to bf16, exactly as the reference does, and multiplies on tensor cores:

  per 64-group g of output rows n:
    s = f32(wscale[n, g])                              int4 (bf16 group scales)
    s = f32(m[n, g]) * wcscale[n]                      int4_2l (multiplier x row scale)
    w = bf16(q * s)                                    the reference's dequantize, then x.dtype
    acc[m, n] += x_hat[m, g-cols] . w[n, g-cols]       bf16 products, f32 sums

with x_hat = bf16(X * (1 / lambda)) computed by XLA and padded to 16 rows (the smallest dot).
The low-rank branch (a LoRA joined to the layer) and the bias are added by XLA to the f32
result, which is then rounded once: ``qlinear.reference_apply`` up to f32 summation order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from svdq_jax import formats, qlinear
from svdq_jax.pallas_kernels.w4a4 import GROUP, HALF, _MIN_DOT, _unpack

WEIGHT_FORMATS = ("int4", "int4_2l")
MAX_ROWS = 16  # tokens per call the kernel takes (one dot's rows); more run in XLA
# Whether qlinear's 'auto' backend runs weight-only layers on this kernel on a GPU. Off until
# it has been compiled and timed on one (written 2026-12-03 without a GPU, checked in
# interpret mode only; ``scripts/bench_w4a16.py`` measures it against XLA's path).
AUTO = False


def _gemv_kernel(x_ref, q_ref, s_ref, wc_ref, o_ref, *, two_level, groups_per_step):
  kh = q_ref.shape[1]
  wc = wc_ref[...] if two_level else None  # the row scales, loaded once

  def group(g, acc):
    cols = pl.ds(g * HALF, HALF)
    w_lo, w_hi = _unpack(q_ref[:, cols], True)
    if two_level:  # multiplier m - 1 of group g: nibble g % 2 of byte g // 2
      mult = ((s_ref[:, g // 2].astype(jnp.int32) >> (4 * (g % 2))) & 0xF) + 1
      s = mult.astype(jnp.float32) * wc
    else:
      s = s_ref[:, g].astype(jnp.float32)
    for half, w in ((0, w_lo), (1, w_hi)):
      wb = (w.astype(jnp.float32) * s[:, None]).astype(jnp.bfloat16)
      xb = x_ref[:, pl.ds(g * GROUP + half * HALF, HALF)]
      acc += plgpu.dot(xb, wb, trans_b=True)
    return acc

  def step(i, acc):
    for j in range(groups_per_step):
      acc = group(i * groups_per_step + j, acc)
    return acc

  acc = jax.lax.fori_loop(0, kh // HALF // groups_per_step, step,
                          jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("two_level", "block_n", "groups_per_step",
                                              "num_warps", "num_stages", "interpret"))
def gemv(x_hat: jax.Array, qweight: jax.Array, wscale: jax.Array, wcscale: jax.Array | None,
         *, two_level: bool, block_n: int = 32, groups_per_step: int = 2, num_warps: int = 4,
         num_stages: int = 3, interpret: bool = False) -> jax.Array:
  """f32 [16, N] = x_hat [16, K] (bf16) times the dequantized weight, transposed.

  qweight: uint8 [N, K/2] packed codes; wscale: int4: [N, K/64] group scales; int4_2l:
  uint8 [N, K/128] packed multipliers with wcscale f32 [N] row scales. K % 128 == 0 for
  int4_2l (whole multiplier bytes), N % block_n == 0.
  """
  n, kh = qweight.shape
  groups = kh // HALF
  grid = (n // block_n,)
  specs = [pl.BlockSpec((MAX_ROWS, 2 * kh), lambda j: (0, 0)),
           pl.BlockSpec((block_n, kh), lambda j: (j, 0)),
           pl.BlockSpec((block_n, wscale.shape[1]), lambda j: (j, 0))]
  args = [x_hat, qweight, wscale]
  if two_level:
    specs.append(pl.BlockSpec((block_n,), lambda j: (j,)))
    args.append(wcscale)

  def kernel(x_ref, q_ref, s_ref, *refs):
    wc_ref, o_ref = refs if two_level else (None, *refs)
    _gemv_kernel(x_ref, q_ref, s_ref, wc_ref, o_ref, two_level=two_level,
                 groups_per_step=groups_per_step if groups % groups_per_step == 0 else 1)

  return pl.pallas_call(
      kernel, grid=grid, in_specs=specs,
      out_specs=pl.BlockSpec((MAX_ROWS, block_n), lambda j: (0, j)),
      out_shape=jax.ShapeDtypeStruct((MAX_ROWS, n), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="svdq_w4a16_gemv")(*args)


def block_n(n: int) -> int | None:
  """The widest output block (32 or 16, at least one dot's width) dividing N, or None."""
  return next((b for b in (32, _MIN_DOT) if n % b == 0), None)


def supports(layer, rows: int, dtype) -> bool:
  """Whether ``w4a16_linear`` takes this weight-only layer for ``rows`` tokens of ``dtype``."""
  k, n = layer.in_features, layer.out_features
  return (layer.act_format is None and layer.weight_format in WEIGHT_FORMATS
          and rows <= MAX_ROWS and jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)
          and k % (2 * GROUP if layer.weight_format == "int4_2l" else GROUP) == 0
          and block_n(n) is not None)


def w4a16_linear(layer, x: jax.Array, bias: jax.Array | None = None, *,
                 interpret: bool = False, **tiling) -> jax.Array:
  """A weight-only layer for a few tokens: x [..., K] bf16 -> [..., N] bf16, with
  ``supports(layer, rows, x.dtype)``. ``tiling``: ``gemv``'s (benchmarks)."""
  lead, k = x.shape[:-1], x.shape[-1]
  x2 = x.reshape(-1, k)
  rows = x2.shape[0]
  if not supports(layer, rows, x.dtype):
    raise ValueError(f"w4a16_linear takes bf16 inputs of <= {MAX_ROWS} tokens and weights "
                     f"{WEIGHT_FORMATS} (K % 64, or 128 for int4_2l; N % 16), got {rows} "
                     f"tokens of {x.dtype}, {layer.weight_format}, K={k}, "
                     f"N={layer.out_features}")
  xf = x2.astype(jnp.float32)
  if layer.smooth is not None:
    xf = qlinear.smoothed(xf, layer.smooth)
  x_hat = jnp.pad(xf.astype(jnp.bfloat16), ((0, MAX_ROWS - rows), (0, 0)))
  y = gemv(x_hat, layer.qweight, layer.wscale, layer.wcscale,
           two_level=formats.get_format(layer.weight_format).two_level,
           **{"block_n": block_n(layer.out_features), **tiling}, interpret=interpret)[:rows]
  if layer.lora_down is not None:
    y = y + qlinear.lowrank_up(qlinear.lowrank_down(x2, layer.lora_down, layer.smooth),
                               layer.lora_up)
  bias = layer.bias if bias is None else bias
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype).reshape(*lead, layer.out_features)
