"""Formats against independent float64 numpy references."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from svdq_jax import formats

E2M1 = np.array(formats.E2M1_MAGNITUDES)


def _x(shape, seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * scale
  x[..., :5] *= 40.0  # outliers inside some groups
  return x.astype(np.float32)


def _away_from_ties(v):
  """Mask of values whose fractional part is not within 1e-4 of a rounding tie."""
  return np.abs(np.abs(v - np.floor(v)) - 0.5) > 1e-4


@pytest.mark.parametrize("name,qmax", [("int4", 7.0), ("int8", 127.0)])
def test_signed_int_matches_float64_reference(name, qmax):
  fmt = formats.get_format(name)
  x = _x((6, 256))
  qt = formats.quantize(x, fmt)
  g = fmt.group_len(256)
  xg = x.astype(np.float64).reshape(6, -1, g)
  s = np.abs(xg).max(-1, keepdims=True) / qmax
  v = xg / s
  ref = np.clip(np.rint(v), fmt.qmin, fmt.qmax)
  q = np.asarray(qt.q).reshape(ref.shape)
  ok = _away_from_ties(v)
  np.testing.assert_array_equal(q[ok], ref[ok])
  assert np.abs(q - ref).max() <= 1
  np.testing.assert_allclose(np.asarray(qt.scale), s[..., 0], rtol=1e-6)
  deq = np.asarray(formats.dequantize(qt, fmt)).reshape(xg.shape)
  assert np.all(np.abs(deq - xg) <= s / 2 * (1 + 1e-5))
  assert q.min() >= fmt.qmin and q.max() <= fmt.qmax


def test_int4_weight_scales_are_rounded_before_quantizing():
  x = _x((8, 128), seed=1)
  qt = formats.quantize(x, "int4", scale_dtype=jnp.bfloat16)
  assert qt.scale.dtype == jnp.bfloat16
  s = np.asarray(qt.scale.astype(jnp.float32), np.float64)[..., None]
  v = x.astype(np.float64).reshape(8, 2, 64) / s
  ref = np.clip(np.rint(v), -8, 7)
  ok = _away_from_ties(v)
  np.testing.assert_array_equal(np.asarray(qt.q).reshape(ref.shape)[ok], ref[ok])


def test_uint4_nonnegative_and_negative_clipped():
  x = np.abs(_x((4, 128), seed=2))
  x[0, :3] = -1.0
  qt = formats.quantize(x, "uint4")
  xg = x.astype(np.float64).reshape(4, 2, 64)
  s = np.maximum(xg, 0).max(-1, keepdims=True) / 15
  v = xg / s
  ref = np.clip(np.rint(v), 0, 15)
  q = np.asarray(qt.q).reshape(ref.shape)
  ok = _away_from_ties(v)
  np.testing.assert_array_equal(q[ok], ref[ok])
  assert q.min() >= 0 and q.max() == 15
  assert (q[0, 0, :3] == 0).all()


def _nvfp4_reference(x, tensor_scale):
  """float64 NVFP4: e4m3 group scales (RNE via ml_dtypes), nearest E2M1, ties to even code."""
  xg = x.astype(np.float64).reshape(*x.shape[:-1], -1, 16)
  ts = np.asarray(tensor_scale, np.float64)[..., None]
  s = np.minimum(np.abs(xg).max(-1, keepdims=True) / 6 / ts, 448.0)
  s = s.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  v = xg / np.where(s == 0, 1, s * ts)
  mag = np.minimum(np.abs(v), 6.0)
  dist = np.abs(mag[..., None] - E2M1)
  best = dist.min(-1, keepdims=True)
  cand = np.isclose(dist, best, rtol=0, atol=1e-12)
  # ties: prefer the even code (E2M1 index); smallest even index among candidates
  idx = np.where(cand & (np.arange(8) % 2 == 0), np.arange(8), 99).min(-1)
  idx = np.where(cand.sum(-1) == 1, dist.argmin(-1), idx)
  units = (2 * E2M1[idx]) * np.sign(v)
  return units, s[..., 0], v


def test_nvfp4_matches_float64_reference_with_channel_scales():
  x = _x((5, 128), seed=3, scale=0.02)
  qt = formats.quantize_weight(x, "nvfp4")
  assert qt.scale.dtype == jnp.float8_e4m3fn and qt.tensor_scale.shape == (5, 1)
  ref_units, ref_s, v = _nvfp4_reference(x, np.asarray(qt.tensor_scale))
  np.testing.assert_array_equal(np.asarray(qt.scale.astype(jnp.float32)), ref_s)
  q = np.asarray(qt.q).reshape(ref_units.shape)
  # exclude values within 1e-5 of a midpoint between grid values (f32 vs f64 division)
  mids = (E2M1[1:] + E2M1[:-1]) / 2
  ok = np.abs(np.abs(v)[..., None] - mids).min(-1) > 1e-5
  np.testing.assert_array_equal(q[ok], ref_units[ok])
  assert set(np.unique(np.abs(q))) <= {0, 1, 2, 3, 4, 6, 8, 12}
  # the largest group of each row maps its absmax onto 6 * 448 * channel scale exactly
  deq = np.asarray(formats.dequantize(qt, "nvfp4"))
  np.testing.assert_allclose(np.abs(deq).max(-1), np.abs(x).max(-1), rtol=1e-6)


def test_nvfp4_round_half_to_even_code():
  # exact midpoints between E2M1 values; scale pinned to 1 by a 6 in each group
  mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0], np.float32)
  x = np.zeros((1, 16), np.float32)
  x[0, 0] = 6.0
  x[0, 1:1 + len(mids)] = mids
  q = np.asarray(formats.quantize(x, "nvfp4").q)[0, 1:1 + len(mids)] / 2
  np.testing.assert_array_equal(q, [0, 1, 1, 2, 2, 4, 4, 0, -2, -4])


@pytest.mark.parametrize("name", ["int4", "uint4", "nvfp4"])
def test_pack_unpack_every_code(name):
  fmt = formats.get_format(name)
  if name == "nvfp4":
    values = np.concatenate([2 * E2M1, -2 * E2M1[1:]]).astype(np.int8)
  else:
    values = np.arange(fmt.qmin, fmt.qmax + 1, dtype=np.int8)
  q = np.stack(np.meshgrid(values, values, indexing="ij"), -1).reshape(1, -1)
  q = np.concatenate([q, np.zeros((1, -q.shape[1] % 64), np.int8)], axis=1)
  packed = formats.pack(jnp.asarray(q), fmt)
  assert packed.dtype == jnp.uint8 and packed.shape == (1, q.shape[1] // 2)
  np.testing.assert_array_equal(np.asarray(formats.unpack(packed, fmt)), q)


def test_nibble_order_split_halves_of_each_64_block():
  q = np.zeros((1, 128), np.int8)
  q[0, 0], q[0, 32], q[0, 31], q[0, 63], q[0, 64], q[0, 96] = 1, -2, 7, -8, 3, 5
  packed = np.asarray(formats.pack(jnp.asarray(q), "int4"))
  assert packed.shape == (1, 64)
  assert packed[0, 0] == 0x01 | (0xE << 4)   # element 0 low, element 32 high
  assert packed[0, 31] == 0x07 | (0x8 << 4)  # element 31 low, element 63 high
  assert packed[0, 32] == 0x03 | (0x5 << 4)  # next block: elements 64 and 96
  assert not np.delete(packed[0], [0, 31, 32]).any()
  nv = np.zeros((1, 64), np.int8)
  nv[0, 0], nv[0, 32] = 1, -12  # 0.5 -> 0b0001, -6 -> 0b1111
  assert np.asarray(formats.pack(jnp.asarray(nv), "nvfp4"))[0, 0] == 0x01 | (0xF << 4)


def test_zero_groups_quantize_to_zero():
  x = np.zeros((2, 64), np.float32)
  for name in ("int4", "uint4", "nvfp4", "int8"):
    qt = formats.quantize(x, name)
    assert not np.asarray(qt.q).any()
    assert np.isfinite(np.asarray(formats.dequantize(qt, name))).all()


def test_bad_inputs():
  with pytest.raises(ValueError, match="not a multiple of the int4 group size 64"):
    formats.quantize(np.ones((2, 96), np.float32), "int4")
  with pytest.raises(ValueError, match="unknown format 'int3'"):
    formats.get_format("int3")
  with pytest.raises(ValueError, match="K=48 is not a multiple of the 4-bit packing block 64"):
    formats.check_groups(48, formats.NVFP4)
  with pytest.raises(ValueError, match="not packed"):
    formats.pack(jnp.zeros((1, 4), jnp.int8), "int8")


def test_quantize_is_jittable():
  x = _x((4, 128))
  f = jax.jit(lambda v: formats.fake_quantize(v, "int4"))
  np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(formats.fake_quantize(x, "int4")))


def test_reciprocal_is_the_correctly_rounded_f32_quotient():
  """formats.reciprocal (f64 quotient with a 1 + 2^-52 numerator, see its docstring) equals
  IEEE f32 division over every exponent, at powers of two and 0 (-> 1), eager and jitted."""
  rng = np.random.default_rng(0)
  s = (rng.uniform(1, 2, 200_000) * 2.0 ** rng.integers(-60, 60, 200_000)).astype(np.float32)
  s = np.concatenate([s, -s[:1000], 2.0 ** np.arange(-60, 61, dtype=np.float32),
                      np.nextafter(np.float32(1), np.float32(2)) * np.ones(1, np.float32),
                      np.zeros(1, np.float32)])
  want = np.float32(1) / np.where(s == 0, np.float32(1), s)
  for fn in (formats.reciprocal, jax.jit(formats.reciprocal)):
    got = np.asarray(fn(jnp.asarray(s)))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
