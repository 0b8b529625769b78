"""The Mosaic GPU W4A4 GEMM (Hopper) in GPU interpret mode against its jnp reference, its
weight operand encodings, kernel choice and errors.

Interpret mode needs XLA's CPU thread pool to be larger than the kernel's warpgroups
(tests/conftest.py sets PJRT_NPROC); at FLUX shapes the same checks run on the H100 in
scripts/bench_w4a4_hopper.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdq_jax import formats, qlinear
from svdq_jax.pallas_kernels import w4a4, w4a4_hopper as hop


def _operands(m, k, n, rank, bias, unsigned=False, seed=0):
  ks = jax.random.split(jax.random.key(seed), 7)
  lo, hi = (0, 16) if unsigned else (-8, 8)
  a_q = jax.random.randint(ks[0], (m, k), lo, hi, jnp.int8)
  w_packed = formats.pack(jax.random.randint(ks[1], (n, k), -8, 8, jnp.int8), "int4")
  sa = jax.random.uniform(ks[2], (k // 64, m), minval=0.01, maxval=0.1)
  sw = jax.random.uniform(ks[3], (k // 64, n), minval=0.01, maxval=0.1)
  sw = sw.astype(jnp.bfloat16).astype(jnp.float32)
  lr = jax.random.normal(ks[4], (m, rank), jnp.bfloat16) if rank else None
  up = jax.random.normal(ks[5], (n, rank), jnp.bfloat16) if rank else None
  b = jax.random.normal(ks[6], (n,)) if bias else None
  return a_q, sa, w_packed, sw, lr, up, b


def test_reference_is_group_scaled_matmul():
  """The kernel's reference agrees with the library's quantized matmul semantics."""
  a_q, sa, w_packed, sw, *_ = _operands(16, 128, 128, 0, False)
  qa = formats.Quantized(q=a_q, scale=sa.T, tensor_scale=jnp.float32(1))
  qw = formats.Quantized(q=formats.unpack(w_packed, "int4"), scale=sw.T,
                         tensor_scale=jnp.float32(1))
  want = qlinear.group_scaled_matmul(qa, qw, 64)
  np.testing.assert_allclose(np.asarray(hop.reference(a_q, sa, w_packed, sw)),
                             np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_weight_operand_encodings_are_exact():
  """Every packed nibble pair becomes 16 x n in int8 and (n + 8) * 2**-9 in e4m3."""
  codes = jnp.array(np.indices((16, 16)).reshape(2, -1).T - 8, jnp.int8)   # all pairs
  w = jnp.tile(codes.reshape(-1), 64 * 4 // codes.size + 1)[:4 * 64].reshape(4, 64)
  packed = jax.lax.bitcast_convert_type(formats.pack(w, "int4"), jnp.int8)
  s8 = hop._unpack_weights(packed, "s8", interpret=True)
  assert s8.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(s8, np.int32), 16 * np.asarray(w, np.int32))
  e4m3 = hop._unpack_weights(packed, "e4m3", interpret=True)
  assert e4m3.dtype == jnp.float8_e4m3fn
  np.testing.assert_array_equal(np.asarray(e4m3.astype(jnp.float32)) * 2 ** 9,
                                np.asarray(w, np.float32) + 8)


def test_e4m3_offset_correction_recovers_the_int_product():
  """The e4m3 path's algebra: s_a (a . (n + 8) 2**-9) - 2**-6 s_a sum(a) = 2**-9 s_a (a . n)."""
  a_q, sa, w_packed, sw, *_ = _operands(8, 128, 128, 0, False, unsigned=True)
  w = formats.unpack(w_packed, "int4").astype(jnp.float32)
  a = a_q.astype(jnp.float32)
  y = 0
  for g in range(2):
    cols = slice(64 * g, 64 * (g + 1))
    part = a[:, cols] @ ((w[:, cols] + 8) * 2.0 ** -9).T            # what the MMA returns
    corr = -sa[g] * hop.group_sums_t(a_q)[g] * 2.0 ** -6
    y = y + (part * sa[g][:, None] + corr[:, None]) * (sw[g] * 2.0 ** 9)[None, :]
  want = hop.reference(a_q, sa, w_packed, sw)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(want).max()))


def test_kernel_choice_and_errors():
  assert not w4a4.hopper_gemm(40, 128, 128, interpret=True)  # auto: Triton off the GPU
  assert not hop.supports(40, 128, 64)                        # N not a multiple of 128
  assert hop.tiling(3072)["compute_wgs"] == 3 and hop.tiling(128)["compute_wgs"] == 2
  with pytest.raises(ValueError, match="GEMM kernel must be one of"):
    w4a4.set_gemm_kernel("cutlass")
  a_q, sa, w_packed, sw, *_ = _operands(16, 128, 128, 0, False)
  with pytest.raises(ValueError, match="K to be a multiple of 64, got K=96"):
    hop.w4a4_gemm_t(a_q[:, :96], sa, w_packed, sw, interpret=True)
  with pytest.raises(ValueError, match=r"N=128 is not a multiple of 256"):
    hop.w4a4_gemm_t(a_q, sa, w_packed, sw, tile_n=128, interpret=True)
  with pytest.raises(ValueError, match=r"N=128 is not a multiple of 192"):
    hop.w4a4_gemm_t(a_q, sa, w_packed, sw, compute_wgs=3, interpret=True)
  with pytest.raises(ValueError, match="accs must be >= 1"):
    hop.w4a4_gemm_t(a_q, sa, w_packed, sw, accs=0, interpret=True)
  with pytest.raises(ValueError, match=r"expected \[N, K/2\]"):
    hop.w4a4_gemm_t(a_q, sa, w_packed[:, :32], sw, interpret=True)
  with pytest.raises(ValueError, match="r a multiple of 16"):
    hop.w4a4_gemm_t(a_q, sa, w_packed, sw, jnp.ones((16, 8), jnp.bfloat16),
                    jnp.ones((128, 8), jnp.bfloat16), interpret=True)
  with pytest.raises(ValueError, match="mma must be one of"):
    hop.w4a4_gemm_t(a_q, sa, w_packed, sw, mma="int4", interpret=True)
  with pytest.raises(ValueError, match="out_dtype must be bfloat16 or float32"):
    hop.w4a4_gemm_t(a_q, sa, w_packed, sw, out_dtype=jnp.float16, interpret=True)


# one output tile per program, or (num_sms) several; ragged M (40: TMA-masked tail rows,
# 77: padded to 8 rows); both tilings of the library; both MMA types; low-rank and bias
INTERPRET_CASES = {
    "3wg-64x64": (64, 128, 192, 0, False, dict(tile_m=64, tile_n=64, compute_wgs=3)),
    "2wg-128x64-lowrank-bias-ragged": (40, 256, 128, 32, True,
                                       dict(tile_m=128, tile_n=64, compute_wgs=2)),
    "e4m3-uint4-padded-m": (77, 256, 192, 16, True,
                            dict(tile_m=64, tile_n=64, compute_wgs=3, mma="e4m3")),
    "tiles-per-program": (136, 256, 128, 0, False,
                          dict(tile_m=64, tile_n=64, compute_wgs=2, num_sms=2,
                               groups_per_step=4, steps=2)),
}


@pytest.mark.parametrize("case", INTERPRET_CASES)
def test_kernel_matches_reference_in_interpret_mode(case):
  m, k, n, rank, bias, kw = INTERPRET_CASES[case]
  ops = _operands(m, k, n, rank, bias, unsigned=kw.get("mma") == "e4m3")
  ref = np.asarray(hop.reference(*ops))
  scale = float(np.abs(ref).max())
  y32 = hop.w4a4_gemm_t(*ops, out_dtype=jnp.float32, interpret=True, **kw)
  assert y32.shape == (m, n) and y32.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y32), ref, rtol=1e-6, atol=1e-6 * scale)
  y16 = hop.w4a4_gemm_t(*ops, interpret=True, **kw)
  assert y16.dtype == jnp.bfloat16
  # bf16 output rounding: within one bf16 ulp of the f32 reference
  np.testing.assert_allclose(np.asarray(y16, np.float32), ref, rtol=2 ** -8, atol=1e-6 * scale)


@pytest.mark.parametrize("mma", hop.MMA_TYPES)
def test_kernel_is_exact_on_integers_in_interpret_mode(mma):
  """Unit scales, codes at the range ends: the f32 result is the integer GEMM, bit for bit."""
  m, k, n = 64, 256, 128
  keys = jax.random.split(jax.random.key(5), 2)
  lo = 0 if mma == "e4m3" else -8          # the e4m3 path is also checked with UINT4 codes
  a_q = jnp.where(jax.random.bernoulli(keys[0], 0.5, (m, k)), lo + 15, lo).astype(jnp.int8)
  w = jnp.where(jax.random.bernoulli(keys[1], 0.5, (n, k)), 7, -8).astype(jnp.int8)
  ones = lambda rows: jnp.ones((k // 64, rows), jnp.float32)
  y = hop.w4a4_gemm_t(a_q, ones(m), formats.pack(w, "int4"), ones(n), mma=mma, tile_m=64,
                      out_dtype=jnp.float32, interpret=True)
  want = np.asarray(a_q, np.int64) @ np.asarray(w, np.int64).T
  assert np.abs(want).max() < 2 ** 24      # exact in f32
  np.testing.assert_array_equal(np.asarray(y), want.astype(np.float32))

