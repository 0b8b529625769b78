"""The INT8 q k^T flash attention kernel (pallas_kernels/attention_int8.py) in GPU interpret mode
against its jnp reference; the reference against ``int8_attention``. Timing and the real
wgmma path (P from registers) run on the GPU in scripts/bench_attention.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdq_jax.attention import int8_attention
from svdq_jax.pallas_kernels import attention_int8


def _qkv(shape, seed=0):
  q, k, v = jax.random.normal(jax.random.key(seed), (3, *shape))
  return q, k + 4.0 * jax.random.normal(jax.random.key(seed + 1), shape[-1:]), v


def test_reference_is_int8_attention_with_bf16_pv():
  q, k, v = _qkv((2, 96, 2, 64))
  got = attention_int8.reference(*attention_int8.prepare(q, k, v))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(int8_attention(q, k, v, pv="bf16")))


@pytest.mark.parametrize("block_kv,steps", [(64, 2), (128, 2)])
def test_kernel_matches_reference(block_kv, steps):
  """Several KV tiles through a ring of 2 slots (block_kv 64: 4 tiles; 128: one per slot) and
  both compute warpgroups. The kernel rounds P relative to the running max and its output to
  bf16: within bf16's relative step (2^-8) of the reference."""
  q, k, v = _qkv((1, 256, 2, 128))
  ops = attention_int8.prepare(q, k, v)
  want = np.asarray(attention_int8.reference(*ops))
  got = attention_int8.flash(*ops, block_kv=block_kv, steps=steps, interpret=True)
  assert got.shape == q.shape and got.dtype == jnp.bfloat16
  got = np.asarray(got.astype(jnp.float32))
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2 ** -8
  np.testing.assert_allclose(got, want, rtol=0, atol=2 ** -7 * np.abs(want).max())


def test_bad_operands_are_clear_errors():
  q8, sq, k8, sk, v = attention_int8.prepare(*_qkv((1, 192, 1, 64)))
  with pytest.raises(ValueError, match="multiple of 2 block_q"):
    attention_int8.flash(q8, sq, k8, sk, v, interpret=True)
  with pytest.raises(ValueError, match="int8"):
    attention_int8.flash(q8.astype(jnp.float32), sq, k8, sk, v, block_kv=64, interpret=True)
  with pytest.raises(ValueError, match=r"\[B, H, L\]"):
    attention_int8.flash(q8, sq[:, :, :64], k8, sk, v, block_kv=64, interpret=True)
