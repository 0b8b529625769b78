"""INT8 q k^T flash attention on Hopper (Pallas, Mosaic GPU: TMA, wgmma s8, bf16 or e4m3).

The kernel of ``svdq_jax.attention.int8_attention(q, k, v, pv)`` (its numerics are the
definition): per-token INT8 q (times 1/sqrt(D)) and k (minus its token mean), scores exact in
int32 and scaled once; P V in bf16 (pv='bf16') or FP8 (pv='fp8': P~ x448 and V per channel as
E4M3). On Hopper the s8 and e4m3 wgmma run at twice the bf16 rate. A bf16 P is the A operand
straight from registers; an FP8 P goes through shared memory, since Mosaic GPU does not re-lay
the accumulator's registers out as an 8-bit operand, and V goes in transposed ([D, keys]:
8-bit wgmma takes both operands K-major).

Structure (FlashAttention-3's, as in jax's Mosaic GPU attention example): one CTA per (head,
2 block_q queries, batch) with three warpgroups. The memory warpgroup streams K (int8), its
per-key scales and V (bf16) into a ring of ``steps`` shared-memory slots with TMA. Each of the
two compute warpgroups owns block_q queries: per KV tile it issues S = q8 . k8^T (int32), forms
the scores in base 2, z = S s_k (per key) (s_q log2 e) (per query), runs the online softmax
(running max m, rowsum l, the accumulator rescaled by 2^(m_old - m_new)), and issues
O += P . V, P = bf16(2^(z - m)) (or e4m3(448 2^(z - m))). A barrier makes the two warpgroups
take turns, so one's softmax overlaps the other's tensor-core work. The output is O / l, rounded
to bf16. Measured on an H200 at FLUX's shape: 0.50 ms against cuDNN's bf16 0.45 (docs/benchmarks,
2026-12-03): the structure, not the tensor cores, bounds it.

Rounding differs from the reference only in P: the kernel rounds 2^(z - running max), the
reference exp(s - row max); both divide by the rowsum of the unrounded values.
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
from svdq_jax.parallel import token_mesh
from svdq_jax.pallas_kernels.w4a4_hopper import (_swizzled, _wgmma_onto, on_hopper,
                                                  settles_when_interpreted)

LOG2E = math.log2(math.e)
# int32 -> f32 without I2F (a conversion unit op, as slow as exp2 on Hopper): for |x| < 2^22,
# the f32 with bits MAGIC_BITS + x is exactly MAGIC + x. |q8 . k8| <= 127^2 D < 2^22 for D <= 256.
MAGIC_BITS, MAGIC = 0x4B400000, 12582912.0   # 1.5 x 2^23
PV_FORMATS = ("bf16", "fp8")


def prepare(q: jax.Array, k: jax.Array, v: jax.Array, pv: str = "bf16") -> tuple:
  """The kernel's operands from q, k, v [B, L, H, D] (any float dtype), as the reference
  quantizes them: (q8, s_q, k8, s_k, v) with q8, k8 int8 [B, L, H, D], s_q, s_k f32 [B, H, L]
  (s_q includes 1/sqrt(D)), v bf16 [B, L, H, D]; for pv='fp8' (q8, s_q, k8, s_k, vt8, s_v)
  with vt8 the E4M3 codes of V transposed [B, H, D, L] and s_v f32 [B, H, D]."""
  if pv not in PV_FORMATS:
    raise ValueError(f"pv must be one of {PV_FORMATS}, got {pv!r}")
  qf, kf, vf = attention._smoothed_f32(q, k, v)
  q8, sq = attention._int8_rows(qf * (q.shape[-1] ** -0.5))
  k8, sk = attention._int8_rows(kf)
  per_head = lambda s: jnp.transpose(s[..., 0], (0, 2, 1))
  ops = (q8, per_head(sq), k8, per_head(sk))
  if pv == "bf16":
    return (*ops, vf.astype(jnp.bfloat16))
  v8, sv = attention._e4m3_channels(vf)
  return (*ops, jnp.transpose(v8, (0, 2, 3, 1)), sv[:, 0])


def reference(q8, sq, k8, sk, v, sv=None) -> jax.Array:
  """jnp semantics of ``flash`` (f32 [B, L, H, D]): ``int8_attention`` with pv='bf16', or with
  pv='fp8' when s_v is given (v then the E4M3 V^T [B, H, D, L]), after ``prepare``."""
  acc = jnp.einsum("bqhd,bkhd->bhqk", q8, k8, preferred_element_type=jnp.int32)
  scores = acc.astype(jnp.float32) * sq[..., :, None] * sk[..., None, :]
  p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
  rowsum = jnp.sum(p, axis=-1).transpose(0, 2, 1)[..., None]
  if sv is None:
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                     preferred_element_type=jnp.float32)
    return out / rowsum
  p8 = (p * attention.FP8_MAX).astype(jnp.float8_e4m3fn).astype(jnp.float32)
  out = jnp.einsum("bhqk,bhdk->bqhd", p8, v.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return out * (sv[:, None] / attention.FP8_MAX) / rowsum


@settles_when_interpreted
@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "steps", "interpret"))
def flash(q8, sq, k8, sk, v, sv=None, *, block_q: int = 64, block_kv: int = 128,
          steps: int = 2, interpret: bool = False) -> jax.Array:
  """softmax(scores) v with scores = (q8 . k8^T) s_q s_k, on the int8 and bf16/e4m3 tensor
  cores (``prepare`` makes the operands).

  Args:
    q8, k8: int8 [B, L, H, D] (D a multiple of 64). sq, sk: f32 [B, H, L] per-token scales.
    v: bf16 [B, L, H, D]; or, with sv f32 [B, H, D] given, FP8 P V: v the E4M3 codes of V
      transposed, [B, H, D, L]. L a multiple of 2 block_q and of block_kv.
    block_q: queries per compute warpgroup (multiple of 64); block_kv: keys per pipeline
      step (multiple of 64); steps: pipeline depth (K/V tiles in flight).
    interpret: Pallas' GPU interpret mode (CPU; tests/conftest.py sizes its thread pool).

  Returns:
    bf16 [B, L, H, D].
  """
  b, l, h, d = q8.shape
  fp8 = sv is not None
  v_shape = (b, h, d, l) if fp8 else (b, l, h, d)
  if k8.shape != q8.shape or v.shape != v_shape:
    raise ValueError(f"q8, k8 must be [B, L, H, D] and v {'[B, H, D, L]' if fp8 else 'too'}: "
                     f"got {q8.shape}, {k8.shape}, {v.shape}")
  if fp8 and (sv.shape != (b, h, d) or v.dtype != jnp.float8_e4m3fn):
    raise ValueError(f"FP8 P V needs v as float8_e4m3fn codes and sv [B, H, D] = {(b, h, d)}, "
                     f"got {v.dtype}, {sv.shape}")
  if sq.shape != (b, h, l) or sk.shape != (b, h, l):
    raise ValueError(f"sq, sk must be [B, H, L] = {(b, h, l)}, got {sq.shape}, {sk.shape}")
  if q8.dtype != jnp.int8 or k8.dtype != jnp.int8:
    raise ValueError(f"q8, k8 must be int8, got {q8.dtype}, {k8.dtype}")
  if d % 64 or d > 256 or block_q % 64 or block_kv % 64:
    raise ValueError(f"head dim {d} (<= 256), block_q {block_q}, block_kv {block_kv} must be "
                     "multiples of 64")
  if l % (2 * block_q) or l % block_kv:
    raise ValueError(f"L={l} must be a multiple of 2 block_q = {2 * block_q} and of "
                     f"block_kv = {block_kv}")
  kv_steps = l // block_kv
  steps = max(1, min(steps, kv_steps))
  if not fp8:
    v = v.astype(jnp.bfloat16)
  sq, sk = sq.astype(jnp.float32), sk.astype(jnp.float32)
  p_dtype = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
  p_offset = math.log2(attention.FP8_MAX) if fp8 else 0.0   # P~ x448 as 2^(z - m + log2 448)
  p_in_smem = fp8 or interpret   # the interpreter's wgmma takes A from shared memory only

  def kernel(q_gmem, sq_gmem, k_gmem, sk_gmem, v_gmem, *refs):
    it = iter(refs)
    sv_gmem = next(it) if fp8 else None
    (o_gmem, q_smem, sq_smem, o_smem, k_smem, sk_smem, v_smem, q_bar, sq_bar, k_bar, sk_bar,
     v_bar, k_free, v_free, turn) = (next(it) for _ in range(15))
    p_smem = next(it) if p_in_smem else None
    sv_smem = next(it) if fp8 else None
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
      if fp8:   # the channel scales of V, for the output (same barrier: 2 arrivals)
        plgpu.copy_gmem_to_smem(sv_gmem.at[batch, head], sv_smem.at[wg], sq_bar.at[wg])
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
        s = lax.bitcast_convert_type(s + MAGIC_BITS, jnp.float32) - MAGIC
        s = s * lax.broadcast_in_dim(key_scale, s.shape, [1])
        # scores in base 2: z = s * row_scale (> 0), so max z = row_scale * max s
        m_new = jnp.maximum(m, s.max(axis=1) * row_scale)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * lax.broadcast_in_dim(row_scale, s.shape, [0])
                     - lax.broadcast_in_dim(m_new - p_offset, s.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        rowsum = rowsum * alpha + p.sum(axis=1)
        p = p.astype(p_dtype)
        if p_in_smem:
          p_smem[wg] = p
          plgpu.commit_smem()
          p = p_smem.at[wg]
        plgpu.barrier_arrive(turn)   # softmax done; the tensor cores are the other's first
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_wait(turn)
        v_op = v_smem.at[slot].transpose((1, 0)) if fp8 else v_smem.at[slot]
        acc = _wgmma_onto(acc, lambda acc_ref: plgpu.wgmma(acc_ref, p, v_op), interpret)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, rowsum

      acc, m, rowsum = lax.fori_loop(0, kv_steps, kv_step, (acc, m, rowsum))
      pl.when(wg == 0)(take_turns)   # as many meetings as the other warpgroup
      out = acc / lax.broadcast_in_dim(rowsum, acc.shape, [0])
      if fp8:   # P~ carried 448, so rowsum did too: out = (P8 V8) s_v / rowsum
        v_scale = plgpu.load(sv_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(0))
        out = out * lax.broadcast_in_dim(v_scale, out.shape, [1])
      o_smem[wg] = out.astype(jnp.bfloat16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[batch, rows, head])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      def fetch_k(i, slot):
        keys = pl.ds(i * block_kv, block_kv)
        plgpu.copy_gmem_to_smem(k_gmem.at[batch, keys, head], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(sk_gmem.at[batch, head, keys], sk_smem.at[slot],
                                sk_bar.at[slot])

      def fetch_v(i, slot):
        keys = pl.ds(i * block_kv, block_kv)
        src = v_gmem.at[batch, head, :, keys] if fp8 else v_gmem.at[batch, keys, head]
        plgpu.copy_gmem_to_smem(src, v_smem.at[slot], v_bar.at[slot])

      for i in range(steps):
        fetch_k(i, i)
        fetch_v(i, i)

      @pl.loop(steps, kv_steps)
      def _(i):
        slot = lax.rem(i, steps)
        plgpu.barrier_wait(k_free.at[slot])
        fetch_k(i, slot)
        plgpu.barrier_wait(v_free.at[slot])
        fetch_v(i, slot)

      for slot in range(steps):   # the last tiles' releases (the interpreter checks them)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])

  kernel.__name__ = f"int8qk_flash_{'fp8pv' if fp8 else 'bf16pv'}_q{block_q}kv{block_kv}s{steps}"
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
          plgpu.SMEM((steps, d, block_kv), jnp.float8_e4m3fn,
                     transforms=_swizzled(block_kv, jnp.float8_e4m3fn)) if fp8 else
          plgpu.SMEM((steps, block_kv, d), jnp.bfloat16, transforms=_swizzled(d, jnp.bfloat16)),
          plgpu.Barrier(num_barriers=2),
          plgpu.Barrier(num_barriers=2, num_arrivals=2 if fp8 else 1),
          plgpu.Barrier(num_barriers=steps),
          plgpu.Barrier(num_barriers=steps),
          plgpu.Barrier(num_barriers=steps),
          plgpu.Barrier(num_barriers=steps, **both),
          plgpu.Barrier(num_barriers=steps, **both),
          plgpu.Barrier(**both),
      ] + ([plgpu.SMEM((2, block_q, block_kv), p_dtype, transforms=_swizzled(block_kv, p_dtype))]
           if p_in_smem else [])
        + ([plgpu.SMEM((2, d), jnp.float32)] if fp8 else []),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(q8, sq, k8, sk, v, *([sv.astype(jnp.float32)] if fp8 else []))


def supports(q: jax.Array) -> bool:
  """Whether ``int8qk_attention`` runs the kernel for q [B, L, H, D] (else the caller uses the
  reference): a Hopper GPU, no sequence sharding, D % 64 == 0, L % 128 == 0."""
  return (on_hopper() and token_mesh() is None and q.ndim == 4 and q.shape[-1] % 64 == 0
          and q.shape[1] % 128 == 0)


def int8qk_attention(q: jax.Array, k: jax.Array, v: jax.Array, pv: str = "bf16", *,
                     interpret: bool = False) -> jax.Array:
  """``svdq_jax.attention.int8_attention(q, k, v, pv)`` on the kernel.
  q, k, v [B, L, H, D] -> [B, L, H, D] in q's dtype."""
  return flash(*prepare(q, k, v, pv), interpret=interpret).astype(q.dtype)


__all__ = ["flash", "prepare", "reference", "int8qk_attention", "supports"]
