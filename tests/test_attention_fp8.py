"""FP8 attention's operands in one kernel pass (pallas_kernels.attention_fp8, interpret mode)
against FLUX's unfused path: split heads, RMSNorms, join the streams, RoPE, quantize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdq_jax import attention, qlinear
from svdq_jax.models import flux
from svdq_jax.pallas_kernels import attention_fp8

H, D = 2, 32


def _streams(lengths, extra=0, seed=0):
  """Streams of ``joint_attention``: random projections (a column outside the qkv part too)
  and QKNorms with random scales of both signs."""
  streams = []
  for i, length in enumerate(lengths):
    kx, kq, kk = jax.random.split(jax.random.key(seed + i), 3)
    x = 3.0 * jax.random.normal(kx, (1, length, 3 * H * D + extra))
    x = x.at[..., H * D:2 * H * D].add(2.0)   # keys sharing an offset: smoothing matters
    qk = flux.QKNorm(D)
    qk.query_norm.scale[...] = jax.random.uniform(kq, (D,), minval=-2.0, maxval=3.0)
    qk.key_norm.scale[...] = jax.random.uniform(kk, (D,), minval=-1.0, maxval=2.0)
    streams.append((x.astype(jnp.bfloat16), qk))
  total = sum(lengths)
  ids = jax.random.randint(jax.random.key(seed + 9), (total, 3), 0, 64).astype(jnp.float32)
  return streams, flux.rope(ids, (8, 12, 12), 10_000)


def _codes_agree(got, want):
  """E4M3 codes equal but for rare one-step differences (the kernel's RMSNorm sums a head
  in its own order, so a bf16 rounding can fall the other way)."""
  got, want = (np.asarray(t.astype(jnp.float32)) for t in (got, want))
  differ = got != want
  assert differ.mean() < 2e-3, differ.mean()
  step = 2.0 ** -3 * np.maximum(np.abs(got), np.abs(want)) + 2.0 ** -9
  assert np.all(np.abs(got - want)[differ] <= step[differ])


@pytest.mark.parametrize("lengths,extra,heads_per_program",
                         [((25, 519), 0, 1), ((40,), 64, 2)])
def test_kernel_matches_the_unfused_path(lengths, extra, heads_per_program, monkeypatch):
  """Two streams (ragged tiles, a stream starting mid-tile, a sampled k mean and v bound
  over 544 tokens) and one wide projection (single blocks: its MLP columns after qkv), its
  programs doing both heads."""
  monkeypatch.setattr(attention_fp8, "TILING",
                      dict(attention_fp8.TILING, heads_per_program=heads_per_program))
  streams, pe = _streams(lengths, extra)
  q8, k8, v8, want_scales = flux.fp8_operands_reference(streams, pe, H)
  gq, gk, gv, scales = flux.fp8_operands(streams, pe, H, interpret=True)
  assert [float(s) for s in scales] == [float(s) for s in want_scales]
  assert gq.shape == q8.shape == (1, sum(lengths), H, D) and gq.dtype == q8.dtype
  np.testing.assert_array_equal(np.asarray(gv.astype(jnp.float32)),
                                np.asarray(v8.astype(jnp.float32)))
  _codes_agree(gq, q8)
  _codes_agree(gk, k8)


def test_bad_inputs_are_clear_errors():
  streams, pe = _streams((16,))
  (x, qk), = streams
  args = lambda xs, cos: ([(t, qk.query_norm.scale[...], qk.key_norm.scale[...]) for t in xs],
                          cos, pe[1], jnp.zeros((1, H, D)), jnp.ones(3), H, 1e-6)
  with pytest.raises(ValueError, match="a stream must be"):
    attention_fp8.fp8_operands(*args([x[..., :-1]], pe[0]), interpret=True)
  with pytest.raises(ValueError, match="cos, sin must be"):
    attention_fp8.fp8_operands(*args([x], pe[0][:8]), interpret=True)


def test_flux_blocks_fused_path_is_fp8_attention(monkeypatch):
  """``joint_attention`` with the fused operands (the kernel in interpret mode, cuDNN's kernel
  by its jnp numerics) gives what the unfused 'fp8' reference gives, for two streams."""
  streams, pe = _streams((25, 519))
  flux.set_attention_implementation("fp8")
  try:
    want = flux.joint_attention(streams, pe, H)
  finally:
    flux.set_attention_implementation(None)
  fused = flux.fp8_operands
  monkeypatch.setattr(flux, "fp8_operands", lambda *a: fused(*a, interpret=True))
  monkeypatch.setattr(flux, "_fused_fp8_operands", lambda s: True)
  monkeypatch.setattr(flux, "cudnn_fp8_kernel", lambda q8, k8, v8, p: (
      attention.fp8_kernel_reference(q8, k8, v8, p["descale_q"][0, 0, 0, 0],
                                     p["descale_k"][0, 0, 0, 0])))
  flux.set_attention_implementation("cudnn_fp8")
  monkeypatch.setattr(flux, "_fp8_output_part", True)
  try:
    got = flux.joint_attention(streams, pe, H)
    part = flux.joint_attention(streams, pe, H, as_part=True)
  finally:
    flux.set_attention_implementation(None)
  assert got.shape == want.shape == (1, 544, H * D) and got.dtype == want.dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  # the single blocks' linear2 input: the E4M3 output and its scale, the same values joined
  assert isinstance(part, qlinear.Scaled) and part.x.dtype == jnp.float8_e4m3fn
  np.testing.assert_array_equal(np.asarray(qlinear.join(part), np.float32),
                                np.asarray(want, np.float32))


def test_the_fp8_switches_retrace_jitted_loops():
  """``set_fused_fp8_operands`` and ``set_fp8_output_part`` are part of
  ``attention_settings``, the static argument by which the sampling loop and the demo's
  predictions are retraced."""
  for switch, value in ((flux.set_fused_fp8_operands, flux._fused_fp8),
                        (flux.set_fp8_output_part, flux._fp8_output_part)):
    before = flux.attention_settings()
    switch(not value)
    try:
      assert flux.attention_settings() != before
    finally:
      switch(value)
    assert flux.attention_settings() == before
