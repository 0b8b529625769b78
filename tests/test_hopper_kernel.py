"""The Mosaic GPU W4A4 GEMM (Hopper) in GPU interpret mode against the jnp reference.

GPU interpret mode hangs when the persistent grid has several output tiles, so these shapes
fit one tile (M <= 128, N = 128); the FLUX shapes are checked on the H100 by
scripts/bench_w4a4_hopper.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdq_jax import formats, qlinear
from svdq_jax.pallas_kernels import w4a4, w4a4_hopper as hop
from svdq_jax.qlinear import QuantizedLinear


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


def _assert_bf16_close(y, ref):
  """y is the bf16 rounding of ref, up to f32 summation order (one bf16 ulp)."""
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=2 ** -8,
                             atol=1e-3 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("m,k,n,rank,bias,unsigned,gps", [
    (128, 256, 128, 32, True, False, 2),   # full tile, two groups per step, both epilogue parts
    (77, 128, 128, 16, True, False, 1),    # ragged M (padded to 80, TMA masks the tile's tail)
    (64, 192, 128, 0, False, True, 2),     # 3 groups (one per step), UINT4 codes, no epilogue
])
def test_gemm_matches_reference(m, k, n, rank, bias, unsigned, gps):
  args = _operands(m, k, n, rank, bias, unsigned)
  y = hop.w4a4_gemm_t(*args, groups_per_step=gps, interpret=True)
  assert y.shape == (m, n)
  _assert_bf16_close(y, hop.reference(*args))


def test_reference_is_group_scaled_matmul():
  """The kernel's reference agrees with the library's quantized matmul semantics."""
  a_q, sa, w_packed, sw, *_ = _operands(16, 128, 128, 0, False)
  qa = formats.Quantized(q=a_q, scale=sa.T, tensor_scale=jnp.float32(1))
  qw = formats.Quantized(q=formats.unpack(w_packed, "int4"), scale=sw.T,
                         tensor_scale=jnp.float32(1))
  want = qlinear.group_scaled_matmul(qa, qw, 64)
  np.testing.assert_allclose(np.asarray(hop.reference(a_q, sa, w_packed, sw)),
                             np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_linear_on_hopper_gemm_matches_reference_apply():
  m, k, n, r = 40, 128, 128, 16
  keys = jax.random.split(jax.random.key(4), 5)
  qw = formats.quantize_weight(jax.random.normal(keys[0], (n, k)) * 0.05, "int4")
  layer = QuantizedLinear(
      qweight=formats.pack(qw.q, "int4"), wscale=qw.scale.astype(jnp.bfloat16),
      smooth=jax.random.uniform(keys[1], (k,), minval=0.5, maxval=2.0),
      lora_down=(jax.random.normal(keys[2], (k, r)) * 0.1).astype(jnp.bfloat16),
      lora_up=(jax.random.normal(keys[3], (r, n)) * 0.1).astype(jnp.bfloat16),
      bias=jax.random.normal(keys[4], (n,)).astype(jnp.bfloat16),
      weight_format="int4", act_format="int4")
  x = (jax.random.normal(jax.random.key(5), (m, k)) * 2.0).astype(jnp.bfloat16)
  w4a4.set_gemm_kernel("hopper")
  try:
    assert w4a4.hopper_gemm(m, k, n, interpret=True)
    with qlinear.backend("interpret"):
      y = qlinear.apply(layer, x)
  finally:
    w4a4.set_gemm_kernel("auto")
  ref = qlinear.reference_apply(layer, x.astype(jnp.float32))
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=1e-2,
                             atol=1e-2 * float(jnp.abs(ref).max()))


def test_kernel_choice_and_errors():
  assert not w4a4.hopper_gemm(40, 128, 128, interpret=True)  # auto: Triton off the GPU
  assert not hop.supports(40, 128, 64)                        # N not a multiple of 128
  with pytest.raises(ValueError, match="GEMM kernel must be one of"):
    w4a4.set_gemm_kernel("cutlass")
  a_q, sa, w_packed, sw, *_ = _operands(16, 128, 128, 0, False)
  with pytest.raises(ValueError, match="K to be a multiple of 64, got K=96"):
    hop.w4a4_gemm_t(a_q[:, :96], sa, w_packed, sw, interpret=True)
  with pytest.raises(ValueError, match=r"N=128 is not a multiple of 256"):
    hop.w4a4_gemm_t(a_q, sa, w_packed, sw, tile_n=128, interpret=True)
  with pytest.raises(ValueError, match=r"expected \[N, K/2\]"):
    hop.w4a4_gemm_t(a_q, sa, w_packed[:, :32], sw, interpret=True)
  with pytest.raises(ValueError, match="r a multiple of 16"):
    hop.w4a4_gemm_t(a_q, sa, w_packed, sw, jnp.ones((16, 8), jnp.bfloat16),
                    jnp.ones((128, 8), jnp.bfloat16), interpret=True)
