"""8-bit attention's reference numerics (svdq_jax.attention) and its switch in FLUX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from svdq_jax import attention as attention_module
from svdq_jax import parallel
from svdq_jax.attention import (cudnn_fp8_attention, cudnn_fp8_operands, fp8_attention,
                                int8_attention, rms_norm_bound)
from svdq_jax.models import flux, sampling
from svdq_jax.models.flux import Flux, FluxConfig


def _qkv(seed=0, shape=(2, 96, 2, 32)):
  q, k, v = jax.random.normal(jax.random.key(seed), (3, *shape))
  return q, k + 4.0 * jax.random.normal(jax.random.key(seed + 1), shape[-1:]), v


def test_close_to_exact_attention_and_key_offset_free():
  q, k, v = _qkv()
  want = jax.nn.dot_product_attention(q, k, v)
  got = int8_attention(q, k, v)
  assert got.shape == want.shape and got.dtype == q.dtype
  rel = lambda x: float(jnp.linalg.norm(x - want) / jnp.linalg.norm(want))
  # FP8 P V dominates (E4M3: 3 mantissa bits; measured 3.4%); INT8 scores alone 0.8%
  assert 0 < rel(int8_attention(q, k, v, pv="bf16")) < 1e-2 < rel(got) < 5e-2
  # a vector added to every key changes no softmax, and K smoothing keeps it out of the
  # codes: the INT8 error stays (it would triple with K's range without the smoothing)
  shifted = int8_attention(q, k + 10.0 * jnp.arange(32.0) / 32, v, pv="bf16")
  base = rel(int8_attention(q, k, v, pv="bf16"))
  assert abs(rel(shifted) - base) < 0.05 * base, (rel(shifted), base)
  # zero queries: uniform attention, the mean of V rounded through FP8
  mean = int8_attention(jnp.zeros_like(q), k, v)
  np.testing.assert_allclose(np.asarray(mean), np.broadcast_to(
      np.asarray(v).mean(axis=1, keepdims=True), v.shape), atol=0.05)
  assert int8_attention(q.astype(jnp.bfloat16), k, v).dtype == jnp.bfloat16
  # FP8 throughout (cuDNN's numerics): E4M3 q and k add to the P V error (measured 6.0%)
  fp8 = rel(fp8_attention(q, k, v))
  assert rel(got) < fp8 < 8e-2, (fp8, rel(got))


@pytest.mark.parametrize("pv", ["fp8", "bf16"])
def test_a_nan_query_gives_its_row_nan_as_exact_attention(pv):
  """A NaN in one query token: its output row is NaN, every other row as without it, as
  exact attention does (the INT8 rows' absmax propagates NaN explicitly: on the CPU XLA's max
  over 64 or more rows drops it, and the row came out finite and wrong)."""
  q, k, v = _qkv(shape=(1, 128, 2, 32))
  bad = q.at[0, 5, 0, 3].set(jnp.nan)
  want = np.asarray(int8_attention(q, k, v, pv=pv))
  got = np.array(int8_attention(bad, k, v, pv=pv))
  assert np.isnan(got[0, 5, 0]).all()
  assert np.isnan(np.asarray(jax.nn.dot_product_attention(bad, k, v))[0, 5, 0]).all()
  got[0, 5, 0] = want[0, 5, 0]
  np.testing.assert_array_equal(got, want)


def test_cudnn_fp8_operands_are_fp8_attentions_quantization():
  """The cuDNN FP8 kernel's operands (built on any machine; the kernel needs cuDNN): E4M3 q,
  k minus its token mean, v, each within E4M3's rounding of its tensor, and the scales the
  kernel descales by; P quantized with 448."""
  q, k, v = _qkv()
  q8, k8, v8, params, sv = cudnn_fp8_operands(q, k, v)
  assert {t.dtype for t in (q8, k8, v8)} == {jnp.dtype(jnp.float8_e4m3fn)}
  centred = k - k.mean(axis=1, keepdims=True)
  for t8, key, want in ((q8, "descale_q", q), (k8, "descale_k", centred), (v8, "descale_v", v)):
    scale = params[key][0, 0, 0, 0]
    got = t8.astype(jnp.float32) * scale
    # E4M3 rounds to 3 mantissa bits (relative 2^-4) above its subnormals (step 2^-9 scale)
    tol = 2.0 ** -4 * jnp.abs(want) + scale * 2.0 ** -10
    assert bool(jnp.all(jnp.abs(got - want) <= tol)), key
  assert float(params["scale_s"][0, 0, 0, 0]) == 448.0
  assert float(params["scale_o"][0, 0, 0, 0]) == float(1.0 / sv)


def test_long_sequences_smooth_k_with_a_strided_samples_mean():
  """L >= 512: k minus the mean of every (L // 256)-th key, which still removes a vector
  shared by all keys (and so keeps FP8 attention's error where the full mean keeps it)."""
  q, k, v = _qkv(shape=(1, 1024, 2, 32))
  _, smoothed, _ = attention_module._smoothed_f32(q, k, v)
  np.testing.assert_allclose(smoothed, k - k[:, ::4].mean(axis=1, keepdims=True), atol=1e-6)
  _, shifted, _ = attention_module._smoothed_f32(q, k + 10.0 * jnp.arange(32.0) / 32, v)
  np.testing.assert_allclose(shifted, smoothed, atol=1e-5)
  want = jax.nn.dot_product_attention(q, k, v)
  rel = lambda x: float(jnp.linalg.norm(x - want) / jnp.linalg.norm(want))
  assert rel(fp8_attention(q, k + 10.0 * jnp.arange(32.0) / 32, v)) < 8e-2


def test_v_scale_from_a_token_samples_maximum_with_headroom(monkeypatch):
  """v's scale: the power of two at or above 16 x (max |v| over every (L // 256)-th token) /
  448, no pass over all of v; a value past it (outside the sample) saturates, never NaN."""
  q, k, v = _qkv(shape=(1, 1024, 2, 32))
  sample_max = float(jnp.abs(v[:, ::4]).max())
  v = v.at[0, 1].set(100.0 * sample_max)   # token 1: not in the sample
  *_, v8, params, sv = cudnn_fp8_operands(q, k, v)
  assert float(sv) == 2.0 ** np.ceil(np.log2(16 * sample_max / 448))
  assert float(params["descale_v"][0, 0, 0, 0]) == float(sv)
  np.testing.assert_array_equal(np.asarray(v8[0, 2:].astype(jnp.float32)),
                                np.asarray((v[0, 2:] / sv).astype(jnp.float8_e4m3fn), np.float32))
  assert bool(jnp.all(v8[0, 1].astype(jnp.float32) == 448.0))
  # 16x headroom costs no accuracy (measured: 6.52% with or without; 64x: 6.54, 256x: 7.6)
  v = v.at[0, 1].set(v[0, 0])
  want = jax.nn.dot_product_attention(q, k, v)
  rel = lambda: float(jnp.linalg.norm(fp8_attention(q, k, v) - want) / jnp.linalg.norm(want))
  with_headroom = rel()
  monkeypatch.setattr(attention_module, "V_HEADROOM", 1.0)
  assert with_headroom < 1.001 * rel(), (with_headroom, rel())


def test_rms_norm_bound_holds_and_is_reached():
  """|RoPE(RMSNorm(x))| <= rms_norm_bound, and a one-hot row comes within 1% of it (so a bound
  without sqrt(D) or without the largest scale would fail)."""
  d = 32
  norm = flux.RMSNorm(d)
  norm.scale[...] = jax.random.uniform(jax.random.key(3), (d,), minval=-3.0, maxval=2.0)
  x = jax.random.normal(jax.random.key(4), (1, 64, 2, d)) ** 3   # heavy-tailed rows
  x = x.at[0, 0, 0].set(jnp.zeros(d).at[int(jnp.argmax(jnp.abs(norm.scale[...])))].set(5.0))
  pe = flux.rope(jnp.arange(64 * 3.0).reshape(64, 3), (8, 12, 12), 10_000)
  y = flux.apply_rope(norm(x.astype(jnp.bfloat16)), pe).astype(jnp.float32)
  bound = float(rms_norm_bound(d, norm.scale[...]))
  assert 0.99 * bound < float(jnp.abs(y).max()) <= bound


def test_pow2_scale_is_the_least_power_of_two_and_exact():
  """``pow2_scale``: the least power of two s with s * 448 >= bound over 40 decades (on
  the CPU exp2(ceil(log2(bound / 448))), its former form, was not even a power of two:
  exp2 there rounds), its reciprocal exact; at least 2^-126 (1 / s finite) for a zero or
  tiny bound; NaN and infinity kept."""
  rng = np.random.default_rng(0)
  b = (rng.random(20000) * 10.0 ** rng.uniform(-20, 20, 20000)).astype(np.float32)
  b = np.concatenate([b, np.float32(448.0) * 2.0 ** np.arange(-100, 100, dtype=np.float32)])
  s, inv = (np.asarray(t, np.float64) for t in attention_module.pow2_scale_and_inverse(b))
  assert np.all(s * 448 >= b) and np.all(s / 2 * 448 < b)
  assert np.all(np.frexp(s)[0] == 0.5) and np.all(s * inv == 1.0)
  np.testing.assert_array_equal(s, np.asarray(attention_module.pow2_scale(b), np.float64))
  s, inv = attention_module.pow2_scale_and_inverse(jnp.array([0.0, 1e-40, np.inf, np.nan]))
  assert list(s[:2]) == [2.0 ** -126] * 2 and list(inv[:2]) == [2.0 ** 126] * 2
  assert s[2] == np.inf and inv[2] == 0 and np.isnan(s[3]) and np.isnan(inv[3])


def test_fp8_attention_with_static_qk_scales():
  """q and k scaled by powers of two from their bound instead of their maxima: as close to
  exact attention as the dynamic scales (E4M3 is a float format), and the cuDNN operands
  carry those scales."""
  q, k, v = _qkv()
  want = jax.nn.dot_product_attention(q, k, v)
  rel = lambda x: float(jnp.linalg.norm(x - want) / jnp.linalg.norm(want))
  bound = 4.0 * float(jnp.abs(jnp.stack([q, k])).max())   # headroom: 4x the largest |q|, |k|
  dynamic, static = rel(fp8_attention(q, k, v)), rel(fp8_attention(q, k, v, bound))
  assert abs(static - dynamic) < 0.1 * dynamic, (static, dynamic)
  q8, k8, _, params, _ = cudnn_fp8_operands(q, k, v, bound)
  sq, sk = float(params["descale_q"][0, 0, 0, 0]), float(params["descale_k"][0, 0, 0, 0])
  assert sq == 2.0 ** np.ceil(np.log2(bound / 448)) and sk == 2 * sq
  np.testing.assert_array_equal(np.asarray(q8.astype(jnp.float32)),
                                np.asarray((q / sq).astype(jnp.float8_e4m3fn), np.float32))
  # a bound too small saturates at 448 instead of overflowing to NaN
  q8, *_ = cudnn_fp8_operands(q, k, v, bound / 16)
  assert float(jnp.abs(q8.astype(jnp.float32)).max()) == 448.0


def test_bad_shapes_are_clear_errors():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"\[B, L, H, D\] of one shape"):
    int8_attention(q, k[:, :50], v)
  with pytest.raises(ValueError, match="pv must be"):
    int8_attention(q, k, v, pv="fp4")
  with pytest.raises(ValueError, match="'int8'"):
    flux.set_attention_implementation("fp4")
  with pytest.raises(RuntimeError, match="NVIDIA GPUs only.*'fp8'"):   # this CPU
    cudnn_fp8_attention(q, k, v)


def test_flux_sampling_switches_attention_without_stale_traces():
  cfg = FluxConfig(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                   hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1,
                   axes_dim=(8, 12, 12), guidance_embed=True)
  model = Flux(cfg, nnx.Rngs(0))
  noise = jax.random.normal(jax.random.key(0), (1, 4, 8, 8))
  args = (noise, jax.random.normal(jax.random.key(1), (1, 8, 32)), jnp.zeros((8, 3)),
          jax.random.normal(jax.random.key(2), (1, 32)), sampling.schedule(2, 16))
  exact = sampling.sample(model, *args, guidance=3.5)
  flux.set_attention_implementation("int8")
  try:
    eight = sampling.sample(model, *args, guidance=3.5)
  finally:
    flux.set_attention_implementation(None)
  again = sampling.sample(model, *args, guidance=3.5)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(exact))
  rel = float(jnp.linalg.norm(eight - exact) / jnp.linalg.norm(exact))
  assert 0 < rel < 5e-2, rel


def test_flux_blocks_give_fp8_attention_their_norms_bound(monkeypatch):
  """Both block kinds hand attention the RMSNorms of their q and k (four in a double block:
  both streams'), whose bound sets FP8's static scales."""
  cfg = FluxConfig(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                   hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1,
                   axes_dim=(8, 12, 12), guidance_embed=True)
  model = Flux(cfg, nnx.Rngs(0))
  model.double_blocks[0].txt_attn.norm.key_norm.scale[...] = jnp.full((32,), -7.0)
  model.single_blocks[0].norm.query_norm.scale[...] = jnp.full((32,), 3.0)
  bounds = []
  monkeypatch.setattr(flux, "fp8_attention",
                      lambda q, k, v, bound: (bounds.append(float(bound)), v)[1])
  flux.set_attention_implementation("fp8")
  try:
    model(jnp.zeros((1, 16, 16)), jnp.zeros((16, 3)), jnp.zeros((1, 8, 32)), jnp.zeros((8, 3)),
          jnp.zeros((1,)), jnp.zeros((1, 32)), guidance=jnp.zeros((1,)))
  finally:
    flux.set_attention_implementation(None)
  np.testing.assert_allclose(bounds, np.array([7.0, 3.0]) * 32 ** 0.5 * (1 + 2 ** -7),
                             rtol=1e-6)


def test_default_attention_is_cudnn_on_gpus_for_16_bit_activations(monkeypatch):
  """jax's own default (XLA) writes the scores to memory: 4x cuDNN's time on an H200."""
  q = jnp.zeros((1, 8, 2, 16), jnp.bfloat16)
  assert flux._default_attention(q) == "xla"     # this CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert flux._default_attention(q) == "cudnn"
  assert flux._default_attention(q.astype(jnp.float16)) == "cudnn"
  assert flux._default_attention(q.astype(jnp.float32)) == "xla"   # cuDNN takes 16-bit only
  with parallel.tokens_over(jax.make_mesh((1,), ("tokens",))):
    assert flux._default_attention(q) == "xla"   # cuDNN refuses a sequence-sharded query
