"""The weight-only int4_2l GEMV (pallas_kernels.w4a16_gemv) in interpret mode against
``qlinear.weight_only_product``, and the layer dispatch that uses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdq_jax import formats, qlinear
from svdq_jax.pallas_kernels import w4a16_gemv
from svdq_jax.qlinear import QuantizedLinear, stored_weight

K, N = 256, 128


def _layer(seed=0, bias=True):
  """A W4A16 int4_2l layer with AWQ-style smoothing, a zero row and an outlier group."""
  ks = jax.random.split(jax.random.key(seed), 3)
  w = jax.random.normal(ks[0], (N, K)) * 0.02
  w = w.at[3].set(0.0).at[7, 64:128].multiply(30.0)
  return QuantizedLinear(
      **stored_weight(formats.quantize_weight(w, "int4_2l"), "int4_2l"),
      smooth=jax.random.uniform(ks[1], (K,), minval=0.5, maxval=2.0),
      bias=(jax.random.normal(ks[2], (N,)) * 0.1).astype(jnp.bfloat16) if bias else None,
      weight_format="int4_2l", act_format=None)


def _gemv(layer, x, **kw):
  return w4a16_gemv.gemv(x, layer.qweight, layer.wscale, layer.wcscale, interpret=True, **kw)


def _bf16_weight(layer):
  """f32 [N, K]: the weight values the reference multiplies by (dequantized, at bf16)."""
  w = formats.dequantize(layer.weight(), "int4_2l").astype(jnp.bfloat16)
  return np.asarray(w.astype(jnp.float32))


@pytest.mark.parametrize("mma", [False, True])
def test_weight_values_bit_exact(mma):
  """One-hot rows pick single weights: every product and sum is exact, so the kernel's
  dequantized weight must equal the reference's bit for bit (column 0, 1, 31, 32, ...: both
  nibbles of a byte, both multipliers of a byte)."""
  layer = _layer()
  cols = [0, 1, 31, 32, 63, 64, 100, 127, 128, 191, 200, 255] if mma else [37]
  x = jnp.zeros((len(cols), K), jnp.bfloat16).at[np.arange(len(cols)), cols].set(1.0)
  grouped = [] if mma else [dict(grouped=True), dict(grouped=True, block_n=32,
                                                        groups_per_step=2)]
  for kw in [dict(), dict(block_n=32, groups_per_step=2), dict(bit_unpack=False)] + grouped:
    y = np.asarray(_gemv(layer, x, mma=mma, **kw))
    np.testing.assert_array_equal(y, _bf16_weight(layer)[:, cols].T)


@pytest.mark.parametrize("m", [1, 3, 16, 28, 64, 100, 128])
def test_product_matches_reference(m):
  """M = 28: a 28-step loop's modulations computed before it (rows padded to 32, fewer
  groups a step); 64: one program's most rows; 100: two row blocks, the last one padded;
  128: the most rows a call takes."""
  layer = _layer()
  x = (jax.random.normal(jax.random.key(m), (m, K)) * 2.0).at[:, 5].multiply(40.0)
  x = x.astype(jnp.bfloat16)
  want = np.asarray(qlinear.weight_only_product(layer, x))
  if m == 1:   # the 4-D tiles' path: the same weights, its sums in another order
    got = np.asarray(_gemv(layer, x, grouped=True))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
  for kw in ([dict(), dict(mma=True)] if m == 1 else [dict()]):
    got = np.asarray(_gemv(layer, x, **kw))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    # the codes made f32 by conversions: the same weights, the same sums, bit for bit
    np.testing.assert_array_equal(np.asarray(_gemv(layer, x, bit_unpack=False, **kw)), got)


def test_bit_unpack_is_the_int4_values_of_every_byte():
  """``_signed_f32`` on all 256 bytes: each nibble's two's-complement int4 value, exactly
  ``w4a4._unpack``'s (low nibble = the first value of a byte, ``formats.pack``)."""
  from svdq_jax.pallas_kernels.w4a4 import _unpack
  b = jnp.arange(256, dtype=jnp.uint8).reshape(8, 32)
  for got, want in zip(w4a16_gemv._signed_f32(b), _unpack(b, signed=True)):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want, np.float32))
  lo, hi = (np.asarray(v) for v in w4a16_gemv._signed_f32(b))
  assert lo.min() == hi.min() == -8 and lo.max() == hi.max() == 7


def test_supports_follows_the_tiling_of_the_rows():
  """A program of 17-32 rows takes 64 output features (TILING_MMA), fewer rows 32: N = 96
  is taken at 2 and 16 rows and left to XLA at 28; one row on 4-D tiles takes 4
  (TILING_GROUPED), on the 2-D path 16."""
  assert [w4a16_gemv.supports("int4_2l", m, K, 96) for m in (1, 2, 16, 17, 28, 33)] == \
      [True, True, True, False, False, True]
  assert w4a16_gemv.supports("int4_2l", 1, K, 24)
  assert not w4a16_gemv.supports("int4_2l", 1, K, 22)
  for switch in (w4a16_gemv.set_grouped, w4a16_gemv.set_bit_unpack):   # the 2-D path's 16
    switch(False)
    try:
      assert not w4a16_gemv.supports("int4_2l", 1, K, 24)
    finally:
      switch(True)


def test_layer_dispatch_runs_the_kernel():
  """Under the 'interpret' backend a bf16 W4A16 int4_2l layer runs the kernel (smoothing,
  bias and rounding around it as the reference); f32 inputs and wide M do not."""
  layer = _layer()
  x = (jax.random.normal(jax.random.key(1), (2, 5, K)) * 2.0).astype(jnp.bfloat16)
  calls = []
  real = w4a16_gemv.layer_product

  def spy(*a, **kw):
    calls.append(a[1].shape)
    return real(*a, **kw)

  w4a16_gemv.layer_product = spy
  try:
    with qlinear.backend("interpret"):
      y = jax.block_until_ready(qlinear.apply(layer, x))
  finally:
    w4a16_gemv.layer_product = real
  assert calls == [(10, K)]
  ref = qlinear.reference_apply(layer, x)
  assert y.shape == ref.shape == (2, 5, N) and y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32),
                             rtol=2 ** -7, atol=1e-6)
  assert w4a16_gemv.supports_layer(layer, 10, jnp.bfloat16)
  assert not w4a16_gemv.supports_layer(layer, 10, jnp.float32)
  assert w4a16_gemv.supports_layer(layer, 128, jnp.bfloat16)
  assert not w4a16_gemv.supports_layer(layer, 129, jnp.bfloat16)
  settings = qlinear.trace_settings()
  w4a16_gemv.set_enabled(False)   # jitted loops retrace when it is switched
  try:
    assert not w4a16_gemv.supports_layer(layer, 10, jnp.bfloat16)
    assert qlinear.trace_settings() != settings
  finally:
    w4a16_gemv.set_enabled(True)
  # the codes' f32 by bit operations (the default), or by conversions: the same values
  unpacks, real_unpack = [], w4a16_gemv._signed_f32
  w4a16_gemv._signed_f32 = lambda b: unpacks.append(b.shape) or real_unpack(b)
  try:
    w4a16_gemv.set_bit_unpack(False)
    with qlinear.backend("interpret"):
      # a new function each time: jax.jit(qlinear.apply) would reuse its first trace
      y_converted = jax.block_until_ready(jax.jit(lambda l, x: qlinear.apply(l, x))(layer, x))
    assert qlinear.trace_settings() != settings and not unpacks
    w4a16_gemv.set_bit_unpack(True)
    assert qlinear.trace_settings() == settings
    w4a16_gemv.gemv.clear_cache()   # traced by the tests before, without the spy
    with qlinear.backend("interpret"):
      y_bits = jax.block_until_ready(jax.jit(lambda l, x: qlinear.apply(l, x))(layer, x))
    assert unpacks   # traced into the kernel
  finally:
    w4a16_gemv.set_bit_unpack(True)
    w4a16_gemv._signed_f32 = real_unpack
  for got in (y_converted, y_bits):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(y, np.float32))


def test_errors_name_the_problem():
  layer = _layer()
  with pytest.raises(ValueError, match="M <= 128"):
    _gemv(layer, jnp.zeros((129, K), jnp.bfloat16))
  with pytest.raises(ValueError, match="M <= 128"):   # no rows: an error, not a division by 0
    _gemv(layer, jnp.zeros((0, K), jnp.bfloat16), mma=True)
  with pytest.raises(ValueError, match="one row"):
    _gemv(layer, jnp.zeros((2, K), jnp.bfloat16), mma=False)
  with pytest.raises(ValueError, match="grouped path"):
    _gemv(layer, jnp.zeros((1, K), jnp.bfloat16), grouped=True, bit_unpack=False)
  with pytest.raises(ValueError, match="codes \\[N, K/2\\]"):
    w4a16_gemv.gemv(jnp.zeros((1, 2 * K), jnp.bfloat16), layer.qweight, layer.wscale,
                    layer.wcscale, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    _gemv(layer, jnp.zeros((1, K), jnp.bfloat16), groups_per_step=3)


def test_one_row_layers_run_on_4d_tiles():
  """A one-row W4A16 layer runs ``_grouped_kernel`` by default and the 2-D path with
  ``set_grouped(False)`` (a trace setting): both the reference's values within float
  agreement."""
  layer = _layer()
  x = (jax.random.normal(jax.random.key(2), (1, K)) * 2.0).astype(jnp.bfloat16)
  ref = np.asarray(qlinear.reference_apply(layer, x), np.float32)
  calls, real = [], w4a16_gemv._grouped
  w4a16_gemv._grouped = lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw)
  settings = qlinear.trace_settings()
  try:
    ys = []
    for grouped in (True, False):
      w4a16_gemv.set_grouped(grouped)
      assert (qlinear.trace_settings() == settings) == grouped
      with qlinear.backend("interpret"):
        ys.append(np.asarray(jax.jit(lambda l, x: qlinear.apply(l, x))(layer, x), np.float32))
      assert len(calls) == 1   # traced once, by the default
  finally:
    w4a16_gemv.set_grouped(True)
    w4a16_gemv._grouped = real
  assert calls == [(N, K // 2)]
  for y in ys:
    np.testing.assert_allclose(y, ref, rtol=2 ** -7, atol=1e-6)
