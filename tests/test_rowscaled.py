"""Hopper-native formats (int4_2l, per-token int8) and their kernels: the formats' exact
definition, the reference numerics, the activation kernel and weight expansion (bit-exact in
interpret mode), the int8 GEMM (GPU interpret mode; integer part exact) and the fused layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdq_jax import formats, qlinear
from svdq_jax.config import Rule, method_spec, preset
from svdq_jax.pallas_kernels import act_rowscaled, int8_hopper, w4a4, w4a8_hopper

from layer_helpers import quantize_one


def _x(m, k, seed=0):
  x = jax.random.normal(jax.random.key(seed), (m, k)) * jnp.linspace(0.05, 6.0, k)
  return x.at[:, 3].multiply(40.0)


def test_int4_2l_definition():
  """unit = rowmax * f32(1/112), m = clip(ceil(gmax * (1 / 7 unit)), 1, 16),
  q = round(x * (1 / unit m)), every reciprocal correctly rounded f32."""
  x = np.asarray(_x(6, 256), np.float32)
  qt = formats.quantize(x, "int4_2l")
  g = x.reshape(6, 4, 64)
  unit = np.abs(x).max(1) * np.float32(1 / 112)
  gmax = np.abs(g).max(2)
  one = np.float32(1)
  m = np.clip(np.ceil(gmax * (one / (np.float32(7) * unit[:, None]))), 1, 16).astype(np.float32)
  q = np.clip(np.round(g * (one / (unit[:, None, None] * m[..., None]))), -8, 7)
  np.testing.assert_array_equal(np.asarray(qt.tensor_scale[:, 0]), unit)
  np.testing.assert_array_equal(np.asarray(qt.scale), m)
  np.testing.assert_array_equal(np.asarray(qt.q), q.reshape(6, 256))
  a, s = formats.row_scaled(qt, "int4_2l")
  assert a.dtype == jnp.int8 and int(jnp.abs(a.astype(jnp.int32)).max()) <= 128
  np.testing.assert_allclose(np.asarray(a, np.float32) * np.asarray(s)[:, None],
                             np.asarray(formats.dequantize(qt, "int4_2l")), rtol=1e-6)


def test_int4_2l_zero_rows_groups_and_nan():
  x = _x(4, 192).at[1].set(0.0).at[2, 64:128].set(0.0).at[3, 5].set(jnp.nan)
  qt = formats.quantize(x, "int4_2l")
  assert float(qt.tensor_scale[1, 0]) == 1.0 and not qt.q[1].any()      # zero row: unit 1
  assert float(qt.scale[2, 1]) == 1.0 and not qt.q[2, 64:128].any()     # zero group: m 1
  assert np.isnan(float(qt.tensor_scale[3, 0])) and not qt.q[3].any()   # NaN row
  assert (np.asarray(qt.scale[3]) == 1).all()
  q8 = formats.quantize(x, "int8")
  assert np.isnan(float(q8.scale[3, 0])) and not q8.q[3].any()
  y = qlinear.row_scaled_matmul(*formats.row_scaled(q8, "int8"),
                                *formats.row_scaled(formats.quantize(_x(8, 192), "int4_2l"),
                                                    "int4_2l"))
  assert np.isnan(np.asarray(y[3])).all() and np.isfinite(np.asarray(y[:3])).all()


def test_multiplier_packing_roundtrip():
  m = jax.random.randint(jax.random.key(0), (5, 7), 1, 17)
  packed = formats.pack_multipliers(m)
  assert packed.shape == (5, 4) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(formats.unpack_multipliers(packed, 7)), np.asarray(m))


def test_method_spec_act_fmt():
  assert method_spec("svdquant", "int4_2l", False, "int8").act_format == "int8"
  assert method_spec("svdquant", "int4_2l", False).act_format == "int4_2l"
  assert method_spec("w4a16", "int4_2l", False, "int8").act_format is None
  assert preset("svdquant", "int4_2l", act_fmt="int8").rules[0].act_fmt == "int8"
  with pytest.raises(ValueError, match="activation format"):
    Rule(".*", "svdquant", "int4_2l", act_fmt="fp8")
  with pytest.raises(ValueError, match="act_unsigned"):
    Rule(".*", "svdquant", "int4_2l", act_unsigned=True)


@pytest.mark.parametrize("wfmt,afmt", [("int4_2l", "int8"), ("int4_2l", "int4_2l"),
                                       ("int4", "int8"), ("nvfp4", "int8")])
def test_svdquant_on_new_formats_beats_rtn(wfmt, afmt):
  """The recipe runs unchanged on the new formats and its search helps as it should."""
  x, w = _x(128, 256), jax.random.normal(jax.random.key(1), (256, 128))
  errs = {}
  for method in ("svdquant", "rtn"):
    layer = quantize_one(w, x, method, wfmt, afmt, rank=16, alpha_grid=5, lowrank_iters=3)
    assert (layer.weight_format, layer.act_format) == (wfmt, afmt)
    y = qlinear.reference_apply(layer, x)
    errs[method] = float(jnp.linalg.norm(y - x @ w) / jnp.linalg.norm(x @ w))
  # observed at this seed: 0.57-0.68 of RTN's error (int4_2l W4A8, 2L W4A4, INT4 and NVFP4
  # weights with int8 activations); 0.75 leaves room for other seeds
  assert errs["svdquant"] < 0.75 * errs["rtn"], errs


def test_reference_row_scaled_is_one_int32_dot():
  """W4A8: the reference equals (int32 a.w) * s_a * s_w on the stored integers."""
  x, w = _x(16, 256), jax.random.normal(jax.random.key(1), (256, 64))
  layer = quantize_one(w, x, "rtn")
  a, sa = formats.row_scaled(formats.quantize(x, "int8"), "int8")
  w8, sw = layer.row_scaled_weight()
  acc = np.asarray(a, np.int64) @ np.asarray(w8, np.int64).T
  want = (acc.astype(np.float32) * np.asarray(sa)[:, None]) * np.asarray(sw)[None, :]
  np.testing.assert_array_equal(np.asarray(qlinear.reference_apply(layer, x)), want)


@pytest.mark.parametrize("afmt", ["int8", "int4_2l"])
def test_activation_kernel_bit_exact(afmt):
  x = _x(40, 384).at[3].set(0.0).at[5, 7].set(jnp.nan).at[6, 64:128].set(0.0)
  x = x.astype(jnp.bfloat16)
  smooth = jax.random.uniform(jax.random.key(1), (384,), minval=0.5, maxval=2.0)
  down = jax.random.normal(jax.random.key(2), (384, 20)).astype(jnp.bfloat16)
  a, s, lr = act_rowscaled.quantize_rows(x, smooth, down, act_format=afmt, block_k=64, chunks=3,
                                         interpret=True)
  ra, rs, rlr = act_rowscaled.reference(x, smooth, down, afmt)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(ra))
  np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))   # NaN row included
  np.testing.assert_allclose(np.asarray(lr), np.asarray(rlr), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("afmt", ["int8", "int4_2l"])
@pytest.mark.parametrize("name", sorted(act_rowscaled.TILINGS))
def test_activation_kernel_library_tilings_bit_exact(name, afmt):
  """Each tiling ``act_rowscaled.tiling`` picks, over several column spans."""
  x = _x(24, 1024).at[2, 5].set(jnp.nan).astype(jnp.bfloat16)
  smooth = jax.random.uniform(jax.random.key(1), (1024,), minval=0.5, maxval=2.0)
  down = jax.random.normal(jax.random.key(2), (1024, 16)).astype(jnp.bfloat16)
  a, s, lr = act_rowscaled.quantize_rows(x, smooth, down, act_format=afmt, interpret=True,
                                         **act_rowscaled.TILINGS[name])
  ra, rs, rlr = act_rowscaled.reference(x, smooth, down, afmt)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(ra))
  np.testing.assert_array_equal(np.asarray(s), np.asarray(rs))
  np.testing.assert_allclose(np.asarray(lr), np.asarray(rlr), rtol=1e-4, atol=1e-3)


def test_gelu_tanh_is_jax_gelu_bit_for_bit():
  """qlinear.gelu_tanh, the GELU the activation kernel computes for a Gelu part, is
  jax.nn.gelu(approximate=True) for every bf16 value, jitted or not."""
  bits = jnp.arange(1 << 16, dtype=jnp.uint32).astype(jnp.uint16)
  x = jax.lax.bitcast_convert_type(bits, jnp.bfloat16)
  want = np.asarray(jax.nn.gelu(x, approximate=True))
  np.testing.assert_array_equal(np.asarray(jax.jit(qlinear.gelu_tanh)(x)), want)
  np.testing.assert_array_equal(np.asarray(qlinear.gelu_tanh(x)), want)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda v: qlinear.gelu_tanh(v, round_bits=True))(x)), want)
  with pytest.raises(ValueError, match="rounds to bf16"):
    qlinear.gelu_tanh(x.astype(jnp.float32), round_bits=True)


def test_round_bf16_bits_is_the_cast_pair():
  """round_bf16_bits, the epilogue GELU's rounding, equals f32 -> bf16 -> f32 on random f32
  values, every tie (low half 0x8000, even and odd kept bit), the neighbours of the ties,
  values that round up to the next binade or to infinity, infinities and zeros (NaN: any
  value; gelu_tanh's NaN inputs are in test_gelu_tanh_is_jax_gelu_bit_for_bit)."""
  rng = np.random.default_rng(0)
  hi = rng.integers(0, 1 << 16, 4096, dtype=np.uint32) << 16
  low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
  bits = np.concatenate([(hi[:, None] | low).ravel(),
                         rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32),
                         np.array([0x7F7FFFFF, 0x7F7F8000, 0x7F800000, 0xFF800000, 0x80000000],
                                  np.uint32)])
  v = jax.lax.bitcast_convert_type(jnp.asarray(bits), jnp.float32)
  got = np.asarray(jax.jit(qlinear.round_bf16_bits)(v))
  want = np.asarray(v.astype(jnp.bfloat16).astype(jnp.float32))
  keep = ~np.isnan(want)
  assert keep.sum() > 0.99 * keep.size
  np.testing.assert_array_equal(got.view(np.uint32)[keep], want.view(np.uint32)[keep])


def _parts(m=40):
  """A layer input as parts: an array [m, 192] and GELU of columns 128.. of [m, 448], with a
  NaN in a token of the first and an all-zero token in the second."""
  a = _x(m, 192).at[5, 7].set(jnp.nan).astype(jnp.bfloat16)
  h = _x(m, 448, seed=1).at[3].set(0.0).astype(jnp.bfloat16)
  return (a, qlinear.Gelu(h, start=128))


def test_join_is_the_concatenation():
  a, g = _parts()
  want = jnp.concatenate([a, jax.nn.gelu(g.x[:, 128:], approximate=True)], -1)
  np.testing.assert_array_equal(np.asarray(qlinear.join((a, g))), np.asarray(want))
  assert qlinear.input_width((a, g)) == 512 and qlinear.join(a) is a
  np.testing.assert_array_equal(np.asarray(qlinear.join(qlinear.Gelu(a))),
                                np.asarray(jax.nn.gelu(a, approximate=True)))
  with pytest.raises(ValueError, match="leading dimensions"):
    qlinear.input_parts((a, qlinear.Gelu(g.x[:8])))
  with pytest.raises(ValueError, match="must be an array"):
    qlinear.input_parts((a, "x"))
  with pytest.raises(ValueError, match="start must be a column"):
    qlinear.input_parts((a, qlinear.Gelu(g.x, start=448)))


def _check_kernel_on_parts(x, afmt):
  """``quantize_rows`` on a layer input given as parts vs the reference on ``join(x)``:
  codes and scales bit for bit (the one NaN token's scale included), the low-rank down
  projection up to f32 summation order."""
  k = qlinear.input_width(x)
  smooth = jax.random.uniform(jax.random.key(1), (k,), minval=0.5, maxval=2.0)
  down = jax.random.normal(jax.random.key(2), (k, 20)).astype(jnp.bfloat16)
  got = [np.asarray(v) for v in act_rowscaled.quantize_rows(
      x, smooth, down, act_format=afmt, block_k=64, interpret=True)]
  want = [np.asarray(v) for v in act_rowscaled.reference(qlinear.join(x), smooth, down, afmt)]
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  ok = ~np.isnan(want[1])
  np.testing.assert_allclose(got[2][ok], want[2][ok], rtol=1e-4, atol=1e-3)
  assert np.isnan(want[1]).sum() == 1


@pytest.mark.parametrize("afmt", ["int8", "int4_2l"])
@pytest.mark.parametrize("widths", [(192, 320), (96, 160)])
def test_activation_kernel_reads_input_parts_bit_exact(afmt, widths):
  """Parts read where they lie (the second from column 128 of its array, through the GELU),
  codes written into one [M, K] array: the kernel on the joined input, bit for bit. Parts off
  the 64-column grid (96 + 160) are joined first, same results."""
  a, g = _parts()
  x = (a[:, :widths[0]], qlinear.Gelu(g.x, start=448 - widths[1]))
  _check_kernel_on_parts(x, afmt)


def _scaled_parts(m=40):
  """(an E4M3 part with an f32 scale, NaN in token 5; a GELU part): linear2's input with
  FP8 attention's output left in E4M3 (``qlinear.Scaled``). The scale is not a power of two,
  so that the descaled values round to bf16."""
  a = jnp.clip(_x(m, 192) * 40, -448, 448).at[5, 7].set(jnp.nan).astype(jnp.float8_e4m3fn)
  h = _x(m, 448, seed=1).at[3].set(0.0).astype(jnp.bfloat16)
  return (qlinear.Scaled(a, jnp.float32(0.0371)), qlinear.Gelu(h, start=128))


def test_scaled_part_joins_descaled_to_bf16():
  s, g = _scaled_parts()
  want = (s.x.astype(jnp.float32) * s.scale).astype(jnp.bfloat16)
  joined = qlinear.join((s, g))
  assert joined.dtype == jnp.bfloat16 and qlinear.input_dtype((s, g)) == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(joined[:, :192], np.float32),
                                np.asarray(want, np.float32))
  assert qlinear.input_width((s, g)) == 512
  from svdq_jax.layers import dense
  w = jax.random.normal(jax.random.key(3), (512, 8), jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(dense((s, g), w), np.float32),
                                np.asarray(joined @ w, np.float32))
  with pytest.raises(ValueError, match="scale must be a scalar"):
    qlinear.input_parts((qlinear.Scaled(s.x, jnp.ones(2)), g))


@pytest.mark.parametrize("afmt", ["int8", "int4_2l"])
def test_activation_kernel_reads_a_scaled_part_bit_exact(afmt):
  """An E4M3 part descaled in the kernel as it is read: codes and scales bit for bit those
  of the joined bf16 input (the NaN token's included)."""
  x = _scaled_parts()
  _check_kernel_on_parts(x, afmt)


def _w4a8_layer(x, n):
  """A rank-8 SVDQuant W4A8 layer [K, n] (random weights) calibrated on x [M, K]."""
  return quantize_one(jax.random.normal(jax.random.key(1), (x.shape[-1], n)), x)


@pytest.mark.parametrize("read_parts", [True, False])
def test_layer_on_input_parts_is_the_layer_on_the_joined_input(read_parts):
  """qlinear.apply / layers.dense on parts: the kernels (reading the parts, or XLA joining
  them first: set_input_parts) and the reference give the results of the joined input, bit
  for bit; float kernels likewise; a width that does not add up to K is named."""
  from svdq_jax.layers import dense
  x = _parts(72)
  x = (jnp.nan_to_num(x[0]), x[1])
  joined = qlinear.join(x)
  layer = _w4a8_layer(joined, 128)
  w = jax.random.normal(jax.random.key(1), (512, 128))
  np.testing.assert_array_equal(np.asarray(qlinear.reference_apply(layer, x)),
                                np.asarray(qlinear.reference_apply(layer, joined)))
  np.testing.assert_array_equal(np.asarray(dense(x, w.astype(jnp.bfloat16))),
                                np.asarray(joined @ w.astype(jnp.bfloat16)))
  default_act = w4a4.act_kernel()
  w4a4.set_act_kernel("pallas")
  w4a4.set_input_parts(read_parts)
  try:
    with qlinear.backend("interpret"):  # one interpreted kernel in flight at a time
      want = np.asarray(qlinear.apply(layer, joined))
      got = np.asarray(dense(x, layer))
  finally:
    w4a4.set_act_kernel(default_act)
    w4a4.set_input_parts(True)
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match=r"inputs \[\.\.\., 512\]"):
    qlinear.apply(layer, (x[0][:, :128], x[1]))


def test_gelu_from_computes_the_gelu_in_the_gemm_epilogue():
  """qlinear.apply / layers.dense with gelu_from: a Gelu part of the output. On the kernels the
  int8 GEMM stores the columns from gelu_from through the GELU (applied), bit for bit
  jax.nn.gelu of the plain output, in two launches (``w4a4.set_split_gelu``: the columns
  before it in ``head``) or one; with set_epilogue_gelu(False), on the reference and on
  float kernels the GELU is left to the next layer (the same values once joined)."""
  from svdq_jax.layers import dense
  x = _x(72, 256).astype(jnp.bfloat16)
  layer = _w4a8_layer(x, 384)
  w = jax.random.normal(jax.random.key(1), (256, 384))
  start = 128
  with qlinear.backend("interpret"):  # one interpreted kernel in flight at a time
    plain = np.asarray(dense(x, layer))
    y = jax.block_until_ready(dense(x, layer, gelu_from=start))
    w4a4.set_split_gelu(False)
    w4a4.set_epilogue_gelu(False)
    try:
      lazy = jax.block_until_ready(dense(x, layer, gelu_from=start))
      w4a4.set_epilogue_gelu(True)
      one = jax.block_until_ready(dense(x, layer, gelu_from=start))
    finally:
      w4a4.set_epilogue_gelu(True)
      w4a4.set_split_gelu(True)
  assert isinstance(y, qlinear.Gelu) and y.applied and y.start == 0 and y.x.shape == (72, 256)
  assert one.applied and one.start == start and one.head is None
  want_gelu = np.asarray(jax.nn.gelu(jnp.asarray(plain[:, start:]), approximate=True))
  for g in (y, one):
    np.testing.assert_array_equal(np.asarray(g.before_gelu[:, :start]), plain[:, :start])
    np.testing.assert_array_equal(np.asarray(g.x[:, g.start:]), want_gelu)
  assert not lazy.applied
  np.testing.assert_array_equal(np.asarray(lazy.x), plain)
  np.testing.assert_array_equal(np.asarray(qlinear.join(lazy)), np.asarray(qlinear.join(y)))
  ref = dense(x, layer, gelu_from=start)   # the CPU's 'auto': the reference
  assert not ref.applied and ref.start == start
  fl = dense(x, w.astype(jnp.bfloat16), gelu_from=start)
  assert not fl.applied
  np.testing.assert_array_equal(np.asarray(fl.x), np.asarray(x @ w.astype(jnp.bfloat16)))
  with pytest.raises(ValueError, match="gelu_from=384"):
    dense(x, layer, gelu_from=384)
  a, sa = x.astype(jnp.int8), jnp.ones((72,))
  with pytest.raises(ValueError, match="gelu_from=100"):
    int8_hopper.int8_gemm(a, sa, w.T.astype(jnp.int8), jnp.ones((384,)), gelu_from=100,
                          tile_m=64, tile_n=128, interpret=True)
  with pytest.raises(ValueError, match="gelu_from=128"):
    int8_hopper.int8_gemm(a, sa, w.T.astype(jnp.int8), jnp.ones((384,)), gelu_from=128,
                          out_dtype=jnp.float32, tile_m=64, tile_n=128, interpret=True)


def test_wide_k_act_kernel_runs_pallas_only_at_wide_k(monkeypatch):
  """set_act_kernel('wide_k'): the Pallas kernel, in its wide tiling, for K >= WIDE_K only."""
  calls = []
  kernel = act_rowscaled.quantize_rows_folded
  monkeypatch.setattr(act_rowscaled, "quantize_rows_folded",
                      lambda x, *a, **kw: calls.append((x.shape[1], kw)) or kernel(x, *a, **kw))
  monkeypatch.setattr(act_rowscaled, "WIDE_K", 256)
  default_act = w4a4.act_kernel()
  w4a4.set_act_kernel("wide_k")
  try:
    for k in (128, 256):
      x, w = _x(16, k), jax.random.normal(jax.random.key(1), (k, 128))
      layer = quantize_one(w, x, alpha_grid=1)
      with qlinear.backend("interpret"):
        got = qlinear.apply(layer, x)
      np.testing.assert_allclose(np.asarray(got), np.asarray(qlinear.reference_apply(layer, x)),
                                 rtol=1e-5, atol=1e-5 * float(jnp.abs(got).max()))
  finally:
    w4a4.set_act_kernel(default_act)
  assert [k for k, _ in calls] == [256]
  assert {k: v for k, v in calls[0][1].items() if k in act_rowscaled.TILINGS["wide"]} == \
      act_rowscaled.TILINGS["wide"]


@pytest.mark.parametrize("tiles", [{}, dict(block_n=16, block_pairs=2)])
def test_weight_expansion_bit_exact(tiles):
  """Default tiles, and tiles that leave ragged blocks along both axes (40 rows, 5 pairs)."""
  w = _x(40, 640)
  qt = formats.quantize_weight(w, "int4_2l")
  qp, mp = formats.pack(qt.q, "int4_2l"), formats.pack_multipliers(qt.scale)
  want, _ = formats.row_scaled(qt, "int4_2l")
  got = act_rowscaled.expand_two_level(qp, mp, interpret=True, **tiles)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match="K % 128"):
    act_rowscaled.expand_two_level(qp[:, :96], mp[:, :2], interpret=True)


@pytest.mark.parametrize("tiles", [dict(tile_m=64, tile_n=64, wg_dim="m"),
                                   dict(tile_m=64, tile_n=64, wg_dim="n"),
                                   dict(tile_m=64, tile_n=128, tile_k=128, wg_dim="m"),
                                   dict(tile_m=128, tile_n=128, tile_k=128, steps=3,
                                        wg_dim="m", out_splits=2),
                                   # 2 x 4 output tiles on 3 programs, in bands of 3 (and
                                   # a ragged band) as the library tilings order them
                                   dict(tile_m=64, tile_n=64, wg_dim="m", grid_tile_width=3,
                                        num_sms=3),
                                   dict(tile_m=64, tile_n=64, wg_dim="m", grid_minor="m",
                                        grid_tile_width=3, num_sms=3)])
def test_int8_gemm_integer_part_exact(tiles):
  """Unit scales: the f32 output is the exact int32 sum (|acc| < 2**24); ragged M; every
  output tile once, whatever the programs' order over them."""
  m, k, n = 200, 384, 256
  ks = jax.random.split(jax.random.key(0), 2)
  a = jax.random.randint(ks[0], (m, k), -128, 128, jnp.int8)
  w = jax.random.randint(ks[1], (n, k), -128, 113, jnp.int8)
  y = int8_hopper.int8_gemm(a, jnp.ones((m,)), w, jnp.ones((n,)), out_dtype=jnp.float32,
                            interpret=True, **tiles)
  want = np.asarray(a, np.int64) @ np.asarray(w, np.int64).T
  np.testing.assert_array_equal(np.asarray(y, np.int64), want)


@pytest.mark.parametrize("tile_n,out_splits", [(64, 1), (128, 2)])
def test_int8_gemm_epilogue(tile_n, out_splits):
  """Scales, low-rank up projection and bias; the output stored whole or in two halves."""
  m, k, n, r = 72, 128, 256, 16
  ks = jax.random.split(jax.random.key(1), 7)
  a = jax.random.randint(ks[0], (m, k), -128, 128, jnp.int8)
  w = jax.random.randint(ks[1], (n, k), -128, 113, jnp.int8)
  sa, sw = jax.random.uniform(ks[2], (m,)), jax.random.uniform(ks[3], (n,))
  lr = jax.random.normal(ks[4], (m, r), jnp.bfloat16)
  up = jax.random.normal(ks[5], (n, r), jnp.bfloat16)
  b = jax.random.normal(ks[6], (n,))
  y = int8_hopper.int8_gemm(a, sa, w, sw, lr, up, b, out_dtype=jnp.float32, tile_m=64,
                            tile_n=tile_n, out_splits=out_splits, interpret=True)
  want = int8_hopper.reference(a, sa, w, sw, lr, up, b)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-6,
                             atol=1e-6 * float(jnp.abs(want).max()))
  with pytest.raises(ValueError, match="row scales"):
    int8_hopper.int8_gemm(a, sa[:5], w, sw, interpret=True)
  with pytest.raises(ValueError, match="int8 operands"):
    int8_hopper.int8_gemm(a.astype(jnp.int32), sa, w, sw, interpret=True)
  with pytest.raises(ValueError, match="out_splits"):
    int8_hopper.int8_gemm(a, sa, w, sw, tile_n=64, out_splits=2, interpret=True)


@pytest.mark.parametrize("afmt", ["int8", "int4_2l"])
def test_fused_layer_matches_reference(afmt):
  """The fused layer on the kernels (each activation path) against ``reference_apply``. The
  integer parts agree bit for bit (tests above); the low-rank branch's f32 down projection
  sums in another order in the Pallas activation kernel (per K tile) than in XLA's dot, and
  rounded to bf16 a value within that difference of a rounding tie lands one bf16 ulp apart
  (on an AMD EPYC CPU row 30: 31.687492 vs 31.6875 -> 31.625 vs 31.75), so the reference's
  branch is taken with the activation kernel's own down projection where it ran."""
  x, w = _x(72, 256), jax.random.normal(jax.random.key(1), (256, 128))
  layer = quantize_one(w, x, act_fmt=afmt)
  bias = jax.random.normal(jax.random.key(3), (128,))
  want = qlinear.reference_apply(layer, x, bias)
  lr = qlinear.lowrank_down(x, layer.lora_down, layer.smooth)
  inv, down = qlinear.folded_smoothing(layer.smooth, layer.lora_down)
  with qlinear.backend("interpret"):
    _, _, lr_kernel = act_rowscaled.quantize_rows_folded(
        x, inv, down, act_format=afmt, interpret=True, **act_rowscaled.tiling(256))
  branch = lambda v: qlinear.lowrank_up(v, layer.lora_up)
  default_act = w4a4.act_kernel()
  for act in w4a4.ACT_KERNELS:
    w4a4.set_act_kernel(act)
    try:
      with qlinear.backend("interpret"):
        got = qlinear.apply(layer, x, bias)
    finally:
      w4a4.set_act_kernel(default_act)
    ref = want - branch(lr) + branch(lr_kernel) if act == "pallas" else want   # K < WIDE_K
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(want).max()), err_msg=act)


@pytest.mark.parametrize("afmt", ["int8", "int4_2l"])
def test_prepared_layer_is_the_layer_bit_for_bit(afmt, monkeypatch):
  """qlinear.prepare: the weight-side operands (int8 weights, 1 / lambda, folded low-rank
  factors) computed once give the layer's own results on the kernels, and so do those of
  expand=False (packed weights, on the W4A8 register kernel); only row-scaled layers are
  prepared, and only when the kernels run them."""
  real = w4a8_hopper.w4a8_gemm_t
  x, w = _x(72, 256), jax.random.normal(jax.random.key(1), (256, 128))
  layer = quantize_one(w, x, act_fmt=afmt)
  layer = layer.replace(bias=jax.random.normal(jax.random.key(3), (128,)))
  w4a16 = quantize_one(w, x, "w4a16", act_fmt=None)
  tree = {"a": layer, "b": w4a16, "c": w}
  assert qlinear.prepare(tree) is tree                    # CPU, 'auto': the reference runs
  ref = np.asarray(qlinear.reference_apply(layer, x))
  # one interpreted kernel in flight at a time: conftest.py
  with qlinear.backend("interpret"):
    want = np.asarray(qlinear.apply(layer, x))
    np.testing.assert_allclose(want, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    prepared = jax.block_until_ready(qlinear.prepare(tree))
    p = prepared["a"]
    assert isinstance(p, qlinear.PreparedLinear) and p.w.dtype == jnp.int8
    assert prepared["b"] is w4a16 and prepared["c"] is w
    np.testing.assert_array_equal(np.asarray(qlinear.apply(p, x)), want)
    # weights left packed: bf16 inputs take the register kernel, f32 ones the int8 GEMM
    light = qlinear.prepare(tree, expand=False)["a"]
    assert light.w is None and light.mult_t.shape == (2, 128) and light.sw.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(qlinear.apply(light, x)), want)
    calls = []
    monkeypatch.setattr(w4a8_hopper, "w4a8_gemm_t", lambda *a, **k: calls.append(1) or
                        real(*a, **k))
    xb = x.astype(jnp.bfloat16)
    got = np.asarray(qlinear.apply(light, xb), np.float32)
    monkeypatch.setattr(w4a4, "_register_expansion", False)   # the expansion pass + int8 GEMM
    np.testing.assert_array_equal(got, np.asarray(qlinear.apply(layer, xb), np.float32))
    assert calls == [1]
  np.testing.assert_array_equal(np.asarray(qlinear.reference_apply(p, x)),
                                np.asarray(qlinear.reference_apply(layer, x)))
  with pytest.raises(ValueError, match="bias given twice"):
    qlinear.apply(p, x, layer.bias)


@pytest.mark.parametrize("split_store", [True, False])
def test_gemm_tiling_fits_shared_memory(monkeypatch, split_store):
  """smem_bytes is Mosaic's count (measured on the H200: 232592 bytes at rank 64 with 4 steps,
  144 of them barriers); wider low-rank branches trade the whole output store (with
  SPLIT_STORE, the default), then pipeline steps, then tile width."""
  monkeypatch.setattr(int8_hopper, "SPLIT_STORE", split_store)
  assert int8_hopper.smem_bytes(128, 128, 64, 4, "m", rank=64) + 144 == 232592
  assert int8_hopper.smem_bytes(128, 128, 64, 4, "m", rank=160) + 144 == 330896
  steps = {}   # (N, rank) -> (CTA rows, tile_n, tile_k, steps)
  for n in (3072, 12288):
    for rank in range(0, 272, 16):
      t = int8_hopper.tiling(n, jnp.bfloat16, rank)
      if t is not None:
        assert int8_hopper.smem_bytes(**t, rank=rank) <= int8_hopper.SMEM_BYTES
        steps[n, rank] = (2 * t["tile_m"], t["tile_n"], t["tile_k"], t["steps"])
  # N > 3072: the 256 x 128 CTA tile, K steps of 128 (3 deep) while they fit, then of 64
  if split_store:
    assert steps[12288, 32] == (256, 128, 128, 3)
    assert steps[12288, 64] == (256, 128, 64, 4) and steps[12288, 96] == (256, 128, 64, 3)
  else:
    assert steps[12288, 32] == (256, 128, 64, 4)
    assert steps[12288, 64] == (256, 128, 64, 3) and steps[12288, 96] == (256, 128, 64, 2)
  assert steps[12288, 0] == (256, 128, 128, 3) and steps[12288, 160] == (256, 64, 64, 3)
  # N <= 3072: the 128 x 128 CTA tile with K steps of 128, down to 3 steps, then the above
  assert steps[3072, 32] == steps[3072, 64] == (128, 128, 128, 4)
  assert steps[3072, 96] == (128, 128, 128, 4 if split_store else 3)
  assert steps[3072, 160] == (256, 64, 64, 3)
  assert (12288, 256) not in steps and (3072, 256) not in steps  # outside the kernel (below)


def _w4a8_with_branch(k, n, r, seed):
  """(x f32 [40, k], a W4A8 layer k -> n whose low-rank branch is random of rank r)."""
  ks = jax.random.split(jax.random.key(seed), 3)
  x, w = _x(40, k), jax.random.normal(ks[0], (k, n))
  layer = quantize_one(w, x, "rtn")
  return x, layer.replace(lora_down=jax.random.normal(ks[1], (k, r)) * 0.1,
                          lora_up=jax.random.normal(ks[2], (r, n)) * 0.1)


def test_split_store_keeps_the_pipeline_depth_of_a_rank_64_branch():
  """By default (SPLIT_STORE) the output staging halves before a pipeline step is given up:
  rank 64 (SVDQuant's 32 + a rank-32 LoRA) keeps 4 steps; the fused layer still equals its
  reference."""
  assert int8_hopper.smem_bytes(128, 128, 64, 4, "m", rank=64, out_splits=2) + 32768 \
      == int8_hopper.smem_bytes(128, 128, 64, 4, "m", rank=64)
  assert int8_hopper.SPLIT_STORE
  t = int8_hopper.tiling(12288, jnp.bfloat16, 64)
  assert (t["tile_n"], t["steps"], t["out_splits"]) == (128, 4, 2)
  assert int8_hopper.tiling(3072, jnp.bfloat16, 32)["out_splits"] == 1    # fits whole
  # in interpret mode at a small N, where the 128 x 128 CTA tile splits its store at rank 96
  k, n, r = 256, 256, 96
  x, layer = _w4a8_with_branch(k, n, r, seed=5)
  t = int8_hopper.tiling(n, jnp.bfloat16, r)
  assert (t["tile_k"], t["steps"], t["out_splits"]) == (128, 4, 2)
  xb = x.astype(jnp.bfloat16)   # bf16 in and out: the tiling above
  want = qlinear.reference_apply(layer, xb).astype(jnp.float32)
  with qlinear.backend("interpret"):
    got = qlinear.apply(layer, xb).astype(jnp.float32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-2,
                             atol=1e-2 * float(jnp.abs(want).max()))


def test_fused_layer_with_a_branch_wider_than_shared_memory():
  """Rank 256 (SVDQuant's + LoRAs') fits no tiling: the up projection runs in XLA on the
  kernel's f32 output, still equal to the reference."""
  k, n, r = 128, 128, 256
  x, layer = _w4a8_with_branch(k, n, r, seed=4)
  assert int8_hopper.tiling(n, jnp.bfloat16, r) is None
  want = qlinear.reference_apply(layer, x)
  with qlinear.backend("interpret"):
    got = qlinear.apply(layer, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(want).max()))
