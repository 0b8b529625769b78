"""The one-launch int8 activation kernel (``act_rows_hopper``, Mosaic GPU) in interpret mode:
codes and scales bit for bit its definition (``act_rowscaled.reference_folded``), the
low-rank down projection to the bf16 rounding; and the layer taking it when switched on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdq_jax import qlinear
from svdq_jax.pallas_kernels import act_rows_hopper, act_rowscaled, w4a4

from layer_helpers import quantize_one


def _x(m, k, seed=0):
  x = jax.random.normal(jax.random.key(seed), (m, k)) * jnp.linspace(0.05, 6.0, k)
  return x.astype(jnp.bfloat16).at[5].set(0).at[7, 3].set(jnp.nan)


@pytest.mark.parametrize("m,k,r,smoothed,block_k", [
    (200, 512, 32, True, 256), (77, 768, 16, False, 256), (64, 256, None, True, 256),
    (72, 512, 16, True, 128)])
def test_equals_reference(m, k, r, smoothed, block_k):
  """Ragged M (77: padded to whole TMA row tiles), K in 2-4 pipeline steps of 128 or 256
  columns, with and without 1 / lambda and the low-rank factor; token 5 all zero (codes 0,
  scale 0), token 7 holding a NaN (codes 0, scale NaN)."""
  x = _x(m, k)
  ki, kd = jax.random.split(jax.random.key(1))
  inv = jax.random.uniform(ki, (k,), minval=0.5, maxval=2.0) if smoothed else None
  down = None if r is None else (jax.random.normal(kd, (k, r)) * 0.05).astype(jnp.bfloat16)
  a, s, lr = act_rows_hopper.quantize_int8_rows(x, inv, down, block_k=block_k,
                                                interpret=True)
  want_a, want_s, want_lr = act_rowscaled.reference_folded(x, inv, down, "int8")
  assert a.dtype == jnp.int8 and a.shape == (m, k) and s.shape == (m,)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(want_a))
  np.testing.assert_array_equal(np.asarray(s), np.asarray(want_s))   # NaN where NaN
  assert float(s[5]) == 0 and not np.asarray(a[5]).any()
  assert np.isnan(float(s[7])) and not np.asarray(a[7]).any()
  assert np.abs(np.asarray(a[0], np.int32)).max() == 127
  if r is None:
    assert lr is None
    return
  assert lr.dtype == jnp.bfloat16 and lr.shape == (m, r)
  ok = np.arange(m) != 7   # the NaN token's lr is NaN in both
  got, want = np.asarray(lr, np.float32)[ok], np.asarray(want_lr, np.float32)[ok]
  # one bf16 rounding of an f32 sum in another order
  np.testing.assert_allclose(got, want, rtol=2 ** -8, atol=1e-6 * np.abs(want).max())
  assert np.isnan(np.asarray(lr, np.float32)[7]).all()


def test_errors():
  x = jnp.zeros((64, 512), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"x must be bf16 \[M, K\]"):
    act_rows_hopper.quantize_int8_rows(x.astype(jnp.float32), None, None, interpret=True)
  with pytest.raises(ValueError, match="must be a multiple of block_k"):
    act_rows_hopper.quantize_int8_rows(x[:, :384], None, None, interpret=True)
  with pytest.raises(ValueError, match=r"inv_smooth must be \[K\]"):
    act_rows_hopper.quantize_int8_rows(x, jnp.ones((256,)), None, interpret=True)
  with pytest.raises(ValueError, match="r a multiple of 16"):
    act_rows_hopper.quantize_int8_rows(x, None, jnp.zeros((512, 8), jnp.bfloat16),
                                       interpret=True)


def test_layer_takes_it_when_switched_on(monkeypatch):
  """``w4a4.set_one_launch_activations``: a W4A8 layer (rank 8: its factor padded to 16 as the
  GEMMs pad lr) quantizes a bf16 input with the kernel, to the same codes and scales as XLA's
  path, so the output differs from the default's only by lr's sums (bf16 roundings);
  an f32 input, or the switch off, keeps XLA's path."""
  x = jax.random.normal(jax.random.key(0), (72, 256)) * jnp.linspace(0.05, 6.0, 256)
  w = jax.random.normal(jax.random.key(1), (256, 256))
  layer = quantize_one(w, x, alpha_grid=1)
  calls = []
  real = act_rows_hopper.quantize_int8_rows
  monkeypatch.setattr(act_rows_hopper, "quantize_int8_rows",
                      lambda *a, **k: calls.append(a[2].shape) or real(*a, **k))
  xb = x.astype(jnp.bfloat16)
  with qlinear.backend("interpret"):
    want = np.asarray(qlinear.apply(layer, xb), np.float32)
    assert calls == []
    monkeypatch.setattr(w4a4, "_one_launch_act", True)
    got = np.asarray(qlinear.apply(layer, xb), np.float32)
    assert calls == [(256, 16)]
    qlinear.apply(layer, x)
    assert len(calls) == 1
  np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-3 * np.abs(want).max())
