"""Weight-only int4_2l GEMV for a few rows (Pallas, Triton backend): FLUX's modulation linears.

A weight-only (W4A16) layer's product, as ``qlinear.weight_only_product`` defines it: the weight
dequantized to bf16, ``w[n, k] = bf16(q[n, k] * (m[n, g] * unit[n]))``, times the bf16 input
with f32 accumulation. Its callers in FLUX (the modulation linears, ``models.flux.
quant_config``) take one vector per image, M = batch: XLA turns that dot into a reduction
fusion over the dequantized weight, which ran at ~0.6 TB/s of packed weights on an H200
(1.7 ms per 1024x1024 step for the double blocks' 3072 -> 18432 layers alone, more than the
bf16 model's GEMVs). This kernel reads the packed codes once, N / block_n programs each
owning block_n output features over all of K:

  per 64-group g: b = codes[n, 32 g : 32 g + 32]          (uint8: the group's two halves)
                  s = f32(m[n, g]) * unit[n]               (dequantize's group scale)
                  w_lo, w_hi = bf16(f32(q) * s)            (q: b's low / high nibbles)
                  acc[r, n] += sum_j w_lo[j] x[r, 64 g + j] + w_hi[j] x[r, 64 g + 32 + j]

Numerics: the weight values are the reference's bit for bit; the f32 sums are ordered
differently than XLA's dot (float agreement, not bits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from svdq_jax.pallas_kernels.w4a4 import GROUP, HALF, _unpack

MAX_ROWS = 16        # rows of x one call takes; a GEMM's business beyond that


def supports(weight_format: str, m: int, k: int, n: int, block_n: int = 64) -> bool:
  """Whether ``gemv`` takes an [m, k] input to a weight-only layer of this format."""
  return (weight_format == "int4_2l" and 0 < m <= MAX_ROWS and k % (2 * GROUP) == 0
          and n % block_n == 0)


def supports_layer(layer, m: int, dtype) -> bool:
  """Whether a weight-only QuantizedLinear's product for an [m, K] input of ``dtype`` runs
  here (bf16 inputs only: the reference dequantizes the weight to the input's dtype)."""
  return (jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and layer.act_format is None
          and supports(layer.weight_format, m, layer.in_features, layer.out_features))


def layer_product(layer, xs: jax.Array, *, interpret: bool = False) -> jax.Array:
  """``qlinear.weight_only_product`` of an int4_2l layer: xs bf16 [M, K] -> f32 [M, N]."""
  return gemv(xs, layer.qweight, layer.wscale, layer.wcscale, interpret=interpret)


def _kernel(x_ref, c_ref, m_ref, u_ref, o_ref, *, rows, groups_per_step):
  bn = c_ref.shape[0]
  groups = x_ref.shape[1] // GROUP
  unit = u_ref[...][:, None]

  def step(i, acc):
    acc = list(acc)
    for j in range(groups_per_step):   # groups_per_step is even: j % 2 is g's nibble
      g = i * groups_per_step + j
      mb = m_ref[:, pl.ds(g // 2, 1)]
      mult = ((mb & 0xF) if j % 2 == 0 else (mb >> 4)).astype(jnp.float32) + 1.0
      s = mult * unit
      lo, hi = _unpack(c_ref[:, pl.ds(pl.multiple_of(g * HALF, HALF), HALF)], signed=True)
      w_lo = (lo.astype(jnp.float32) * s).astype(jnp.bfloat16).astype(jnp.float32)
      w_hi = (hi.astype(jnp.float32) * s).astype(jnp.bfloat16).astype(jnp.float32)
      for r in range(rows):
        x_lo = x_ref[pl.ds(r, 1), pl.ds(pl.multiple_of(g * GROUP, GROUP), HALF)]
        x_hi = x_ref[pl.ds(r, 1), pl.ds(pl.multiple_of(g * GROUP + HALF, HALF), HALF)]
        acc[r] = acc[r] + jnp.sum(w_lo * x_lo + w_hi * x_hi, axis=1)
    return tuple(acc)

  zero = jnp.zeros((bn,), jnp.float32)
  acc = jax.lax.fori_loop(0, groups // groups_per_step, step, (zero,) * rows)
  for r in range(rows):
    o_ref[r, :] = acc[r]


@functools.partial(jax.jit, static_argnames=("block_n", "groups_per_step", "num_warps",
                                             "num_stages", "interpret"))
def gemv(x: jax.Array, codes: jax.Array, mults: jax.Array, unit: jax.Array, *,
         block_n: int = 64, groups_per_step: int = 4, num_warps: int = 4,
         num_stages: int = 3, interpret: bool = False) -> jax.Array:
  """f32 [M, N] = bf16(x) . w^T with f32 accumulation, w the int4_2l weight at bf16.

  Args:
    x: [M, K] (any float dtype; rounded to bf16 as the reference's matmul does), M <= 16.
    codes: uint8 [N, K/2], ``formats.pack``'s layout. mults: uint8 [N, K/128] (K/64
      multipliers, ``formats.pack_multipliers``). unit: f32 [N] the row units.
    block_n: output features per program (a power of two dividing N); groups_per_step:
      64-groups per loop step (even, dividing K/64); num_warps, num_stages: Triton's.
  """
  m, k = x.shape
  n = codes.shape[0]
  if not supports("int4_2l", m, k, n, block_n):
    raise ValueError(f"the W4A16 GEMV takes x [M <= {MAX_ROWS}, K % 128 == 0] and N % "
                     f"{block_n} == 0, got x {x.shape}, N={n}")
  groups = k // GROUP
  if codes.shape != (n, k // 2) or mults.shape != (n, groups // 2) or unit.shape != (n,):
    raise ValueError(f"int4_2l weight operands must be codes [N, K/2], multipliers "
                     f"[N, K/128], units [N] for K={k}; got {codes.shape}, {mults.shape}, "
                     f"{unit.shape}")
  if groups_per_step % 2 or groups % groups_per_step:
    raise ValueError(f"groups_per_step={groups_per_step} must be even and divide K/64={groups}")
  xf = x.astype(jnp.bfloat16).astype(jnp.float32)
  return pl.pallas_call(
      functools.partial(_kernel, rows=m, groups_per_step=groups_per_step),
      grid=(n // block_n,),
      in_specs=[pl.BlockSpec((m, k), lambda i: (0, 0)),
                pl.BlockSpec((block_n, k // 2), lambda i: (i, 0)),
                pl.BlockSpec((block_n, groups // 2), lambda i: (i, 0)),
                pl.BlockSpec((block_n,), lambda i: (i,))],
      out_specs=pl.BlockSpec((m, block_n), lambda i: (0, i)),
      out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="svdq_w4a16_gemv")(xf, codes, mults, unit.astype(jnp.float32))


__all__ = ["MAX_ROWS", "gemv", "layer_product", "supports", "supports_layer"]
