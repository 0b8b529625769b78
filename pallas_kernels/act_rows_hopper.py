"""Per-token int8 activation quantization with the low-rank down projection, in one launch
(Pallas, Mosaic GPU; Hopper).

The same outputs as ``act_rowscaled.reference_folded(x, inv_smooth, down, "int8")`` (its
definition): per token, x_hat = x * (1 / lambda), s = max |x_hat| * f32(1/127),
a = clip(round(x_hat * (1 / s)), -127, 127) (ties to even, the reciprocal correctly rounded,
1 for s = 0; a token holding a NaN: codes 0, scale NaN), and lr = x @ (L_down / lambda) with
bf16 operands and f32 accumulation, here rounded once to bf16 (what the GEMMs read).

Why a kernel: at FLUX.1's K = 3072 (qkv, fc1, linear1; ~114 calls a step) XLA computes these
in five launches (the maxima, the reciprocals, the codes, a cuBLAS dot, its bf16 convert) and
the Triton kernels (``act_rowscaled``) in two plus XLA's reductions of their partial maxima
and low-rank sums: 0.067 / 0.093 ms at M = 4608 on an H100 (2026-12-07) against ~0.02 ms for
the bytes. Here each CTA owns 64 tokens and streams their rows through shared memory twice in
``block_k``-column chunks (TMA, ``steps`` deep): first their maxima, then the codes, stored
chunk by chunk, and the down projection as a 64 x r wgmma on the bf16 chunk already there.
Codes and scales are bit for bit the reference's; lr sums in the tensor cores' order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from svdq_jax import formats
from svdq_jax.pallas_kernels.act_rowscaled import abs_bits
from svdq_jax.pallas_kernels.w4a4_hopper import ROW_ALIGN, _swizzled

TOKENS = 64      # a CTA's tokens: the wgmma's M
BLOCK_K = 256    # columns a pipeline step
WGMMA = plgpu.Layout.WGMMA


def check_inputs(x, inv_smooth, down, block_k: int = BLOCK_K) -> None:
  """Raises ValueError naming what ``quantize_int8_rows`` cannot take."""
  if x.ndim != 2 or x.dtype != jnp.bfloat16:
    raise ValueError(f"x must be bf16 [M, K], got {x.dtype} {x.shape}")
  k = x.shape[1]
  if k % block_k:
    raise ValueError(f"K={k} must be a multiple of block_k={block_k}")
  if inv_smooth is not None and inv_smooth.shape != (k,):
    raise ValueError(f"inv_smooth must be [K] = [{k}], got {inv_smooth.shape}")
  if down is not None and (down.ndim != 2 or down.shape[0] != k or down.shape[1] % 16):
    raise ValueError(f"down must be [K, r] with K = {k} and r a multiple of 16, got "
                     f"{down.shape}")


@functools.partial(jax.jit, static_argnames=("block_k", "steps", "interpret"))
def quantize_int8_rows(x: jax.Array, inv_smooth: jax.Array | None, down: jax.Array | None,
                       *, block_k: int = BLOCK_K, steps: int = 2, interpret: bool = False):
  """Args: x bf16 [M, K] (K a multiple of block_k); inv_smooth f32 [K] (1 / lambda) or None;
  down bf16 [K, r] (L_down / lambda, r a multiple of 16) or None. steps: the pipelines'
  depth. interpret: Pallas' GPU interpret mode (CPU).

  Returns (a int8 [M, K], s f32 [M], lr bf16 [M, r] or None)."""
  check_inputs(x, inv_smooth, down, block_k)
  m_out, k = x.shape
  steps = min(steps, k // block_k)
  x = jnp.pad(x, ((0, -m_out % ROW_ALIGN), (0, 0)))   # whole TMA row tiles
  m = x.shape[0]
  inv = (jnp.ones((k,), jnp.float32) if inv_smooth is None
         else inv_smooth.astype(jnp.float32))
  has_lr = down is not None
  r = down.shape[1] if has_lr else 16
  x_spec = plgpu.BlockSpec((TOKENS, block_k), lambda kk: (0, kk),
                           transforms=_swizzled(block_k, jnp.bfloat16))
  inv_spec = plgpu.BlockSpec((block_k,), lambda kk: (kk,))

  def kernel(x_gmem, inv_gmem, *refs):
    down_gmem = refs[0] if has_lr else None
    a_gmem, s_gmem, lr_gmem, s_smem, lr_smem, a_stage = refs[1:] if has_lr else refs
    rows = pl.ds(lax.axis_index("m") * TOKENS, TOKENS)

    def maxima(_, x_smem, inv_smem, bits):
      v = scaled_chunk(x_smem, inv_smem)
      return jnp.maximum(bits, jnp.max(abs_bits(v), axis=1))   # NaN bits above inf's

    bits = plgpu.emit_pipeline(
        maxima, grid=(k // block_k,), max_concurrent_steps=steps, in_specs=[x_spec, inv_spec],
        init_carry=plgpu.layout_cast(jnp.zeros((TOKENS,), jnp.int32), WGMMA.reduce(1)),
    )(x_gmem.at[rows], inv_gmem)
    scale = lax.bitcast_convert_type(bits, jnp.float32) * formats.INV_127
    recip = 1.0 / jnp.where(scale == 0, 1.0, scale)
    s_smem[...] = scale
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(s_smem, s_gmem.at[rows])

    def codes(idx, x_smem, inv_smem, *rest):
      down_smem, acc = rest if has_lr else (None, None)
      y = scaled_chunk(x_smem, inv_smem)
      y = y * lax.broadcast_in_dim(recip, y.shape, [0])
      q = jnp.clip(jnp.round(y), -127.0, 127.0)
      slot = idx[0] % 2
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # the slot's last store has read it
      a_stage.at[slot][...] = jnp.where(q != q, 0.0, q).astype(jnp.int8)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(a_stage.at[slot], a_gmem.at[rows, pl.ds(idx[0] * block_k,
                                                                         block_k)])
      if has_lr:
        plgpu.wgmma(acc, x_smem, down_smem.transpose((1, 0)))
        plgpu.wgmma_wait(0)
        return acc
      return None

    def run(acc=None):
      plgpu.emit_pipeline(
          codes, grid=(k // block_k,), max_concurrent_steps=steps, init_carry=acc,
          in_specs=[x_spec, inv_spec] + ([plgpu.BlockSpec(
              (r, block_k), lambda kk: (0, kk),
              transforms=_swizzled(block_k, jnp.bfloat16))] if has_lr else []),
      )(x_gmem.at[rows], inv_gmem, *([down_gmem] if has_lr else []))
      return None if acc is None else acc[...]

    if has_lr:
      lr_smem[...] = pl.run_scoped(run, plgpu.ACC((TOKENS, r), jnp.float32)).astype(
          jnp.bfloat16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(lr_smem, lr_gmem.at[rows])
    else:
      run()
    plgpu.wait_smem_to_gmem(0)

  def scaled_chunk(x_smem, inv_smem):   # f32 x * (1 / lambda) of a chunk, tokens x columns
    v = plgpu.load(x_smem, layout=WGMMA).astype(jnp.float32)
    c = plgpu.load(inv_smem, layout=WGMMA.reduce(0))
    return v * lax.broadcast_in_dim(c, v.shape, [1])

  kernel.__name__ = f"svdq_act_int8_t{'' if has_lr else '_nolr'}_{m_out}x{k}"
  a, s, lr = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m,), jnp.float32),
                jax.ShapeDtypeStruct((m, r), jnp.bfloat16)),
      grid=(pl.cdiv(m, TOKENS),), grid_names=("m",),
      scratch_types=[plgpu.SMEM((TOKENS,), jnp.float32),
                     plgpu.SMEM((TOKENS, r), jnp.bfloat16),
                     plgpu.SMEM((2, TOKENS, block_k), jnp.int8,
                                transforms=_swizzled(block_k, jnp.int8))],
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(x, inv, *([down.astype(jnp.bfloat16).T] if has_lr else []))
  return a[:m_out], s[:m_out], (lr[:m_out] if has_lr else None)
