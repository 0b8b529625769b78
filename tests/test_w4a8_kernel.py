"""The W4A8 GEMM that expands int4_2l weights in registers (``pallas_kernels.w4a8_hopper``), in
GPU interpret mode: the same bf16 values as the expansion pass plus the int8 GEMM, bit for bit,
with scales, low-rank branch, bias and GELU; its errors; and the layer path that takes it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdq_jax import formats, qlinear
from svdq_jax.pallas_kernels import act_rowscaled, int8_hopper, w4a4, w4a8_hopper

from layer_helpers import quantize_one


def _operands(m=200, k=384, n=256, r=32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 7)
  a = jax.random.randint(ks[0], (m, k), -128, 128, jnp.int8)
  w = jax.random.normal(ks[1], (n, k)) * jnp.linspace(0.1, 3.0, k)   # uneven groups: m 1..16
  qt = formats.quantize_weight(w, "int4_2l")
  codes, mult = formats.pack(qt.q, "int4_2l"), formats.pack_multipliers(qt.scale)
  sa, sw = jax.random.uniform(ks[2], (m,)), qt.tensor_scale[:, 0]
  lr = jax.random.normal(ks[3], (m, r), jnp.bfloat16)
  up = jax.random.normal(ks[4], (n, r), jnp.bfloat16)
  bias = jax.random.normal(ks[5], (n,))
  return a, sa, codes, mult, sw, lr, up, bias


@pytest.mark.parametrize("tile_m,epilogue,gelu_from", [(64, False, None), (128, True, None),
                                                       (64, True, 128)])
def test_equals_expansion_and_int8_gemm(tile_m, epilogue, gelu_from):
  """Ragged M (200 rows over tiles of 64 / 128), K in 3 steps, 2 CTA tiles along N."""
  a, sa, codes, mult, sw, lr, up, bias = _operands()
  epi = (lr, up, bias) if epilogue else ()
  got = np.asarray(w4a8_hopper.w4a8_gemm_t(a, sa, codes, mult.T, sw, *epi, tile_m=tile_m,
                                           gelu_from=gelu_from, interpret=True))
  w8 = act_rowscaled.expand_two_level(codes, mult, interpret=True)
  want = np.asarray(int8_hopper.int8_gemm(a, sa, w8, sw, *epi, tile_m=64, tile_n=128,
                                          tile_k=128, gelu_from=gelu_from, interpret=True))
  assert got.dtype == want.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))
  if not epilogue:  # and the jnp definition, rounded once
    ref = int8_hopper.reference(a, sa, w8, sw).astype(jnp.bfloat16)
    np.testing.assert_array_equal(got.astype(np.float32), np.asarray(ref, np.float32))


@pytest.mark.parametrize("grid_minor,grid_tile_width,copies_at,compute_wgs,steps", [
    ("n", 1, None, 2, 3), ("n", 3, 0, 2, 1), ("n", 8, 7, 2, 3), ("m", 3, 1, 3, 1)])
def test_tile_orders_and_copies_over_a_smaller_grid(grid_minor, grid_tile_width, copies_at,
                                                    compute_wgs, steps):
  """Three programs walk the CTA tiles (ragged M = 200 over 64-token tiles, N = 512 or 768:
  4 x 4 tiles) in bands of 1, 3 (a ragged last band) or 8 (wider than the grid) CTA tiles
  along N, or of 3 along M; the epilogue operands copied before the K loop or at a K step of
  3 (copies_at; 7: clipped to the last), lr_smem reloaded per tile once every warpgroup's
  epilogue is done with it; pipelines 3 or 1 deep: every tile once, the same bf16 values as
  the expansion pass + int8 GEMM."""
  a, sa, codes, mult, sw, lr, up, bias = _operands(n=256 * compute_wgs)
  got = np.asarray(w4a8_hopper.w4a8_gemm_t(a, sa, codes, mult.T, sw, lr, up, bias, tile_m=64,
                                           num_sms=3, grid_minor=grid_minor,
                                           grid_tile_width=grid_tile_width, copies_at=copies_at,
                                           compute_wgs=compute_wgs, steps=steps,
                                           interpret=True))
  w8 = act_rowscaled.expand_two_level(codes, mult, interpret=True)
  want = np.asarray(int8_hopper.int8_gemm(a, sa, w8, sw, lr, up, bias, tile_m=64, tile_n=128,
                                          tile_k=128, interpret=True))
  np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))


def test_bf16_bias_read_as_given(monkeypatch):
  """A bf16 bias goes into both GEMM kernels as it is (``int8_hopper.bias_operand``; no
  convert before the call) and gives the values of the same bias widened to f32 first."""
  a, sa, codes, mult, sw, lr, up, bias = _operands(m=72)
  b16 = bias.astype(jnp.bfloat16)
  w8 = act_rowscaled.expand_two_level(codes, mult, interpret=True)
  def gemms(b):
    return [np.asarray(w4a8_hopper.w4a8_gemm_t(a, sa, codes, mult.T, sw, lr, up, b, tile_m=64,
                                               interpret=True).astype(jnp.float32)),
            np.asarray(int8_hopper.int8_gemm(a, sa, w8, sw, lr, up, b, tile_m=64, tile_n=128,
                                             tile_k=128, interpret=True).astype(jnp.float32))]
  seen = []
  real = int8_hopper.bias_operand
  monkeypatch.setattr(w4a8_hopper, "bias_operand", lambda b: seen.append(b.dtype) or real(b))
  for got, want in zip(gemms(b16), gemms(b16.astype(jnp.float32))):
    np.testing.assert_array_equal(got, want)
  assert seen == [jnp.bfloat16, jnp.float32]


def test_three_compute_warpgroups():
  """compute_wgs=3: CTA tiles of 192 weight rows (4 of them over N = 768), the GELU from a
  CTA tile's first column on; the same bf16 values as the expansion pass + int8 GEMM."""
  a, sa, codes, mult, sw, lr, up, bias = _operands(n=768)
  got = np.asarray(w4a8_hopper.w4a8_gemm_t(a, sa, codes, mult.T, sw, lr, up, bias, tile_m=64,
                                           gelu_from=384, compute_wgs=3, interpret=True))
  w8 = act_rowscaled.expand_two_level(codes, mult, interpret=True)
  want = np.asarray(int8_hopper.int8_gemm(a, sa, w8, sw, lr, up, bias, tile_m=64, tile_n=128,
                                          tile_k=128, gelu_from=384, interpret=True))
  np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))
  with pytest.raises(ValueError, match="N=256 is not a multiple of 192"):
    w4a8_hopper.w4a8_gemm_t(a, sa, codes[:256], mult.T[:, :256], sw[:256], compute_wgs=3,
                            interpret=True)


@pytest.mark.parametrize("tile_m,compute_wgs,n,gelu_from", [
    (64, 2, 384, 128), (128, 2, 256, 0), (64, 3, 768, 384), (192, 3, 768, 384)])
def test_row_maxima_of_the_gelu_columns(tile_m, compute_wgs, n, gelu_from):
  """row_max_inv: the GELU columns' per-token maxima of |y / lambda| for the layer they feed,
  per 64 columns, equal to ``act_rowscaled.row_max_partials`` of the output (a token whose
  scale is NaN: NaN), and the output as without them."""
  a, sa, codes, mult, sw, lr, up, bias = _operands(n=n)
  sa = sa.at[77].set(jnp.nan)
  inv = jax.random.uniform(jax.random.key(9), (n - gelu_from,), minval=0.1, maxval=4.0)
  kw = dict(tile_m=tile_m, gelu_from=gelu_from, compute_wgs=compute_wgs, interpret=True)
  y, row_max = w4a8_hopper.w4a8_gemm_t(a, sa, codes, mult.T, sw, lr, up, bias, inv, **kw)
  plain = w4a8_hopper.w4a8_gemm_t(a, sa, codes, mult.T, sw, lr, up, bias, **kw)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(plain, np.float32))
  want = act_rowscaled.row_max_partials(y[:, gelu_from:], inv)
  assert row_max.shape == want.shape == ((n - gelu_from) // 64, 200)
  np.testing.assert_array_equal(np.asarray(row_max), np.asarray(want))
  assert np.isnan(np.asarray(row_max)[:, 77]).all() and np.isfinite(np.asarray(row_max)).sum()
  with pytest.raises(ValueError, match=r"row_max_inv must come with gelu_from and be \[N - "):
    w4a8_hopper.w4a8_gemm_t(a, sa, codes, mult.T, sw, lr, up, bias, inv[1:], **kw)


@pytest.mark.parametrize("compute_wgs,n,cols,gelu_from", [
    (2, 384, (128, 384), 0), (2, 512, (0, 256), None), (3, 768, (384, 768), 0),
    (3, 768, (192, 576), 192)])
def test_column_range(compute_wgs, n, cols, gelu_from):
  """cols=(start, stop): the output's columns start:stop alone, the same bits as those of the
  whole launch (codes, multipliers, scales, up projection and bias read at those columns; the
  GELU and the next layer's maxima counted from start), as ``w4a4.set_split_gelu`` runs
  linear1."""
  a, sa, codes, mult, sw, lr, up, bias = _operands(n=n)
  start, stop = cols
  inv = jax.random.uniform(jax.random.key(9), (n,), minval=0.1, maxval=4.0)
  gemm = lambda gelu_from, inv, cols=None: w4a8_hopper.w4a8_gemm_t(
      a, sa, codes, mult.T, sw, lr, up, bias, inv, tile_m=64, gelu_from=gelu_from,
      compute_wgs=compute_wgs, cols=cols, interpret=True)
  full_gelu = None if gelu_from is None else start + gelu_from
  has_max = gelu_from is not None
  whole = gemm(full_gelu, inv[full_gelu:] if has_max else None)
  part = gemm(gelu_from, inv[full_gelu:stop] if has_max else None, cols)
  if has_max:
    (whole, whole_max), (part, part_max) = whole, part
    groups = (stop - full_gelu) // 64
    np.testing.assert_array_equal(np.asarray(part_max), np.asarray(whole_max[:groups]))
  assert part.shape == (200, stop - start)
  np.testing.assert_array_equal(np.asarray(part, np.float32),
                                np.asarray(whole[:, start:stop], np.float32))
  with pytest.raises(ValueError, match=r"cols=\(64, 384\) must be multiples"):
    gemm(None, None, (64, 384))
  with pytest.raises(ValueError, match="must be multiples"):
    gemm(None, None, (start, n + 2 * compute_wgs * 64))


@pytest.mark.parametrize("compute_wgs,n,m,cols", [(2, 256, 200, None), (3, 384, 200, None),
                                                   (2, 384, 130, (128, 384))])
def test_residual_in_the_epilogue(compute_wgs, n, m, cols):
  """residual=(r, gate): ``w4a8_hopper.residual_rounded(r, gate, y)`` of the plain output, bit
  for bit
  (r's tile staged where the output goes; a ragged last tile; a column range), with NaN and
  infinities in r and the gate kept where the definition keeps them."""
  a, sa, codes, mult, sw, lr, up, bias = _operands(m=m, n=n)
  start, stop = cols or (0, n)
  kr, kg = jax.random.split(jax.random.key(11))
  r = (jax.random.normal(kr, (m, stop - start)) * 4.0).astype(jnp.bfloat16)
  r = r.at[3, 5].set(jnp.nan).at[7, 9].set(jnp.inf)
  gate = jax.random.normal(kg, (stop - start,)).astype(jnp.bfloat16).at[2].set(jnp.nan)
  gemm = lambda residual: w4a8_hopper.w4a8_gemm_t(
      a, sa, codes, mult.T, sw, lr, up, bias, residual=residual, tile_m=64,
      compute_wgs=compute_wgs, cols=cols, interpret=True)
  y = gemm(None)
  want = np.asarray(w4a8_hopper.residual_rounded(r, gate[None], y), np.float32)
  got = np.asarray(gemm((r, gate)), np.float32)
  np.testing.assert_array_equal(got, want)
  # on the CPU, jnp's expression (qlinear.residual_sum) gives the same bits
  np.testing.assert_array_equal(np.asarray(qlinear.residual_sum(r, gate[None], y), np.float32),
                                want)
  assert np.isnan(got[:, 2]).all() and np.isnan(got[3, 5])
  # the product's rounding is part of the definition: without it, values differ
  loose = (r.astype(jnp.float32) + gate.astype(jnp.float32) * y.astype(jnp.float32))
  assert (np.asarray(loose.astype(jnp.bfloat16), np.float32) != want)[~np.isnan(want)].any()


def test_errors():
  a, sa, codes, mult, sw, lr, up, bias = _operands(m=16, k=256, n=128)
  gemm = lambda *args, **kw: w4a8_hopper.w4a8_gemm_t(*args, interpret=True, **kw)
  with pytest.raises(ValueError, match="packed int4_2l weights"):
    gemm(a, sa, codes.astype(jnp.int8), mult.T, sw)
  with pytest.raises(ValueError, match="packed multipliers"):
    gemm(a, sa, codes, mult, sw)
  with pytest.raises(ValueError, match="K % 128 == 0"):
    gemm(a[:, :192], sa, codes[:, :96], mult.T[:1], sw)
  with pytest.raises(ValueError, match="not a multiple of 128"):
    gemm(a, sa, codes[:64], mult.T[:, :64], sw[:64])
  with pytest.raises(ValueError, match="gelu_from"):
    gemm(a, sa, codes, mult.T, sw, gelu_from=64)
  r = jnp.zeros((16, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"residual must be \(r bf16 \[M, N\]"):
    gemm(a, sa, codes, mult.T, sw, residual=(r[:, :64], jnp.zeros(128)))
  with pytest.raises(ValueError, match="residual must be"):
    gemm(a, sa, codes, mult.T, sw, residual=(r.astype(jnp.float32), jnp.zeros(128)))
  with pytest.raises(ValueError, match="without gelu_from"):
    gemm(a, sa, codes, mult.T, sw, residual=(r, jnp.zeros(128)), gelu_from=0)
  with pytest.raises(ValueError, match="tile_m"):
    gemm(a, sa, codes, mult.T, sw, tile_m=512)
  with pytest.raises(ValueError, match="grid_tile_width=0 must be a positive int"):
    gemm(a, sa, codes, mult.T, sw, grid_tile_width=0)
  with pytest.raises(ValueError, match="grid_minor='k' 'm' or 'n'"):
    gemm(a, sa, codes, mult.T, sw, grid_minor="k")
  with pytest.raises(ValueError, match="profile_dir needs the GPU"):
    gemm(a, sa, codes, mult.T, sw, profile_dir="/tmp")
  for bad in (-1, "late"):
    with pytest.raises(ValueError, match=f"copies_at={bad!r} must be None, 'auto'"):
      gemm(a, sa, codes, mult.T, sw, copies_at=bad)
  with pytest.raises(ValueError, match="low-rank"):
    gemm(a, sa, codes, mult.T, sw, lr[:, :24], up[:, :24])


def test_interpreted_kernels_return_when_done(monkeypatch):
  """Called eagerly in interpret mode the Hopper kernels wait for their outputs before they
  return (``w4a4_hopper.settles_when_interpreted``; some calls come back unfinished, and jax
  work dispatched while the interpreter's warpgroup threads run can deadlock them); under jit
  they are traced as before, same values."""
  waited = []
  monkeypatch.setattr(jax, "block_until_ready", lambda out: waited.append(out) or out)
  a, sa, codes, mult, sw, lr, up, bias = _operands(m=16, k=256, n=128)
  gemm = lambda *args: w4a8_hopper.w4a8_gemm_t(*args, tile_m=64, interpret=True)
  out = gemm(a, sa, codes, mult.T, sw, lr, up, bias)
  w8 = act_rowscaled.expand_two_level(codes, mult, interpret=True)
  out8 = int8_hopper.int8_gemm(a, sa, w8, sw, tile_m=64, tile_n=128, tile_k=128, interpret=True)
  assert [id(v) for v in waited] == [id(out), id(out8)]
  traced = jax.jit(gemm)(a, sa, codes, mult.T, sw, lr, up, bias)
  assert len(waited) == 2
  np.testing.assert_array_equal(np.asarray(traced, np.float32), np.asarray(out, np.float32))


@pytest.mark.parametrize("compute_wgs", [2, 3])
def test_pipeline_stages_keep_tma_alignment(compute_wgs):
  """The multiplier stages a TMA copy writes stay 128-byte aligned in shared memory (interpret
  mode cannot see it; on the H200 192-byte stages failed with CUDA_ERROR_MISALIGNED_ADDRESS):
  the box covers the CTA's rows in whole 128s. (The activation and code stages, tile_m x 128
  and rows x 64 bytes, always are.)"""
  box, rows = w4a8_hopper.mult_box(compute_wgs), w4a8_hopper.cta_rows(
      dict(compute_wgs=compute_wgs))
  assert box % 128 == 0 and rows <= box < rows + 128


def test_tiling():
  """256-token tiles where they make two waves of the SMs, 128-token tiles under that, three
  warpgroups on 192-token tiles where N allows; a LoRA-wide branch: a shallower pipeline;
  shapes the kernel does not take: None."""
  tiling = w4a8_hopper.tiling
  assert tiling(4608, 3072, 3200, 32, num_sms=132) == dict(tile_m=256, steps=3)  # 3.4 waves
  assert tiling(512, 3072, 12288, 32, num_sms=132) == dict(tile_m=128, steps=4)  # 1.5 waves
  assert tiling(512, 3072, 21504, 32, num_sms=132) == dict(tile_m=256, steps=3)  # 2.5 waves
  assert tiling(512, 3072, 12288, 32, num_sms=96) == w4a8_hopper.THREE_WGS  # fewer SMs
  assert tiling(4608, 256, 128, 96, num_sms=1)["steps"] == 2
  w4a8_hopper.set_narrow_tiles(False)
  try:
    assert tiling(512, 3072, 12288, 32, num_sms=132) == w4a8_hopper.THREE_WGS
  finally:
    w4a8_hopper.set_narrow_tiles(True)
  assert tiling(256, 192, 128) is None and tiling(256, 256, 192) is None
  # three warpgroups where N divides by 192 up to THREE_WGS_MAX_N and 256-token tiles would
  # run (a wider branch: shallower); off: two
  assert tiling(4608, 3072, 3072, 32, num_sms=132) == dict(tile_m=192, steps=3, compute_wgs=3)
  assert tiling(4608, 3072, 12288, 64, num_sms=132) == dict(tile_m=192, steps=2,
                                                             compute_wgs=3)
  assert tiling(4608, 3072, 21504, 32, num_sms=132) == dict(tile_m=256, steps=3)  # too wide
  assert tiling(4608, 3072, 256, 32, num_sms=1) == dict(tile_m=256, steps=3)   # not / 192
  # the GELU layers too by default, N = 21504 included, where 192 divides gelu_from
  assert tiling(4608, 3072, 21504, 32, num_sms=132, gelu_from=9216) == w4a8_hopper.THREE_WGS
  assert tiling(4608, 3072, 12288, 32, num_sms=132, gelu_from=0) == w4a8_hopper.THREE_WGS
  assert tiling(4608, 3072, 21504, 32, num_sms=132) == dict(tile_m=256, steps=3)
  assert tiling(4608, 3072, 3072, 32, num_sms=132, gelu_from=128) == dict(tile_m=256, steps=3)
  w4a8_hopper.set_three_warpgroups_gelu(False)
  try:
    assert tiling(4608, 3072, 3072, 32, num_sms=132, gelu_from=0) == dict(tile_m=256, steps=3)
  finally:
    w4a8_hopper.set_three_warpgroups_gelu(True)
  w4a8_hopper.set_three_warpgroups(False)
  try:
    assert tiling(4608, 3072, 3072, 32, num_sms=132) == dict(tile_m=256, steps=3)
  finally:
    w4a8_hopper.set_three_warpgroups(True)


def test_layer_on_three_warpgroups(monkeypatch):
  """Where the tiling takes three warpgroups (the default), a layer with N = 384 runs them,
  with the same values as two; a layer asking for the GELU epilogue too (by default), or on
  two with ``set_three_warpgroups_gelu(False)``, the same values either way."""
  x = (jax.random.normal(jax.random.key(0), (72, 256)) * jnp.linspace(0.05, 6.0, 256))
  w = jax.random.normal(jax.random.key(1), (256, 384))
  layer = quantize_one(w, x)
  calls = []
  real = w4a8_hopper.w4a8_gemm_t
  monkeypatch.setattr(w4a8_hopper, "w4a8_gemm_t", lambda *a, **k: calls.append(
      k.get("compute_wgs", 2)) or real(*a, **k))
  run = lambda **k: qlinear.apply(layer, x.astype(jnp.bfloat16), **k)
  monkeypatch.setattr(w4a8_hopper, "_narrow_tiles", False)   # 72 tokens: narrow otherwise
  monkeypatch.setattr(w4a4, "_split_gelu", False)   # one launch a layer (its tiling's choice)
  with qlinear.backend("interpret"):
    monkeypatch.setattr(w4a8_hopper, "_three_wgs", False)
    want = run()
    monkeypatch.setattr(w4a8_hopper, "_three_wgs", True)
    got = run()
    gelu = run(gelu_from=192)
    gelu_128 = run(gelu_from=128)   # not a multiple of 192: two warpgroups keep the epilogue
    monkeypatch.setattr(w4a8_hopper, "_three_wgs_gelu", False)
    gelu_two = run(gelu_from=0)
  assert calls == [2, 3, 3, 2, 2] and gelu.applied and gelu_128.applied and gelu_two.applied
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  f32 = lambda v: np.asarray(v, np.float32)
  for g in (gelu, gelu_128, gelu_two):
    np.testing.assert_array_equal(f32(g.x[:, :g.start]), f32(want[:, :g.start]))
    np.testing.assert_array_equal(f32(g.x[:, g.start:]),
                                  f32(qlinear.join(qlinear.Gelu(want, g.start))))


@pytest.mark.parametrize("afmt,lora_rank,tiles", [("int8", 0, (128, 4)), ("int4_2l", 0, (128, 4)),
                                                   ("int8", 56, (256, 2))])
def test_layer_takes_it_for_bf16_inputs(monkeypatch, afmt, lora_rank, tiles):
  """A W4A8 / two-level W4A4 layer with bf16 inputs runs the register kernel, the GELU of
  ``gelu_from`` in its epilogue, with the same values as the expansion pass + int8 GEMM: at
  the small-M tiling, and (``set_narrow_tiles(False)``) a LoRA-wide branch (8 + 56 ranks) on
  the 256-token tiling's shallower pipeline. f32 inputs (f32 outputs) and
  ``set_register_expansion(False)`` take the int8 GEMM."""
  x = (jax.random.normal(jax.random.key(0), (72, 256)) * jnp.linspace(0.05, 6.0, 256))
  w = jax.random.normal(jax.random.key(1), (256, 256))
  layer = quantize_one(w, x, act_fmt=afmt)
  layer = layer.replace(bias=jax.random.normal(jax.random.key(3), (256,)))
  if lora_rank:  # a LoRA joined to the low-rank branch widens it
    ks = jax.random.split(jax.random.key(4), 2)
    layer = layer.replace(
        lora_down=jnp.concatenate([layer.lora_down, 0.1 * jax.random.normal(
            ks[0], (256, lora_rank), layer.lora_down.dtype)], axis=1),
        lora_up=jnp.concatenate([layer.lora_up, 0.1 * jax.random.normal(
            ks[1], (lora_rank, 256), layer.lora_up.dtype)], axis=0))
    monkeypatch.setattr(w4a8_hopper, "_narrow_tiles", False)
  calls = []
  real = w4a8_hopper.w4a8_gemm_t
  monkeypatch.setattr(w4a8_hopper, "w4a8_gemm_t",
                      lambda *a, **k: calls.append((k["tile_m"], k["steps"])) or real(*a, **k))
  monkeypatch.setattr(w4a4, "_split_gelu", False)   # one launch (two: test_rowscaled.py)
  xb = x.astype(jnp.bfloat16)
  def run(**kw):  # with gelu_from: the whole output, its columns from there GELU'd
    y = qlinear.apply(layer, xb, **kw)
    if kw:
      assert isinstance(y, qlinear.Gelu) and y.applied and y.start == 128
      y = y.x
    return np.asarray(y).astype(np.float32)

  with qlinear.backend("interpret"):   # one interpreted kernel in flight at a time
    got, got_gelu = run(), run(gelu_from=128)
    assert calls == [tiles, tiles]
    w4a4.set_register_expansion(False)
    try:
      want, want_gelu = run(), run(gelu_from=128)
    finally:
      w4a4.set_register_expansion(True)
    assert len(calls) == 2
    np.asarray(qlinear.apply(layer, x))
    assert len(calls) == 2
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_gelu, want_gelu)
  np.testing.assert_array_equal(got_gelu[:, :128], got[:, :128])
  assert (got_gelu[:, 128:] != got[:, 128:]).any()
  ref = np.asarray(qlinear.reference_apply(layer, xb)).astype(np.float32)
  np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2 * float(np.abs(ref).max()))


@pytest.mark.parametrize("batch,tokens,gate_kind,fused", [
    (1, 40, "one", True), (2, 128, "sample", False), (1, 40, "token", False),
    (1, 40, "f32", False)])
def test_layer_residual(monkeypatch, batch, tokens, gate_kind, fused):
  """``qlinear.apply(..., residual=(r, gate))``: ``residual_sum(r, gate, y)`` of the plain
  output, the same bits whether the W4A8 GEMM's epilogue computes it
  (``set_epilogue_residual``: one bf16 gate row for all tokens) or XLA after it (switch off,
  a gate per sample or per token, an f32 gate: an f32 result), and on the reference backend;
  with ``gelu_from`` an error."""
  x = (jax.random.normal(jax.random.key(0), (batch, tokens, 256))
       * jnp.linspace(0.05, 6.0, 256))
  w = jax.random.normal(jax.random.key(1), (256, 256))
  layer = quantize_one(w, x)
  layer = layer.replace(bias=jax.random.normal(jax.random.key(3), (256,)))
  xb = x.astype(jnp.bfloat16)
  r = (jax.random.normal(jax.random.key(5), (batch, tokens, 256)) * 3).astype(jnp.bfloat16)
  gate_shape = {"one": (1, 1, 256), "sample": (batch, 1, 256), "token": (1, tokens, 256),
                "f32": (1, 1, 256)}
  gate = jax.random.normal(jax.random.key(6), gate_shape[gate_kind]).astype(
      jnp.float32 if gate_kind == "f32" else jnp.bfloat16)
  residuals = []
  real = w4a8_hopper.w4a8_gemm_t
  monkeypatch.setattr(w4a8_hopper, "w4a8_gemm_t", lambda *a, **k: residuals.append(
      k["residual"] is not None) or real(*a, **k))
  f32 = lambda v: np.asarray(v, np.float32)
  with qlinear.backend("interpret"):
    y = qlinear.apply(layer, xb)
    want = qlinear.residual_sum(r, gate, y)
    monkeypatch.setattr(w4a4, "_epilogue_residual", True)
    got = qlinear.apply(layer, xb, residual=(r, gate))
    assert got.dtype == want.dtype == (jnp.float32 if gate_kind == "f32" else jnp.bfloat16)
    got, want = f32(got), f32(want)
    monkeypatch.setattr(w4a4, "_epilogue_residual", False)
    after = f32(qlinear.apply(layer, xb, residual=(r, gate)))
    with pytest.raises(ValueError, match="exclude each other"):
      qlinear.apply(layer, xb, residual=(r, gate), gelu_from=0)
    with pytest.raises(ValueError, match="output's shape"):
      qlinear.apply(layer, xb, residual=(r[..., :128], gate))
    with pytest.raises(ValueError, match="does not broadcast"):
      qlinear.apply(layer, xb, residual=(r, gate[..., :128]))
  assert residuals == [False, fused, False]
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(after, want)
  ref = qlinear.reference_apply(layer, xb)
  np.testing.assert_array_equal(f32(qlinear.apply(layer, xb, residual=(r, gate))),
                                f32(qlinear.residual_sum(r, gate, ref)))   # reference backend


def test_epilogue_row_maxima_feed_the_next_layer(monkeypatch):
  """``set_epilogue_row_max``: a layer given ``gelu_from`` and ``feeds`` (FLUX's linear1 ->
  linear2: the GELU columns are the tail of the next layer's input) returns the GELU part
  with the next layer's token maxima (``act_rowscaled.row_max_partials`` against that
  layer's 1 / lambda); the next layer's activation kernel then runs its maxima pass over
  the other part only, and its output is the one without them, bit for bit. Off, or for a
  next layer whose activations XLA quantizes: no maxima."""
  x = (jax.random.normal(jax.random.key(0), (72, 256)) * jnp.linspace(0.05, 6.0, 256))
  xb = x.astype(jnp.bfloat16)
  lin1 = quantize_one(jax.random.normal(jax.random.key(1), (256, 384)), x)
  attn = jax.random.normal(jax.random.key(2), (72, 128), jnp.bfloat16)
  with qlinear.backend("interpret"):
    h = qlinear.apply(lin1, xb, gelu_from=128)
  lin2 = quantize_one(jax.random.normal(jax.random.key(3), (384, 256)),
                      qlinear.join((attn, h)).astype(jnp.float32))
  passes = []
  real = act_rowscaled._absmax_kernel
  monkeypatch.setattr(act_rowscaled, "_absmax_kernel",
                      lambda x_ref, *a, **k: passes.append(x_ref.shape) or real(x_ref, *a, **k))
  monkeypatch.setattr(w4a4, "_act_choice", "pallas")
  with qlinear.backend("interpret"):
    # (each result waited for: an interpreted kernel left running when the test run ends
    # fails in jax's exit hook)
    run = lambda: jax.block_until_ready(qlinear.apply(lin1, xb, gelu_from=128, feeds=lin2))
    monkeypatch.setattr(w4a4, "_epilogue_row_max", False)
    assert run().row_max is None   # off
    monkeypatch.setattr(w4a4, "_epilogue_row_max", True)
    monkeypatch.setattr(w4a4, "_split_gelu", False)   # one launch
    h = qlinear.apply(lin1, xb, gelu_from=128, feeds=lin2)
    inv2 = qlinear.folded_smoothing(lin2.smooth, None)[0]
    assert h.applied and h.row_max.shape == (4, 72)
    np.testing.assert_array_equal(np.asarray(h.row_max), np.asarray(
        act_rowscaled.row_max_partials(h.x[:, 128:], inv2[128:])))
    prepared = w4a4.prepare_row_scaled(lin2, interpret=True, expand=False)  # as a loop's
    np.testing.assert_array_equal(np.asarray(qlinear.apply(
        lin1, xb, gelu_from=128, feeds=prepared).row_max), np.asarray(h.row_max))
    monkeypatch.setattr(w4a4, "_split_gelu", True)   # two launches (the default): the same
    hs = jax.block_until_ready(qlinear.apply(lin1, xb, gelu_from=128, feeds=lin2))
    assert hs.start == 0 and hs.head.shape == (72, 128) and hs.x.shape == (72, 256)
    assert hs.before_gelu is hs.head and h.before_gelu is h.x
    np.testing.assert_array_equal(np.asarray(hs.row_max), np.asarray(h.row_max))
    np.testing.assert_array_equal(np.asarray(hs.head, np.float32),
                                  np.asarray(h.x[:, :128], np.float32))
    np.testing.assert_array_equal(np.asarray(hs.x, np.float32),
                                  np.asarray(h.x[:, 128:], np.float32))
    np.testing.assert_array_equal(np.asarray(qlinear.join((attn, hs)), np.float32),
                                  np.asarray(qlinear.join((attn, h)), np.float32))
    passes.clear()
    got = np.asarray(qlinear.apply(lin2, (attn, h)), np.float32)
    assert passes == [(64, 128)]   # the attention part's
    want = np.asarray(qlinear.apply(lin2, (attn, h.replace(row_max=None))), np.float32)
    assert passes == [(64, 128)] * 3   # and both parts' (blocks of 128 columns)
    monkeypatch.setattr(w4a4, "_act_choice", "wide_k")   # K = 384: XLA quantizes lin2's
    assert run().row_max is None
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match=r"row_max must be \[4, 72\]"):
    qlinear.input_parts(h.replace(row_max=h.row_max[1:]))
