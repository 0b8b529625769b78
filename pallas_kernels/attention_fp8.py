"""FP8 attention's operands straight from the qkv projections (Pallas, Triton backend).

One pass per stream over its projection's output X [B, Ls, W] (bf16; columns 0..3HD hold
q | k | v, head-major), in tiles of [block_m tokens, one head]:

  q, k: RMSNorm over the head (f32, its scale, rounded to bf16), RoPE on the pairs
        (x[2i], x[2i+1]) (f32, rounded to bf16), k minus ``kmean``;
  q, k, v: times the power-of-two reciprocal scale, clipped to +-448, rounded to E4M3.

Written to rows off..off + Ls of the joint [B, L, H, D] E4M3 outputs (a later stream writes
the earlier ones' outputs in place, aliased), so nothing in between is stored, where XLA's
unfused passes write the normed heads and read them again. RoPE's pairs are split apart
and joined again in registers (``jnp.unstack`` / ``jnp.stack`` on a trailing axis of 2:
Triton's split / join). The definition is FLUX's unfused path
(``models.flux.fp8_operands_reference``: ``split_heads``, ``RMSNorm``, ``apply_rope``, then
``attention.e4m3_operands``' quantization with the same scales); tests/test_attention_fp8.py
checks the kernel against it in interpret mode.

On by default (``flux.set_fused_fp8_operands``). Its first version, which swapped the pairs
by a product with a signed permutation and read cos / sin repeated per column, ran 0.15-0.18
ms a FLUX block against XLA's unfused 0.12-0.13; this one (split / join, cos / sin read once
per pair) runs 0.077-0.089 ms against XLA's 0.11-0.12 and takes 1.4 ms off the FP8 step (H200,
2026-12-04, ``scripts/bench_attention.py --operands``, docs/benchmarks/README.md).

The statistics the operands need first (k's mean over a token sample, v's bound) stay XLA's
fusions: a Pallas pass for them ran no faster in the 28-step loop (2.378 against 2.377 s,
H200, 2026-12-04) and was removed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from svdq_jax.attention import FP8_MAX


TILING = dict(block_m=64, heads_per_program=1, num_warps=4)


def _normed_rotated(x, scale, cos, sin, eps):
  """Rows x f32 [rows, d] of heads through the RMSNorm (``scale`` [1 or rows, d]) and RoPE
  (cos, sin [rows, d / 2]), each rounded to bf16 as the model rounds them; f32."""
  f32 = jnp.float32
  rows, d = x.shape
  rs = jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) * (1.0 / d) + eps)
  x = (x * rs * scale).astype(jnp.bfloat16).astype(f32)
  re, im = jnp.unstack(x.reshape(rows, d // 2, 2), axis=-1)   # each [rows, d / 2]
  re, im = re * cos + im * (sin * -1.0), im * cos + re * sin    # apply_rope's products
  return jnp.stack([re, im], axis=-1).reshape(rows, d).astype(jnp.bfloat16).astype(f32)


def _kernel(x_ref, qs_ref, ks_ref, cos_ref, sin_ref, kmean_ref, inv_ref, *refs, ls, off,
            heads, eps, block_m, heads_per_program):
  q8_ref, k8_ref, v8_ref = refs[-3:]   # (a later stream's aliased inputs come first)
  b, i = pl.program_id(0), pl.program_id(1)
  d = qs_ref.shape[0]
  ok = ((i * block_m + jnp.arange(block_m)) < ls)[:, None]
  rows, out_rows = pl.ds(i * block_m, block_m), pl.ds(off + i * block_m, block_m)
  f32 = jnp.float32

  def load(which, h):   # [block_m, d] of head h of q (0), k (1) or v (2), f32
    cols = pl.ds((which * heads + h) * d, d)
    return plgpu.load(x_ref.at[b, rows, cols], mask=ok, other=0).astype(f32)

  def e4m3(t, inv):
    return jnp.clip(t * inv, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)

  def store(ref, h, value):
    plgpu.store(ref.at[b, out_rows, h, :], value, mask=ok)

  cos = plgpu.load(cos_ref.at[out_rows, :], mask=ok, other=0)   # shared by the heads
  sin = plgpu.load(sin_ref.at[out_rows, :], mask=ok, other=0)
  for h in range(heads_per_program):
    h = pl.program_id(2) * heads_per_program + h
    for which, scale_ref, out_ref in ((0, qs_ref, q8_ref), (1, ks_ref, k8_ref)):
      x = _normed_rotated(load(which, h), scale_ref[...][None, :], cos, sin, eps)
      if which == 1:   # k smoothing
        x = x - kmean_ref[b, h, :][None, :]
      store(out_ref, h, e4m3(x, inv_ref[which]))
    store(v8_ref, h, e4m3(load(2, h), inv_ref[2]))


def fp8_operands(streams, cos: jax.Array, sin: jax.Array, kmean: jax.Array,
                 inv_scales: jax.Array, num_heads: int, eps: float, *,
                 tiling: dict | None = None, interpret: bool = False):
  """FP8 attention's E4M3 operands of the joint sequence of ``streams`` (module docstring).

  Args:
    streams: ((x [B, Ls, W] bf16 with q | k | v in columns 0..3HD, q_scale f32 [D],
      k_scale f32 [D]), ...) in sequence order.
    cos, sin: f32 [L, D / 2], RoPE's angles for the joint sequence, L = sum of Ls.
    kmean: f32 [B, H, D], subtracted from k after RoPE.
    inv_scales: f32 [3], 1 / s for q, k, v (powers of two).
    eps: the RMSNorms' epsilon.
    tiling: dict(block_m, heads_per_program, num_warps): a program's tokens and heads
      (dividing H) and its warps; None: TILING.

  Returns:
    (q8, k8, v8) float8_e4m3fn [B, L, H, D].
  """
  b, _, _ = streams[0][0].shape
  d = streams[0][1].shape[0]
  total = sum(x.shape[1] for x, *_ in streams)
  if cos.shape != (total, d // 2) or sin.shape != cos.shape:
    raise ValueError(f"cos, sin must be [L={total}, {d // 2}], got {cos.shape}, {sin.shape}")
  tiling = tiling or TILING
  block_m, heads_per_program = tiling["block_m"], tiling["heads_per_program"]
  if num_heads % heads_per_program:
    raise ValueError(f"heads_per_program={heads_per_program} must divide H={num_heads}")
  shape = jax.ShapeDtypeStruct((b, total, num_heads, d), jnp.float8_e4m3fn)
  outs, off = None, 0
  for x, q_scale, k_scale in streams:
    if x.ndim != 3 or x.shape[0] != b or x.shape[2] < 3 * num_heads * d:
      raise ValueError(f"a stream must be [B={b}, Ls, >= {3 * num_heads * d}], got {x.shape}")
    args = [x, q_scale, k_scale, cos, sin, kmean, inv_scales]
    aliases = {}
    if outs is not None:   # the earlier streams' rows, kept
      aliases = {len(args) + j: j for j in range(3)}
      args += list(outs)
    kernel = lambda *refs, ls=x.shape[1], off=off: _kernel(
        *refs, ls=ls, off=off, heads=num_heads, eps=eps, block_m=block_m,
        heads_per_program=heads_per_program)
    outs = pl.pallas_call(
        kernel, grid=(b, pl.cdiv(x.shape[1], block_m), num_heads // heads_per_program),
        out_shape=[shape] * 3,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=tiling["num_warps"], num_stages=1),
        interpret=interpret, name=f"fp8_qkv_{x.shape[1]}x{num_heads}x{d}")(*args)
    off += x.shape[1]
  return tuple(outs)
