"""A helper shared by the layer and kernel tests: one small quantized layer."""

import jax
import jax.numpy as jnp

from svdq_jax import transforms
from svdq_jax.config import QuantConfig, Rule, method_spec


def quantize_one(w, x, method="svdquant", fmt="int4_2l", act_fmt="int8", *, rank=8,
                 alpha_grid=2, lowrank_iters=1):
  """One layer, the way ``quantize`` makes it: w [K, N] (float) by ``method`` into ``fmt``
  weights and ``act_fmt`` activations, calibrated on x [..., K] (its tokens' per-channel
  absmax, its tokens as samples; methods without calibration ignore both). rank: the
  low-rank branch's (svdquant only). Returns the QuantizedLinear (bias None)."""
  xf = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
  cfg = QuantConfig(rules=(Rule(".*"),), alpha_grid=alpha_grid, lowrank_iters=lowrank_iters)
  (layer,), _ = transforms.quantize_group(
      [w], method_spec(method, fmt, False, act_fmt), rank, None, cfg, jax.random.key(0),
      jnp.abs(xf).max(0), xf)
  return layer
