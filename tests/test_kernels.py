"""Pallas W4A4 kernels in interpret mode against the jnp reference (small shapes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdq_jax import formats, qlinear
from svdq_jax.pallas_kernels import w4a4
from svdq_jax.qlinear import QuantizedLinear, group_scaled_matmul, lowrank_down


# one 16-group whose absmax 6 makes the NVFP4 scale 1: every E2M1 rounding tie, both signs
E2M1_TIES = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5,
             -3.5, -5.0, 0.0]


def _inputs(m, k, r, seed=0, unsigned=False, ties=False):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], (m, k)) * 2.0
  x = x.at[:, 5].multiply(40.0)  # an outlier channel
  if unsigned:
    x = jnp.abs(x)
  if ties:
    x = x.at[1, 16:32].set(jnp.asarray(E2M1_TIES))
  smooth = jax.random.uniform(keys[1], (k,), minval=0.5, maxval=2.0)
  down = (jax.random.normal(keys[2], (k, r)) * 0.1).astype(jnp.bfloat16) if r else None
  return x.astype(jnp.bfloat16), smooth, down


@pytest.mark.parametrize("act,m,r,smoothed,chunk", [
    ("int4", 37, 8, True, 16), ("uint4", 16, 32, True, 16), ("int4", 20, 0, False, 16),
    ("int4", 37, 8, True, 1), ("uint4", 33, 32, True, 2),  # chunk 1/2: K split over programs
    ("nvfp4", 37, 8, True, 16), ("nvfp4", 20, 0, False, 2)])
def test_activation_kernel_bit_exact(act, m, r, smoothed, chunk):
  nvfp4 = act == "nvfp4"
  x, smooth, down = _inputs(m, 192, r, unsigned=act == "uint4", ties=nvfp4 and not smoothed)
  smooth = smooth if smoothed else None
  q, s, lr = w4a4.quantize_act(x, smooth, down, act_format=act, block_m=16,
                               groups_per_program=chunk, interpret=True)
  xh = x.astype(jnp.float32) if smooth is None else x.astype(jnp.float32) / smooth
  ref = formats.quantize(xh, act)
  if nvfp4 and not smoothed:  # the ties group really is at scale 1, so its codes test rounding
    assert float(ref.scale[1, 1]) == 1.0
  np.testing.assert_array_equal(np.asarray(q), np.asarray(formats.pack(ref.q, act)))
  np.testing.assert_array_equal(np.asarray(s), np.asarray(ref.scale))
  if nvfp4:
    with pytest.raises(ValueError, match="nvfp4 activations come packed"):
      w4a4.quantize_act(x, smooth, down, act_format=act, codes=True, interpret=True)
  else:  # the Hopper GEMM's layout: the same codes as int8 [M, K], scales [K/64, M]
    codes, s_t, lr_c = w4a4.quantize_act(x, smooth, down, act_format=act, codes=True,
                                         block_m=16, groups_per_program=chunk, interpret=True)
    assert codes.dtype == jnp.int8 and codes.shape == x.shape
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(ref.q))
    np.testing.assert_array_equal(np.asarray(s_t), np.asarray(ref.scale).T)
    if r:
      np.testing.assert_array_equal(np.asarray(lr_c), np.asarray(lr))
  if r:
    want = lowrank_down(x, down, smooth)
    np.testing.assert_allclose(np.asarray(lr), np.asarray(want), rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(want).max()))
  else:
    assert lr is None


def _layer(k, n, r, seed=1, act="int4", smooth=None, down=None, bias=True):
  keys = jax.random.split(jax.random.key(seed), 3)
  fmt = "nvfp4" if act == "nvfp4" else "int4"
  w = jax.random.normal(keys[0], (n, k)) * 0.05
  w = w * jnp.linspace(0.1, 3.0, n)[:, None]  # rows of different ranges: channel scales differ
  qw = formats.quantize_weight(w, fmt)
  return QuantizedLinear(
      qweight=formats.pack(qw.q, fmt), wscale=qw.scale,
      wcscale=qw.tensor_scale[:, 0] if fmt == "nvfp4" else None, smooth=smooth,
      lora_down=down,
      lora_up=(jax.random.normal(keys[1], (r, n)) * 0.1).astype(jnp.bfloat16) if r else None,
      bias=jax.random.normal(keys[2], (n,)) if bias else None,
      weight_format=fmt, act_format=act)


@pytest.mark.parametrize("act", ["int4", "uint4", "nvfp4"])
def test_gemm_integer_part_matches_reference(act):
  m, k, n = 33, 128, 64
  x, smooth, _ = _inputs(m, k, 0, seed=2, unsigned=act == "uint4")
  layer = _layer(k, n, 0, act=act, bias=False)
  q, s, _ = w4a4.quantize_act(x, None, None, act_format=act, block_m=16, interpret=True)
  y = w4a4.w4a4_gemm(q, s, layer.qweight, layer.wscale, w_channel_scale=layer.wcscale,
                     act_format=act, out_dtype=jnp.float32, block_m=16, block_n=32,
                     interpret=True)
  fmt = formats.get_format(act)
  qa = formats.Quantized(formats.unpack(q, act), s, jnp.float32(1.0))
  ref = group_scaled_matmul(qa, layer.weight(), fmt.group_size) * fmt.step ** 2
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6,
                             atol=1e-6 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("gemm,n,act", [("triton", 64, "int4"), ("hopper", 192, "int4"),
                                        ("triton", 64, "nvfp4"), ("hopper", 192, "nvfp4")])
def test_fused_linear_matches_reference_apply_ragged_m(gemm, n, act):
  """The whole layer on the kernels: activation kernel, then the Triton GEMM or (forced,
  INT4 only: NVFP4 layers stay on Triton) the Mosaic GPU one, which takes the activation
  kernel's int8 codes layout."""
  m, k, r = 45, 192, 16
  x, smooth, down = _inputs(m, k, r, seed=3)
  layer = _layer(k, n, r, act=act, smooth=smooth, down=down)
  w4a4.set_gemm_kernel(gemm)
  try:
    assert w4a4.hopper_gemm(m, k, n, interpret=True, weight_format=layer.weight_format) == (
        gemm == "hopper" and act == "int4")
    with qlinear.backend("interpret"):
      y = jax.jit(qlinear.apply)(layer, x.reshape(5, 9, k).astype(jnp.float32))
      y16 = qlinear.apply(layer, x)  # bf16 in, bf16 out
  finally:
    w4a4.set_gemm_kernel("auto")
  ref = qlinear.reference_apply(layer, x.reshape(5, 9, k).astype(jnp.float32))
  assert y.shape == (5, 9, n) and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(ref).max()))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(ref).reshape(m, n),
                             rtol=1e-2, atol=1e-2 * float(jnp.abs(ref).max()))


def test_backend_switch_and_errors():
  layer = _layer(128, 64, 0)
  x = jnp.ones((4, 128), jnp.float32)
  with qlinear.backend("reference"):
    np.testing.assert_array_equal(np.asarray(qlinear.apply(layer, x)),
                                  np.asarray(qlinear.reference_apply(layer, x)))
  with pytest.raises(ValueError, match="unknown backend 'cuda'"):
    qlinear.set_backend("cuda")
  nv = formats.quantize_weight(jnp.ones((64, 128)), "nvfp4")
  mixed = QuantizedLinear(qweight=formats.pack(nv.q, "nvfp4"), wscale=nv.scale,
                          wcscale=nv.tensor_scale[:, 0], weight_format="nvfp4",
                          act_format="int4")
  with qlinear.backend("interpret"), pytest.raises(
      ValueError, match="no W4A4 kernel for weights 'nvfp4' with activations 'int4'"):
    qlinear.apply(mixed, x)
  qn, sn, _ = w4a4.quantize_act(x, None, None, act_format="nvfp4", interpret=True)
  with pytest.raises(ValueError, match="w_channel_scale .N. is required for nvfp4"):
    w4a4.w4a4_gemm(qn, sn, mixed.qweight, mixed.wscale, act_format="nvfp4", interpret=True)
  with pytest.raises(ValueError, match=r"nvfp4 scales must be \[M, 8\] and \[N, 8\]"):
    w4a4.w4a4_gemm(qn, sn[:, :4], mixed.qweight, mixed.wscale, act_format="nvfp4",
                   w_channel_scale=mixed.wcscale, interpret=True)
  with pytest.raises(ValueError, match=r"smooth must be \[K\] = \[128\]"):
    w4a4.quantize_act(x, jnp.ones(64), None, interpret=True)
  with pytest.raises(ValueError, match="K to be a multiple of 64, got K=96"):
    w4a4.quantize_act(jnp.ones((4, 96)), None, None, interpret=True)
  q, s, _ = w4a4.quantize_act(x, None, None, interpret=True)
  with pytest.raises(ValueError, match="N=64 is not a multiple of block_n=48"):
    w4a4.w4a4_gemm(q, s, layer.qweight, layer.wscale, block_n=48, interpret=True)
