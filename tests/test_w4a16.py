"""The weight-only GEMV kernel (``pallas_kernels.w4a16``, interpret mode) against the
reference numerics of a W4A16 layer (``qlinear.reference_apply``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdq_jax import formats, qlinear, transforms
from svdq_jax.config import QuantConfig, Rule, method_spec
from svdq_jax.pallas_kernels import w4a16


def _layer(fmt, k=256, n=96, seed=0):
  """An AWQ-smoothed W4A16 layer k -> n with a bias, from a random weight."""
  ks = jax.random.split(jax.random.key(seed), 4)
  w = jax.random.normal(ks[0], (k, n)) * 0.05
  xs = jax.random.normal(ks[1], (64, k)) * jnp.linspace(0.1, 4.0, k)
  (layer,), _ = transforms.quantize_group([w], method_spec("w4a16", fmt, False, None), 0, None,
                                          QuantConfig(rules=(Rule(".*"),)), ks[2],
                                          jnp.max(jnp.abs(xs), 0), xs)
  assert layer.smooth is not None and layer.act_format is None
  return layer.replace(bias=jax.random.normal(ks[3], (n,)))


@pytest.mark.parametrize("fmt", ["int4", "int4_2l"])
def test_gemv_is_the_dequantized_product(fmt):
  """f32 output = bf16(x_hat) @ bf16(dequantized W)^T up to f32 summation order; every
  weight nibble, group scale and multiplier lands where the reference puts it."""
  layer = _layer(fmt)
  x_hat = jax.random.normal(jax.random.key(5), (16, 256)).astype(jnp.bfloat16)
  got = w4a16.gemv(x_hat, layer.qweight, layer.wscale, layer.wcscale,
                   two_level=fmt == "int4_2l", interpret=True)
  w = formats.dequantize(layer.weight(), fmt).astype(jnp.bfloat16).astype(jnp.float32)
  want = np.asarray(x_hat, np.float64) @ np.asarray(w, np.float64).T
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("fmt", ["int4", "int4_2l"])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_layer_on_the_gemv_equals_the_reference(fmt, rows):
  """Smoothing, bias and a joined LoRA branch around the kernel; bf16 in and out."""
  layer = _layer(fmt, seed=rows)
  ks = jax.random.split(jax.random.key(rows), 3)
  layer = layer.replace(lora_down=(jax.random.normal(ks[0], (256, 16)) * 0.1).astype(jnp.bfloat16),
                        lora_up=(jax.random.normal(ks[1], (16, 96)) * 0.1).astype(jnp.bfloat16))
  x = (jax.random.normal(ks[2], (rows, 256)) * 2).astype(jnp.bfloat16)
  assert w4a16.supports(layer, rows, x.dtype)
  want = qlinear.reference_apply(layer, x).astype(jnp.float32)
  with qlinear.backend("interpret"):
    got = qlinear.apply(layer, x).astype(jnp.float32)
  # one bf16 rounding of the same f32 value, summed in another order: at most one ulp apart
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2 ** -7,
                             atol=2 ** -7 * float(jnp.abs(want).max()))


def test_what_the_gemv_takes():
  """More than 16 tokens, f32 inputs, activation-quantized layers and N without a 16-wide
  block stay on the reference; asked directly, the kernel names what it cannot take."""
  layer = _layer("int4_2l")
  bf = jnp.bfloat16
  assert w4a16.supports(layer, 16, bf)
  assert not w4a16.supports(layer, 17, bf)
  assert not w4a16.supports(layer, 1, jnp.float32)
  assert not w4a16.supports(layer.replace(act_format="int8"), 1, bf)
  odd = _layer("int4", n=40)
  assert not w4a16.supports(odd, 1, bf)
  with pytest.raises(ValueError, match="<= 16 tokens"):
    w4a16.w4a16_linear(layer, jnp.zeros((17, 256), bf), interpret=True)
  # 'auto' off the GPU runs the reference whatever the layer
  x = jnp.ones((1, 256), bf)
  np.testing.assert_array_equal(np.asarray(qlinear.apply(layer, x), np.float32),
                                np.asarray(qlinear.reference_apply(layer, x), np.float32))


def test_auto_uses_the_gemv_only_where_switched_on(monkeypatch):
  """'auto' runs the kernel for a weight-only layer only on a GPU with ``w4a16.AUTO`` on."""
  layer, x = _layer("int4"), jnp.ones((1, 256), jnp.bfloat16)
  calls = []
  monkeypatch.setattr(w4a16, "w4a16_linear", lambda *a, **k: calls.append(a) or a[1][:, :96])
  qlinear.apply(layer, x)
  monkeypatch.setattr(w4a16, "AUTO", True)
  qlinear.apply(layer, x)            # on the CPU: still the reference
  assert not calls
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  qlinear.apply(layer, x)
  assert len(calls) == 1
