"""QuantizedLinear: reference numerics, pytree behaviour, orbax round trip."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from svdq_jax import formats
from svdq_jax.qlinear import QuantizedLinear, apply, group_scaled_matmul
from svdq_jax.layers import dense


def _layer(k=128, n=64, r=8, fmt="int4", act="int4", seed=0, bias=True):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
  qt = formats.quantize_weight(w, fmt)
  f = formats.get_format(fmt)
  return QuantizedLinear(
      qweight=formats.pack(qt.q, f) if f.packed else qt.q,
      wscale=qt.scale,
      wcscale=qt.tensor_scale[:, 0] if fmt == "nvfp4" else None,
      smooth=jnp.asarray(rng.uniform(0.5, 2.0, k), jnp.float32),
      lora_down=jnp.asarray(rng.standard_normal((k, r)) * 0.1, jnp.bfloat16) if r else None,
      lora_up=jnp.asarray(rng.standard_normal((r, n)) * 0.1, jnp.bfloat16) if r else None,
      bias=jnp.asarray(rng.standard_normal(n), jnp.float32) if bias else None,
      weight_format=fmt, act_format=act)


def _numpy_forward(layer, x):
  """float64/int64 numpy version of the layer's forward pass (independent of apply)."""
  wf, af = formats.get_format(layer.weight_format), None
  xh = np.asarray(x, np.float64) / np.asarray(layer.smooth, np.float64)
  qw = layer.weight()
  w_q = np.asarray(qw.q, np.int64)
  sw = np.asarray(qw.scale.astype(jnp.float32), np.float64) * np.asarray(
      qw.tensor_scale, np.float64).reshape(-1, 1)
  k = w_q.shape[1]
  g = wf.group_len(k)
  if layer.act_format is None:
    w = (w_q.reshape(-1, k // g, g) * sw[..., None]).reshape(-1, k) * wf.step
    y = xh @ w.T
  else:
    af = formats.get_format(layer.act_format)
    qa = formats.quantize(xh.astype(np.float32), af)  # activation codes: compared separately
    a_q = np.asarray(qa.q, np.int64)
    sa = np.asarray(qa.scale, np.float64)
    part = np.einsum("mgk,ngk->mng", a_q.reshape(len(a_q), -1, g), w_q.reshape(len(w_q), -1, g))
    y = np.einsum("mng,mg,ng->mn", part, sa, sw) * wf.step * af.step
  if layer.lora_down is not None:  # x @ (L_down / lambda), bf16 operands, exact accumulation
    bf = lambda v: np.asarray(v, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    inv = np.float32(1) / np.asarray(layer.smooth, np.float32)   # correctly rounded in f32
    lr = bf(x) @ bf(np.asarray(layer.lora_down.astype(jnp.float32)) * inv[:, None])
    y = y + bf(lr) @ bf(layer.lora_up.astype(jnp.float32))
  if layer.bias is not None:
    y = y + np.asarray(layer.bias, np.float64)
  return y


@pytest.mark.parametrize("fmt,act", [("int4", "int4"), ("int4", "uint4"), ("nvfp4", "nvfp4"),
                                     ("int8", "int8"), ("int4", None), ("nvfp4", None)])
def test_apply_matches_numpy(fmt, act):
  layer = _layer(fmt=fmt, act=act, r=0 if fmt == "int8" else 8)
  x = np.random.default_rng(1).standard_normal((3, 5, 128)).astype(np.float32)
  if act == "uint4":
    x = np.abs(x)
  y = apply(layer, jnp.asarray(x))
  assert y.shape == (3, 5, 64) and y.dtype == jnp.float32
  ref = _numpy_forward(layer, x.reshape(-1, 128)).reshape(3, 5, 64)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_group_scaled_matmul_integer_partials_are_exact():
  # scales of 1: the result is the exact integer matmul (|sum| < 2^24 keeps f32 exact)
  rng = np.random.default_rng(2)
  a = rng.integers(-8, 8, (7, 256), dtype=np.int8)
  w = rng.integers(-8, 8, (9, 256), dtype=np.int8)
  one = jnp.float32(1.0)
  y = group_scaled_matmul(formats.Quantized(jnp.asarray(a), jnp.ones((7, 4)), one),
                          formats.Quantized(jnp.asarray(w), jnp.ones((9, 4)), one), 64)
  np.testing.assert_array_equal(np.asarray(y), a.astype(np.int64) @ w.T.astype(np.int64))


def test_weight_only_equals_dequantized_weight():
  layer = _layer(act=None, bias=False, r=0)  # the low-rank branch runs on bf16 operands
  x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 128)), jnp.float32)
  np.testing.assert_allclose(np.asarray(apply(layer, x)),
                             np.asarray(x @ layer.dequantized_weight()), rtol=1e-5, atol=1e-5)


def test_bf16_inputs_give_bf16_outputs_and_jit():
  layer = _layer()
  x = jnp.ones((2, 128), jnp.bfloat16)
  y = jax.jit(apply)(layer, x)
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 64)
  assert layer.in_features == 128 and layer.out_features == 64 and layer.rank == 8


def test_dense_dispatch_float_and_quantized():
  layer = _layer(bias=False)
  x = jnp.ones((2, 128), jnp.float32)
  b = jnp.arange(64, dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(dense(x, layer, b)), np.asarray(apply(layer, x) + b),
                             rtol=1e-6)
  w = jnp.ones((128, 64))
  np.testing.assert_allclose(np.asarray(dense(x, w, b)), np.broadcast_to(128.0 + np.arange(64), (2, 64)))


def test_dense_residual():
  """``residual=(r, gate)``: float kernels and quantized ones (``residual_sum``) return
  ``r + gate * y``, on the CPU each bf16 operation rounded (the product too: the kernel
  epilogue's semantics, tests/test_w4a8_kernel.py), not one rounding of the f32 expression;
  with gelu_from an error."""
  layer = _layer(bias=False)
  ks = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(ks[0], (2, 40, 128)).astype(jnp.bfloat16)
  r = (jax.random.normal(ks[1], (2, 40, 64)) * 4).astype(jnp.bfloat16)
  gate = jax.random.normal(ks[2], (2, 1, 64)).astype(jnp.bfloat16)
  w = jax.random.normal(ks[0], (128, 64), jnp.bfloat16)
  y = jnp.matmul(x, w)
  np.testing.assert_array_equal(np.asarray(dense(x, w, residual=(r, gate)), np.float32),
                                np.asarray(r + gate * y, np.float32))
  got = np.asarray(dense(x, layer, residual=(r, gate)), np.float32)
  yq = apply(layer, x)
  np.testing.assert_array_equal(got, np.asarray(r + gate * yq, np.float32))
  f32 = lambda v: v.astype(jnp.float32)
  once = np.asarray((f32(r) + f32(gate) * f32(yq)).astype(jnp.bfloat16), np.float32)
  assert (once != got).any()   # the product's own rounding is part of the definition
  for kernel in (w, layer):
    with pytest.raises(ValueError, match="exclude each other"):
      dense(x, kernel, gelu_from=0, residual=(r, gate))


def test_bad_inputs():
  layer = _layer()
  with pytest.raises(ValueError, match=r"expects inputs \[\.\.\., 128\], got \(2, 100\)"):
    apply(layer, jnp.ones((2, 100)))
  with pytest.raises(ValueError, match="bias given twice"):
    apply(layer, jnp.ones((2, 128)), jnp.ones(64))
  with pytest.raises(ValueError, match=r"bias must be \[N=64\], got \(10,\)"):
    apply(_layer(bias=False), jnp.ones((2, 128)), jnp.ones(10))


def test_integer_inputs_are_promoted_to_f32():
  """As x @ a float kernel: an integer input gives the f32 output of its float values (not
  an output truncated to integers)."""
  layer = _layer()
  x = jnp.asarray(np.random.default_rng(4).integers(-3, 4, (2, 128)), jnp.int32)
  y = apply(layer, x)
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y), np.asarray(apply(layer, x.astype(jnp.float32))))


@pytest.mark.parametrize("backend", ["pallas", "interpret"])
def test_weight_only_layers_without_a_kernel_take_the_reference_on_every_backend(backend):
  """A W4A16 layer the GEMV does not take (f32 input) has no W4A4 kernel either: on a
  kernels backend it runs the reference, as on 'auto', instead of failing."""
  from svdq_jax import qlinear
  layer = _layer(act=None, fmt="int4")
  x = jnp.asarray(np.random.default_rng(5).standard_normal((3, 128)), jnp.float32)
  with qlinear.backend(backend):
    y = apply(layer, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(qlinear.reference_apply(layer, x)))


def test_orbax_round_trip_bit_exact(tmp_path):
  tree = {"a": {"kernel": _layer(fmt="nvfp4", act="nvfp4"), "bias": jnp.ones(64)},
          "b": {"kernel": _layer(r=0, act=None, bias=False)}}
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "q", tree)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "q", jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree))
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(tree)
  for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(restored)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  assert restored["a"]["kernel"].weight_format == "nvfp4"
