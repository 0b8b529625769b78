"""8-bit attention's reference numerics (svdq_jax.attention) and its switch in FLUX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from svdq_jax import parallel
from svdq_jax.attention import cudnn_fp8_operands, fp8_attention, int8_attention
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


def test_cudnn_fp8_operands_are_fp8_attentions_quantization():
  """The cuDNN FP8 kernel's operands (built on any machine; the kernel needs cuDNN): E4M3 q,
  k minus its token mean, v, each within E4M3's rounding of its tensor, and the scales the
  kernel descales by; P quantized with 448."""
  q, k, v = _qkv()
  q8, k8, v8, params, sv = cudnn_fp8_operands(q, k, v)
  assert {t.dtype for t in (q8, k8, v8)} == {jnp.dtype(jnp.float8_e4m3fn)}
  centred = k - k.mean(axis=1, keepdims=True)
  for t8, key, want in ((q8, "descale_q", q), (k8, "descale_k", centred), (v8, "descale_v", v)):
    got = t8.astype(jnp.float32) * params[key][0, 0, 0, 0]
    # E4M3 rounds to 3 mantissa bits (relative 2^-4) above its subnormals (scaled: max / 2^14)
    tol = 2.0 ** -4 * jnp.abs(want) + float(jnp.abs(want).max()) * 2.0 ** -14
    assert bool(jnp.all(jnp.abs(got - want) <= tol)), key
  assert float(params["scale_s"][0, 0, 0, 0]) == 448.0
  assert float(params["scale_o"][0, 0, 0, 0]) == float(1.0 / sv)


def test_bad_shapes_are_clear_errors():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"\[B, L, H, D\] of one shape"):
    int8_attention(q, k[:, :50], v)
  with pytest.raises(ValueError, match="pv must be"):
    int8_attention(q, k, v, pv="fp4")
  with pytest.raises(ValueError, match="'int8'"):
    flux.set_attention_implementation("fp4")


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
