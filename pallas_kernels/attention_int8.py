"""INT8 q k^T flash attention on Hopper (Pallas, Mosaic GPU: TMA, wgmma s8 and bf16).

The kernel of ``svdq_jax.attention.int8_attention(q, k, v, pv='bf16')`` (its numerics are the
definition): per-token INT8 q (times 1/sqrt(D)) and k (minus its token mean), scores exact in
int32 and scaled once, softmax and P V in bf16/f32. On Hopper the s8 wgmma runs at twice the
bf16 rate, so the first of attention's two products costs half; the second stays bf16 (FP8 P V
needs P re-laid out from the accumulator's register layout to the 8-bit operand layout, which
Mosaic GPU does not do).

Structure (FlashAttention-3's, as in jax's Mosaic GPU attention example): one CTA per (head,
2 block_q queries, batch) with three warpgroups. The memory warpgroup streams K (int8), its
per-key scales and V (bf16) into a ring of ``steps`` shared-memory slots with TMA. Each of the
two compute warpgroups owns block_q queries: per KV tile it issues S = q8 . k8^T (int32), forms
the scores in base 2, z = S s_k (per key) (s_q log2 e) (per query), runs the online softmax
(running max m, rowsum l, the accumulator rescaled by 2^(m_old - m_new)), and issues
O += bf16(2^(z - m)) . V with P from registers. A barrier makes the two warpgroups take turns,
so one's softmax overlaps the other's tensor-core work. The output is O / l, rounded to bf16.

Rounding differs from the reference only in P: the kernel rounds 2^(z - running max) to bf16,
the reference exp(s - row max); both divide by the rowsum of the unrounded values.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from svdq_jax import attention
from svdq_jax.pallas_kernels.w4a4_hopper import _swizzled, _wgmma_onto, on_hopper

LOG2E = math.log2(math.e)


def prepare(q: jax.Array, k: jax.Array, v: jax.Array):
  """The kernel's operands from q, k, v [B, L, H, D] (any float dtype), as the reference
  quantizes them: q8, k8 int8 [B, L, H, D]; s_q, s_k f32 [B, H, L] (s_q includes 1/sqrt(D));
  v bf16 [B, L, H, D]."""
  qf, kf, vf = attention._smoothed_f32(q, k, v)
  q8, sq = attention._int8_rows(qf * (q.shape[-1] ** -0.5))
  k8, sk = attention._int8_rows(kf)
  per_head = lambda s: jnp.transpose(s[..., 0], (0, 2, 1))
  return q8, per_head(sq), k8, per_head(sk), vf.astype(jnp.bfloat16)


def reference(q8, sq, k8, sk, v) -> jax.Array:
  """jnp semantics of ``flash`` (f32 [B, L, H, D]; ``int8_attention`` with pv='bf16' after
  ``prepare``)."""
  acc = jnp.einsum("bqhd,bkhd->bhqk", q8, k8, preferred_element_type=jnp.int32)
  scores = acc.astype(jnp.float32) * sq[..., :, None] * sk[..., None, :]
  p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                   preferred_element_type=jnp.float32)
  return out / jnp.sum(p, axis=-1).transpose(0, 2, 1)[..., None]


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "steps", "interpret"))
def flash(q8, sq, k8, sk, v, *, block_q: int = 64, block_kv: int = 128, steps: int = 2,
          interpret: bool = False) -> jax.Array:
  """softmax(scores) v with scores = (q8 . k8^T) s_q s_k, on the int8 and bf16 tensor cores.

  Args:
    q8, k8: int8 [B, L, H, D] (D a multiple of 64). sq, sk: f32 [B, H, L] per-token scales.
    v: bf16 [B, L, H, D]. L a multiple of 2 block_q and of block_kv.
    block_q: queries per compute warpgroup (multiple of 64); block_kv: keys per pipeline
      step (multiple of 64); steps: pipeline depth (K/V tiles in flight).
    interpret: Pallas' GPU interpret mode (CPU; tests/conftest.py sizes its thread pool).

  Returns:
    bf16 [B, L, H, D].
  """
  b, l, h, d = q8.shape
  if k8.shape != q8.shape or v.shape != q8.shape:
    raise ValueError(f"q8, k8, v must be [B, L, H, D] of one shape, got {q8.shape}, "
                     f"{k8.shape}, {v.shape}")
  if sq.shape != (b, h, l) or sk.shape != (b, h, l):
    raise ValueError(f"sq, sk must be [B, H, L] = {(b, h, l)}, got {sq.shape}, {sk.shape}")
  if q8.dtype != jnp.int8 or k8.dtype != jnp.int8:
    raise ValueError(f"q8, k8 must be int8, got {q8.dtype}, {k8.dtype}")
  if d % 64 or block_q % 64 or block_kv % 64:
    raise ValueError(f"head dim {d}, block_q {block_q}, block_kv {block_kv} must be multiples "
                     "of 64")
  if l % (2 * block_q) or l % block_kv:
    raise ValueError(f"L={l} must be a multiple of 2 block_q = {2 * block_q} and of "
                     f"block_kv = {block_kv}")
  kv_steps = l // block_kv
  steps = max(1, min(steps, kv_steps))
  v = v.astype(jnp.bfloat16)
  sq, sk = sq.astype(jnp.float32), sk.astype(jnp.float32)

  def kernel(q_gmem, sq_gmem, k_gmem, sk_gmem, v_gmem, o_gmem, q_smem, sq_smem, o_smem,
             k_smem, sk_smem, v_smem, q_bar, sq_bar, k_bar, sk_bar, v_bar, k_free, v_free,
             turn, *p_smem):
    p_smem = p_smem[0] if interpret else None
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")

    def take_turns():  # both compute warpgroups meet here; with one meeting of offset they
      plgpu.barrier_arrive(turn)   # alternate between tensor-core work and softmax
      plgpu.barrier_wait(turn)

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      rows = pl.ds(lax.axis_index("q_tiles") * 2 * block_q + wg * block_q, block_q)
      plgpu.copy_gmem_to_smem(q_gmem.at[batch, rows, head], q_smem.at[wg], q_bar.at[wg])
      plgpu.copy_gmem_to_smem(sq_gmem.at[batch, head, rows], sq_smem.at[wg], sq_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])
      plgpu.barrier_wait(sq_bar.at[wg])
      row_scale = plgpu.load(sq_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1)) * LOG2E
      m = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32),
                            plgpu.Layout.WGMMA.reduce(1))
      rowsum = plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32),
                                 plgpu.Layout.WGMMA.reduce(1))
      acc = plgpu.layout_cast(jnp.zeros((block_q, d), jnp.float32), plgpu.Layout.WGMMA)
      pl.when(wg == 1)(take_turns)

      def kv_step(i, carry):
        acc, m, rowsum = carry
        slot = lax.rem(i, steps)
        plgpu.barrier_wait(k_bar.at[slot])

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem.at[wg], k_smem.at[slot].transpose((1, 0)))
          take_turns()
          plgpu.wgmma_wait(0)
          return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.int32))
        plgpu.barrier_wait(sk_bar.at[slot])
        key_scale = plgpu.load(sk_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
        plgpu.barrier_arrive(k_free.at[slot])
        s = s.astype(jnp.float32) * lax.broadcast_in_dim(key_scale, s.shape, [1])
        # scores in base 2: z = s * row_scale (> 0), so max z = row_scale * max s
        m_new = jnp.maximum(m, s.max(axis=1) * row_scale)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * lax.broadcast_in_dim(row_scale, s.shape, [0])
                     - lax.broadcast_in_dim(m_new, s.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        rowsum = rowsum * alpha + p.sum(axis=1)
        p16 = p.astype(jnp.bfloat16)
        plgpu.barrier_arrive(turn)   # softmax done; the tensor cores are the other's first
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_wait(turn)
        if interpret:  # the interpreter's wgmma takes A from shared memory only
          p_smem[wg] = p16
          plgpu.commit_smem()
          p16 = p_smem.at[wg]
        acc = _wgmma_onto(acc, lambda acc_ref: plgpu.wgmma(acc_ref, p16, v_smem.at[slot]),
                          interpret)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, rowsum

      acc, m, rowsum = lax.fori_loop(0, kv_steps, kv_step, (acc, m, rowsum))
      pl.when(wg == 0)(take_turns)   # as many meetings as the other warpgroup
      o_smem[wg] = (acc / lax.broadcast_in_dim(rowsum, acc.shape, [0])).astype(jnp.bfloat16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[batch, rows, head])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def fetch(i, slot):
        keys = pl.ds(i * block_kv, block_kv)
        plgpu.copy_gmem_to_smem(k_gmem.at[batch, keys, head], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(sk_gmem.at[batch, head, keys], sk_smem.at[slot],
                                sk_bar.at[slot])
        return keys

      for i in range(steps):
        keys = fetch(i, i)
        plgpu.copy_gmem_to_smem(v_gmem.at[batch, keys, head], v_smem.at[i], v_bar.at[i])

      @pl.loop(steps, kv_steps)
      def _(i):
        slot = lax.rem(i, steps)
        plgpu.barrier_wait(k_free.at[slot])
        keys = fetch(i, slot)
        plgpu.barrier_wait(v_free.at[slot])
        plgpu.copy_gmem_to_smem(v_gmem.at[batch, keys, head], v_smem.at[slot], v_bar.at[slot])

      for slot in range(steps):   # the last tiles' releases (the interpreter checks them)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])

  kernel.__name__ = f"int8qk_flash_q{block_q}kv{block_kv}s{steps}"
  both = dict(num_arrivals=2)   # released by both compute warpgroups
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((b, l, h, d), jnp.bfloat16),
      grid=(h, l // (2 * block_q), b), grid_names=("heads", "q_tiles", "batch"),
      num_threads=3, thread_name="wg",
      scratch_types=[
          plgpu.SMEM((2, block_q, d), jnp.int8, transforms=_swizzled(d, jnp.int8)),
          plgpu.SMEM((2, block_q), jnp.float32),
          plgpu.SMEM((2, block_q, d), jnp.bfloat16, transforms=_swizzled(d, jnp.bfloat16)),
          plgpu.SMEM((steps, block_kv, d), jnp.int8, transforms=_swizzled(d, jnp.int8)),
          plgpu.SMEM((steps, block_kv), jnp.float32),
          plgpu.SMEM((steps, block_kv, d), jnp.bfloat16, transforms=_swizzled(d, jnp.bfloat16)),
          plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(num_barriers=steps),
          plgpu.Barrier(num_barriers=steps),
          plgpu.Barrier(num_barriers=steps),
          plgpu.Barrier(num_barriers=steps, **both),
          plgpu.Barrier(num_barriers=steps, **both),
          plgpu.Barrier(**both),
      ] + ([plgpu.SMEM((2, block_q, block_kv), jnp.bfloat16,
                       transforms=_swizzled(block_kv, jnp.bfloat16))] if interpret else []),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(q8, sq, k8, sk, v)


def supports(q: jax.Array) -> bool:
  """Whether ``int8qk_attention`` runs the kernel for q [B, L, H, D] (else the caller uses the
  reference): a Hopper GPU, no sequence sharding, D % 64 == 0, L % 128 == 0."""
  from svdq_jax.parallel import token_mesh
  return (on_hopper() and token_mesh() is None and q.ndim == 4 and q.shape[-1] % 64 == 0
          and q.shape[1] % 128 == 0)


def int8qk_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                     interpret: bool = False) -> jax.Array:
  """``svdq_jax.attention.int8_attention(q, k, v, pv='bf16')`` on the kernel.
  q, k, v [B, L, H, D] -> [B, L, H, D] in q's dtype."""
  return flash(*prepare(q, k, v), interpret=interpret).astype(q.dtype)


__all__ = ["flash", "prepare", "reference", "int8qk_attention", "supports"]
