"""The INT8 q k^T flash attention kernel (pallas_kernels/attention_int8.py), bf16 and FP8 P V,
in GPU interpret mode against its jnp reference; the reference against ``int8_attention``.
Timing and the bf16 path's P from registers run on the GPU (scripts/bench_attention.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdq_jax.attention import int8_attention
from svdq_jax.pallas_kernels import attention_int8


def _qkv(shape, seed=0):
  q, k, v = jax.random.normal(jax.random.key(seed), (3, *shape))
  return q, k + 4.0 * jax.random.normal(jax.random.key(seed + 1), shape[-1:]), v


@pytest.mark.parametrize("pv", ["bf16", "fp8"])
def test_reference_is_int8_attention(pv):
  q, k, v = _qkv((2, 96, 2, 64))
  got = attention_int8.reference(*attention_int8.prepare(q, k, v, pv))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(int8_attention(q, k, v, pv=pv)))


def _rel(got, want):
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("pv,block_kv", [("bf16", 64), ("bf16", 128), ("fp8", 256)])
def test_kernel_matches_reference(pv, block_kv):
  """Both compute warpgroups, KV tiles through a ring of 2 slots (block_kv 64: 4 tiles; 128:
  one per slot; 256: one tile). The kernel rounds P relative to the running max, so with one
  tile (or bf16's 8 bits) it is within bf16's relative step (2^-8) of the reference."""
  q, k, v = _qkv((1, 256, 2, 128))
  ops = attention_int8.prepare(q, k, v, pv)
  want = np.asarray(attention_int8.reference(*ops))
  got = attention_int8.flash(*ops, block_kv=block_kv, interpret=True)
  assert got.shape == q.shape and got.dtype == jnp.bfloat16
  got = np.asarray(got.astype(jnp.float32))
  assert _rel(got, want) < 2 ** -8
  np.testing.assert_allclose(got, want, rtol=0, atol=2 ** -7 * np.abs(want).max())


def test_fp8_kernel_over_several_tiles_is_as_close_to_exact_as_the_reference():
  """Over 4 KV tiles E4M3 rounds P~ relative to each tile's running max, not the row's: the
  outputs differ by rounding (measured 1.9%), each as far from exact attention (3.6%)."""
  q, k, v = _qkv((1, 256, 2, 128))
  exact = np.asarray(jax.nn.dot_product_attention(q, k, v))
  ops = attention_int8.prepare(q, k, v, "fp8")
  ref_err = _rel(np.asarray(attention_int8.reference(*ops)), exact)
  got = np.asarray(attention_int8.flash(*ops, block_kv=64, interpret=True).astype(jnp.float32))
  assert 0.9 * ref_err < _rel(got, exact) < 1.1 * ref_err, (_rel(got, exact), ref_err)


def test_bad_operands_are_clear_errors():
  q8, sq, k8, sk, v = attention_int8.prepare(*_qkv((1, 192, 1, 64)))
  with pytest.raises(ValueError, match="multiple of 2 block_q"):
    attention_int8.flash(q8, sq, k8, sk, v, interpret=True)
  with pytest.raises(ValueError, match="int8"):
    attention_int8.flash(q8.astype(jnp.float32), sq, k8, sk, v, block_kv=64, interpret=True)
  with pytest.raises(ValueError, match=r"\[B, H, L\]"):
    attention_int8.flash(q8, sq[:, :, :64], k8, sk, v, block_kv=64, interpret=True)
  with pytest.raises(ValueError, match="float8_e4m3fn"):   # FP8 P V with bf16 V^T
    attention_int8.flash(q8, sq, k8, sk, jnp.swapaxes(v, 1, 3).swapaxes(1, 2), sk[:, :, :64],
                         block_kv=64, interpret=True)
  with pytest.raises(ValueError, match="pv must be"):
    attention_int8.prepare(*_qkv((1, 192, 1, 64)), pv="int8")


def test_int32_to_f32_by_magic_number_is_exact_over_the_score_range():
  """The kernel's conversion of the int32 scores, at the bounds |q8 . k8| <= 127^2 x 256."""
  bound = 127 * 127 * 256
  x = jnp.array([-bound, -bound + 1, -12345, -1, 0, 1, 98765, bound - 1, bound], jnp.int32)
  f = jax.lax.bitcast_convert_type(x + attention_int8.MAGIC_BITS, jnp.float32) \
      - attention_int8.MAGIC
  np.testing.assert_array_equal(np.asarray(f, np.float64), np.asarray(x, np.float64))
