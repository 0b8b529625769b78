"""Smoothing, truncated SVD, refinement, shared decomposition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdq_jax import transforms
from svdq_jax.config import QuantConfig, Rule, method_spec
from svdq_jax.example import outlier_activations
from svdq_jax.lowrank import truncated_svd


def test_smooth_factors_formula():
  x = np.array([1.0, 4.0, 100.0, 0.0], np.float32)
  w = np.array([1.0, 0.25, 0.01, 2.0], np.float32)
  lam = np.asarray(transforms.smooth_factors(x, w, 0.5))
  np.testing.assert_allclose(lam[:3], np.sqrt(x[:3]) / np.sqrt(w[:3]), rtol=1e-6)
  assert np.isfinite(lam).all() and lam[3] > 0  # a dead channel stays finite


def test_truncated_svd_matches_exact_svd():
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.standard_normal((200, 200)))
  v, _ = np.linalg.qr(rng.standard_normal((150, 150)))
  s = 10.0 * 0.8 ** np.arange(150)
  a = (u[:, :150] * s) @ v.T
  down, up = truncated_svd(jnp.asarray(a, jnp.float32), 8, jax.random.key(0))
  best = (u[:, :8] * s[:8]) @ v[:, :8].T
  np.testing.assert_allclose(np.asarray(down @ up), best, atol=1e-3 * s[0])
  np.testing.assert_allclose(np.asarray(up @ up.T), np.eye(8), atol=1e-4)


def _problem(k=256, n=128, tokens=256, seed=0):
  x = outlier_activations(jax.random.key(seed), tokens, k, outlier_channels=4)
  w = jax.random.normal(jax.random.key(seed + 1), (k, n)) / np.sqrt(k)
  return x, w


def test_refinement_reaches_lower_error_than_one_shot_and_beats_smoothquant():
  x, w = _problem()
  absmax = jnp.max(jnp.abs(x), axis=0)
  cfg = QuantConfig(rules=(Rule(".*"),), alpha_grid=10)
  key = jax.random.key(0)
  one = transforms.quantize_group([w], method_spec("svdquant", "int4", False), 16, None,
                                  QuantConfig(rules=cfg.rules, alpha_grid=10, lowrank_iters=1),
                                  key, absmax, x)[1]
  ref = transforms.quantize_group([w], method_spec("svdquant", "int4", False), 16, None, cfg,
                                  key, absmax, x)[1]
  sq = transforms.quantize_group([w], method_spec("smoothquant", "int4", False), 16, None,
                                 cfg, key, absmax, x)[1]
  assert one.iterations == 1 and ref.iterations > 1
  assert ref.error <= one.error
  assert ref.error < 0.5 * sq.error
  assert 0.0 <= ref.alpha < 1.0


def test_reported_error_is_the_layers_error():
  x, w = _problem(seed=3)
  cfg = QuantConfig(rules=(Rule(".*"),), alpha_grid=5)
  (layer,), rep = transforms.quantize_group(
      [w], method_spec("svdquant", "nvfp4", False), 8, None, cfg, jax.random.key(1),
      jnp.max(jnp.abs(x), axis=0), x)
  y_ref = x @ w
  y = layer(x)
  rel = float(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref))
  assert rel == pytest.approx(rep.error, rel=1e-3)


def test_shared_decomposition_shares_smoothing_and_down_projection():
  x, w = _problem()
  wq, wk = w[:, :64], w[:, 64:] * 3.0
  cfg = QuantConfig(rules=(Rule(".*"),), alpha_grid=4, lowrank_iters=3)
  (lq, lk), _ = transforms.quantize_group(
      [wq, wk], method_spec("svdquant", "int4", False), 8, None, cfg, jax.random.key(0),
      jnp.max(jnp.abs(x), axis=0), x)
  np.testing.assert_array_equal(np.asarray(lq.smooth), np.asarray(lk.smooth))
  np.testing.assert_array_equal(np.asarray(lq.lora_down), np.asarray(lk.lora_down))
  assert lq.out_features == 64 and lk.out_features == 64
  # each split reproduces its own layer
  for layer, wi in ((lq, wq), (lk, wk)):
    rel = jnp.linalg.norm(layer(x) - x @ wi) / jnp.linalg.norm(x @ wi)
    assert float(rel) < 0.1


def test_fixed_alpha_is_used():
  x, w = _problem()
  absmax = jnp.max(jnp.abs(x), axis=0)
  cfg = QuantConfig(rules=(Rule(".*"),), lowrank_iters=2)
  (layer,), rep = transforms.quantize_group([w], method_spec("smoothquant", "int4", False), 0,
                                            0.3, cfg, jax.random.key(0), absmax, x)
  assert rep.alpha == pytest.approx(0.3)
  expected = transforms.smooth_factors(absmax, jnp.max(jnp.abs(w), axis=1), 0.3)
  np.testing.assert_allclose(np.asarray(layer.smooth), np.asarray(expected), rtol=1e-6)


def test_stored_smoothing_factors_are_computed_op_by_op():
  """The stored lambda equals ``smooth_factors`` run op by op, bit for bit: fused, XLA would
  rewrite x^a / w^b into x^a * w^-b (an ulp off in ~1/3 of the channels), which changed the
  quantized models (the demo's INT4 PSNR moved by 0.75 dB)."""
  ks = jax.random.split(jax.random.key(3), 2)
  w = jax.random.normal(ks[0], (512, 64))
  x = jax.random.normal(ks[1], (32, 512)) * jnp.linspace(0.1, 9.0, 512)
  absmax = jnp.max(jnp.abs(x), 0)
  (layer,), _ = transforms.quantize_group(
      [w], method_spec("smoothquant", "int4", False, None), 0, 0.75,
      QuantConfig(rules=(Rule(".*"),)), ks[0], absmax, x)
  want = transforms.smooth_factors(absmax, jnp.max(jnp.abs(w), axis=1), 0.75)
  np.testing.assert_array_equal(np.asarray(layer.smooth), np.asarray(want))
