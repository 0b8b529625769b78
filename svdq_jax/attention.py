"""8-bit attention: INT8 Q K^T and FP8 P V (SageAttention-style), the jnp reference; and
FP8 throughout as cuDNN's FP8 flash attention computes it (``fp8_attention``), with that
kernel (``cudnn_fp8_attention``).

On Hopper, bf16 attention is ~19% of a FLUX.1-dev 1024x1024 step (23.2 of 122.2 ms in the
W4A8 step, docs/benchmarks); int8 and fp8 tensor cores run twice bf16's rate. This module
defines the numerics a kernel must reproduce, so their quality can be measured (the demo's
"+ 8-bit attention" columns); ``pallas_kernels.attention_int8`` is their Hopper kernel:

  1. K smoothing: k <- k - mean over tokens of k (per batch, head, channel; over a strided
     sample of >= 256 tokens in long sequences). Softmax over keys is invariant to adding one
     vector to every key (each score row shifts by a constant), and removing the shared
     component shrinks K's range before rounding.
  2. Q (times 1/sqrt(D)) and K as symmetric per-token INT8: s = max|x| / 127 per token and
     head, codes round(x / s) in [-127, 127]; scores = (q8 k8^T, exact in int32) s_q s_k^T.
  3. P~ = exp(scores - row max) in [0, 1], unnormalized, as FP8 E4M3 after x448 (its largest
     normal); V as FP8 E4M3 per channel: s_v = max over tokens |v| / 448 per (batch, head,
     channel). out = (P~8 V8, summed in f32) s_v / 448 / rowsum(P~), rowsum of the unrounded P~.
     A flash kernel takes the row max per key tile and rescales; its P~ then differs from this
     one by rounding only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from svdq_jax import formats

FP8_MAX = 448.0  # largest normal float8_e4m3fn
SMOOTHING_SAMPLES = 256  # tokens (at least) whose mean k smoothing subtracts
V_HEADROOM = 16.0  # v's FP8 scale: this many times the largest |v| of a token sample


def _int8_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x f32 [B, L, H, D] -> codes int8 [B, L, H, D], scales f32 [B, L, H, 1] (per token, head).
  All-zero rows get scale 1 and codes 0; a row holding a NaN codes 0 and a NaN scale (so
  that the attention rows it reaches come out NaN, as exact attention's do)."""
  amax = formats.absmax(x, -1)
  scale = jnp.where(amax == 0, 1.0, amax * formats.INV_127)
  codes = jnp.clip(jnp.round(x * formats.reciprocal(scale)), -127, 127)
  return jnp.where(jnp.isnan(codes), 0, codes).astype(jnp.int8), scale


def _e4m3_channels(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """v f32 [B, L, H, D] -> E4M3 codes [B, L, H, D], scales f32 [B, 1, H, D]: per (batch, head,
  channel), s = max over tokens |v| / 448 (1 for all-zero channels)."""
  vamax = jnp.max(jnp.abs(v), axis=1, keepdims=True)
  sv = jnp.where(vamax > 0, vamax / FP8_MAX, 1.0)
  return (v / sv).astype(jnp.float8_e4m3fn), sv


def token_sample(x: jax.Array) -> jax.Array:
  """x [B, L, ...] -> every ``sample_stride(L)``-th token of it: the sample that FP8
  attention's per-tensor statistics (k's mean, v's maximum) are taken over."""
  return x[:, ::sample_stride(x.shape[1])]


def sample_stride(length: int) -> int:
  """L // 256 for sequences of L >= 512 tokens, else 1 (every token)."""
  return max(1, length // SMOOTHING_SAMPLES)


def _smoothed_f32(q, k, v) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q, k, v [B, L, H, D] checked and in f32, k minus its mean over ``token_sample`` (step
  1). Any vector taken from every key leaves the softmax exact, so a sample's mean serves as
  well as the full one and reads 1 / stride of k (the full column sum cost 1.4 ms of a
  FLUX.1-dev step with FP8 attention, H200)."""
  if not q.shape == k.shape == v.shape or q.ndim != 4:
    raise ValueError(f"q, k, v must be [B, L, H, D] of one shape, got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  return q, k - jnp.mean(token_sample(k), axis=1, keepdims=True), v


def v_bound(v: jax.Array) -> jax.Array:
  """The bound FP8 attention scales v [B, L, H, D] by: ``sample_v_bound(token_sample(v))``."""
  return sample_v_bound(token_sample(v))


def sample_v_bound(v_sample: jax.Array) -> jax.Array:
  """V_HEADROOM x the largest |v| of v's ``token_sample`` (f32 scalar). A pass over all of v
  for its maximum cost 1.0 ms of a FLUX.1-dev step (H200); E4M3 is a float format, so
  headroom costs precision only in its subnormals (values under bound / 2^14.8; on random
  inputs the error is 6.52% at 1x and 16x, 6.54% at 64x, 7.6% at 256x), and a value past the
  bound saturates at 448."""
  return V_HEADROOM * jnp.max(jnp.abs(v_sample)).astype(jnp.float32)


def int8_attention(q: jax.Array, k: jax.Array, v: jax.Array, pv: str = "fp8") -> jax.Array:
  """softmax(q k^T / sqrt(D)) v with INT8 scores and an FP8 P V (module docstring).

  Args:
    q, k, v: [B, L, H, D] (any float dtype; queries and keys of one length L, no mask).
    pv: 'fp8' (step 3) or 'bf16': P~ and V rounded to bf16 instead (INT8 scores only).
      Measured on random inputs (tests/test_attention.py): FP8 P V dominates the error
      (3.4% relative vs 0.8% for INT8 scores alone): E4M3 keeps 3 mantissa bits.

  Returns:
    [B, L, H, D] in q's dtype.
  """
  if pv not in ("fp8", "bf16"):
    raise ValueError(f"pv must be 'fp8' or 'bf16', got {pv!r}")
  dtype = q.dtype
  q, k, v = _smoothed_f32(q, k, v)
  q8, sq = _int8_rows(q * (q.shape[-1] ** -0.5))
  k8, sk = _int8_rows(k)
  acc = jnp.einsum("bqhd,bkhd->bhqk", q8, k8, preferred_element_type=jnp.int32)
  scores = acc.astype(jnp.float32) * sq[..., 0].transpose(0, 2, 1)[..., None] \
      * sk[..., 0].transpose(0, 2, 1)[:, :, None, :]
  p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))       # [B, H, Lq, Lk]
  rowsum = jnp.sum(p, axis=-1).transpose(0, 2, 1)[..., None]          # [B, Lq, H, 1]
  if pv == "bf16":
    out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                     preferred_element_type=jnp.float32)
    return (out / rowsum).astype(dtype)
  p8 = (p * FP8_MAX).astype(jnp.float8_e4m3fn).astype(jnp.float32)
  v8, sv = _e4m3_channels(v)
  out = jnp.einsum("bhqk,bkhd->bqhd", p8, v8.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return (out * (sv / FP8_MAX) / rowsum).astype(dtype)


def _e4m3_tensor(x: jax.Array, bound: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """x f32 -> (E4M3 codes of x / s, s): one scale for the whole tensor, s = max|x| / 448, or
  with a static ``bound`` on |x| the power of two at or above bound / 448 (x / s is exact, and
  no pass over x has to find its maximum first). Codes saturate at +-448: E4M3FN has no
  infinity, an overflow would be NaN."""
  if bound is None:
    s = jnp.maximum(jnp.max(jnp.abs(x)), jnp.finfo(jnp.float32).tiny) / FP8_MAX
    return (x / s).astype(jnp.float8_e4m3fn), s
  s, inv = pow2_scale_and_inverse(bound)
  return jnp.clip(x * inv, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn), s


def pow2_scale(bound: jax.Array) -> jax.Array:
  """The E4M3 scale for values bounded by ``bound``: the least power of two s with s * 448
  >= bound, at least 2^-126 (so that 1 / s is finite); a NaN or infinite bound is its own
  scale. f32, bound's shape."""
  return pow2_scale_and_inverse(bound)[0]


def pow2_scale_and_inverse(bound: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(``pow2_scale(bound)``, its reciprocal), made from bound's exponent by integer
  operations: exact, and the same bits wherever it runs. exp2(ceil(log2(bound / 448)))
  rounds: XLA's exp2 on the CPU does not return exact powers of two, and at large exponents
  log2 of a value just above a power of two rounds down to the integer."""
  b = jnp.maximum(jnp.asarray(bound, jnp.float32), jnp.finfo(jnp.float32).tiny)
  bits = jax.lax.bitcast_convert_type(b, jnp.int32)
  # b = m 2^e with m in [1, 2) and 448 = 1.75 2^8: b / 448 <= 2^(e - 8) iff m <= 1.75
  e = (bits >> 23) - 8 + ((bits & 0x7FFFFF) > 0x600000).astype(jnp.int32)   # biased
  e = jnp.maximum(e, 1)
  s = jax.lax.bitcast_convert_type(e << 23, jnp.float32)
  inv = jax.lax.bitcast_convert_type((254 - e) << 23, jnp.float32)
  finite = jnp.isfinite(b)
  return jnp.where(finite, s, b), jnp.where(finite, inv, 1.0 / b)


def e4m3_operands(q, k, v, qk_bound) -> tuple:
  """The three E4M3 operands and scales of FP8 attention, ((q8, sq), (k8, sk), (v8, sv)) (k
  minus its token mean first; q, k, v [B, L, H, D], codes [B, L, H, D], f32 scalar scales).
  qk_bound: None (q's and k's scales from their maxima) or a bound on |q| and |k| (static
  scales for q and k; |k - mean| <= 2 qk_bound); v's scale from ``v_bound``."""
  q, k, v = _smoothed_f32(q, k, v)
  bq, bk = (None, None) if qk_bound is None else (qk_bound, 2.0 * qk_bound)
  return _e4m3_tensor(q, bq), _e4m3_tensor(k, bk), _e4m3_tensor(v, v_bound(v))


def rms_norm_bound(head_dim: int, *scales: jax.Array) -> jax.Array:
  """A bound on |x| for x the output of an RMSNorm with any of these scale vectors, then
  rotated in pairs (RoPE): sqrt(head_dim) max|scale| (sum of x^2 / rms^2 is head_dim, and a
  rotation keeps each pair's norm), times 1 + 2^-7 for two bf16 roundings. f32 scalar."""
  amax = jnp.max(jnp.stack([jnp.max(jnp.abs(s)) for s in scales]))
  return amax.astype(jnp.float32) * (head_dim ** 0.5 * (1.0 + 2.0 ** -7))


def fp8_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                  qk_bound: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v as cuDNN's FP8 flash attention computes it (the reference of
  ``cudnn_fp8_attention``): k minus its token mean, then q, k, v as E4M3 with one scale per
  tensor, scores in f32 from the E4M3 products, P~ = exp(s - row max) as E4M3 x448, P V
  summed in f32, and the output itself rounded to E4M3 with v's scale (it is a convex
  combination of V's rows; v's scale is a power of two from ``v_bound``). q, k, v [B, L,
  H, D] -> [B, L, H, D] in q's dtype.
  qk_bound (f32 scalar, e.g. ``rms_norm_bound``): q's and k's scales static powers of two
  (``_e4m3_tensor``), so their quantization fuses into the op that produces them; E4M3 is a
  float format, so a scale with headroom costs precision only below its normal range."""
  (q8, sq), (k8, sk), (v8, sv) = e4m3_operands(q, k, v, qk_bound)
  return (fp8_kernel_reference(q8, k8, v8, sq, sk).astype(jnp.float32) * sv).astype(q.dtype)


def fp8_kernel_reference(q8, k8, v8, sq, sk) -> jax.Array:
  """``cudnn_fp8_kernel``'s numerics on E4M3 q8, k8, v8 [B, L, H, D] in units of the f32
  scalars sq, sk (and v's): the E4M3 output [B, L, H, D] in v's units."""
  f32 = lambda t: t.astype(jnp.float32)
  scores = jnp.einsum("bqhd,bkhd->bhqk", f32(q8), f32(k8),
                      precision=jax.lax.Precision.HIGHEST) * (sq * sk * q8.shape[-1] ** -0.5)
  p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
  p8 = (p * FP8_MAX).astype(jnp.float8_e4m3fn)
  out = jnp.einsum("bhqk,bkhd->bqhd", f32(p8), f32(v8), precision=jax.lax.Precision.HIGHEST)
  out = out / FP8_MAX / jnp.sum(p, axis=-1).transpose(0, 2, 1)[..., None]   # in V's codes
  return out.astype(jnp.float8_e4m3fn)


def cudnn_fp8_operands(q: jax.Array, k: jax.Array, v: jax.Array,
                       qk_bound: jax.Array | None = None) -> tuple:
  """q, k, v [B, L, H, D] -> (q8, k8, v8 E4M3 [B, L, H, D], the cuDNN FP8 parameters, f32
  s_v): ``cudnn_fp8_attention``'s quantization passes (k minus its token mean, one scale per
  tensor; qk_bound as in ``fp8_attention``), the operands of ``cudnn_fp8_kernel``."""
  (q8, sq), (k8, sk), (v8, sv) = e4m3_operands(q, k, v, qk_bound)
  return q8, k8, v8, cudnn_fp8_params(sq, sk, sv), sv


def cudnn_fp8_params(sq: jax.Array, sk: jax.Array, sv: jax.Array) -> dict:
  """The cuDNN FP8 parameters for E4M3 q, k, v in units of sq, sk, sv (f32 scalars): P
  quantized with 448, the output in units of sv."""
  from jax._src.cudnn.fused_attention_stablehlo import fp8_params_keys
  one = lambda x: jnp.reshape(x, (1, 1, 1, 1)).astype(jnp.float32)
  # the API asks for the backward pass's scales too; a forward-only call never reads them
  params = {name: one(1.0) for name in fp8_params_keys}
  params.update(descale_q=one(sq), descale_k=one(sk), descale_v=one(sv),
                descale_s=one(1.0 / FP8_MAX), scale_s=one(FP8_MAX), scale_o=one(1.0 / sv))
  return params


def cudnn_fp8_kernel(q8: jax.Array, k8: jax.Array, v8: jax.Array, params: dict) -> jax.Array:
  """cuDNN's FP8 flash attention alone on ``cudnn_fp8_operands``' q8, k8, v8 and parameters:
  the E4M3 output [B, L, H, D] in units of s_v."""
  from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention
  if jax.default_backend() != "gpu":
    raise RuntimeError(f"cuDNN's FP8 attention runs on NVIDIA GPUs only, not on "
                       f"{jax.default_backend()!r}: its numerics there are fp8_attention "
                       f"(attention implementation 'fp8')")
  out, _, _ = dot_product_attention(q8, k8, v8, fp8_params=params,
                                    scale=q8.shape[-1] ** -0.5, use_fp8=True)
  return out


def cudnn_fp8_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        qk_bound: jax.Array | None = None) -> jax.Array:
  """``fp8_attention`` on cuDNN's FP8 flash attention kernel (NVIDIA GPUs with cuDNN >= 9;
  jax's private ``jax._src.cudnn.fused_attention_stablehlo`` API). q, k, v [B, L, H, D]
  bf16 -> bf16."""
  q8, k8, v8, params, sv = cudnn_fp8_operands(q, k, v, qk_bound)
  return (cudnn_fp8_kernel(q8, k8, v8, params).astype(jnp.float32) * sv).astype(q.dtype)


__all__ = ["int8_attention", "fp8_attention", "cudnn_fp8_attention", "cudnn_fp8_operands",
           "cudnn_fp8_params", "cudnn_fp8_kernel", "e4m3_operands", "fp8_kernel_reference",
           "rms_norm_bound",
           "pow2_scale", "pow2_scale_and_inverse",
           "sample_stride", "sample_v_bound", "token_sample", "FP8_MAX"]
