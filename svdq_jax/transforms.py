"""Per-layer transforms: smoothing, low-rank decomposition, residual quantization.

Everything is computed in f32. Weights are [K, N] (Flax's kernel layout); quantized
weights are stored transposed, [N, K], so that groups run along K.

For a group of layers sharing one input X (one layer, or q/k/v of an attention), with
weights concatenated along N:
  1. smoothing: lambda = absmax(X)^alpha / absmax_rows(W)^(1 - alpha), alpha searched on a
     grid by the output error ||X W - Y_hat||^2 on calibration tokens, with quantization
     (and the low-rank branch, when used) in the loop;
  2. low-rank: W_hat = lambda W ~ L_down L_up + R, refined by alternating
     L = SVD_r(W_hat - Q) and Q = quant(W_hat - L), keeping the best output error and
     stopping once it stops falling;
  3. the residual R is quantized per output channel in groups along K: rounded to nearest,
     or with GPTQ (``QuantConfig.residual='gptq'``: error feedback through the inverse
     Hessian of the smoothed calibration inputs, ``svdq_jax.gptq``) once the low-rank
     branch is chosen.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from svdq_jax import formats, gptq
from svdq_jax.formats import matmul_f32
from svdq_jax.config import QUANTIZE_COMPILER_OPTIONS, Method, QuantConfig
from svdq_jax.lowrank import truncated_svd
from svdq_jax.qlinear import (LOWRANK_DTYPE, QuantizedLinear, lowrank_down, lowrank_up,
                              smoothed, stored_weight)
_EPS = 1e-5



def smooth_factors(x_absmax: jax.Array, w_absmax: jax.Array, alpha, *,
                   apart: bool = False) -> jax.Array:
  """lambda [K] = max|X_j|^alpha / max|W_j|^(1 - alpha), both clamped away from zero.

  ``apart``: keep the two powers apart (``optimization_barrier``) so that, jitted, lambda is
  bit-identical to this function run op by op. Fused, XLA rewrites x^a / w^b into x^a * w^-b,
  an ulp off in about a third of the channels: enough to move the demo's INT4 PSNR from 36.79
  to 36.04 dB. The stored lambda is computed apart (the models earlier versions gave); the
  alpha search fused, as it always was.
  """
  keep = jax.lax.optimization_barrier if apart else (lambda v: v)
  x = jnp.maximum(jnp.asarray(x_absmax, jnp.float32), _EPS)
  w = jnp.maximum(jnp.asarray(w_absmax, jnp.float32), _EPS)
  return keep(x ** alpha) / keep(w ** (1.0 - alpha))


def fake_quantize_weight(w: jax.Array, fmt: str) -> jax.Array:
  """[K, N] -> [K, N]: the value the stored weight represents after quantization."""
  return formats.dequantize(formats.quantize_weight(w.T, fmt), fmt).T


class Candidate(NamedTuple):
  """One decomposition of a smoothed weight and its output error on calibration tokens."""

  error: jax.Array     # f32 scalar, sum of squared output errors
  down: jax.Array      # f32 [K, r], values rounded to LOWRANK_DTYPE
  up: jax.Array        # f32 [r, N], values rounded to LOWRANK_DTYPE
  residual: jax.Array  # f32 [K, N], the quantized residual, dequantized


@functools.partial(jax.jit, compiler_options=QUANTIZE_COMPILER_OPTIONS,
                   static_argnames=("rank", "weight_format", "act_format", "oversample",
                                    "power_iters"))
def evaluate(w_hat, x, lam, y_ref, q_prev, key, *, rank, weight_format, act_format,
             oversample=16, power_iters=4) -> Candidate:
  """L = SVD_r(W_hat - Q_prev), R = quant(W_hat - L), and the output error they give.

  Args:
    w_hat: f32 [K, N] smoothed weight. x: f32 [S, K] calibration inputs; lam: f32 [K]
      smoothing factors or None.
    y_ref: f32 [S, N] reference outputs X W. q_prev: f32 [K, N] previous quantized residual.
    key: PRNG key of the randomized SVD.
  """
  k, n = w_hat.shape
  if rank:
    down, up = truncated_svd(w_hat - q_prev, rank, key, oversample=oversample,
                             power_iters=power_iters)
    down = down.astype(LOWRANK_DTYPE).astype(jnp.float32)
    up = up.astype(LOWRANK_DTYPE).astype(jnp.float32)
    residual = fake_quantize_weight(w_hat - matmul_f32(down, up), weight_format)
  else:
    down, up = jnp.zeros((k, 0), jnp.float32), jnp.zeros((0, n), jnp.float32)
    residual = fake_quantize_weight(w_hat, weight_format)
  return Candidate(output_error(x, lam, y_ref, residual, down, up, act_format), down, up,
                   residual)


def output_error(x, lam, y_ref, residual, down, up, act_format) -> jax.Array:
  """f32 sum of squared errors of Q(x_hat) R + (x_hat L_down) L_up against y_ref [S, N],
  x_hat = x / lam (lam None: x), in the stored layer's arithmetic (``qlinear``)."""
  x_hat = x if lam is None else smoothed(x, lam)
  xq = x_hat if act_format is None else formats.fake_quantize(x_hat, act_format)
  y = matmul_f32(xq, residual) + lowrank_up(lowrank_down(x, down, lam), up)
  return jnp.sum(jnp.square(y - y_ref))


@functools.partial(jax.jit, compiler_options=QUANTIZE_COMPILER_OPTIONS,
                   static_argnames=("rank", "weight_format", "act_format", "oversample",
                                    "power_iters"))
def alpha_errors(w, x, y_ref, x_absmax, alphas, key, **static) -> jax.Array:
  """f32 [len(alphas)]: output error of a single decomposition at each alpha."""
  w_absmax = jnp.max(jnp.abs(w), axis=1)
  zeros = jnp.zeros_like(w)

  def one(alpha):
    lam = smooth_factors(x_absmax, w_absmax, alpha)
    return evaluate.__wrapped__(lam[:, None] * w, x, lam, y_ref, zeros, key, **static).error

  return jax.lax.map(one, alphas)


class LayerReport(NamedTuple):
  """What the transform chose for one group of layers."""

  alpha: float | None
  iterations: int
  error: float  # relative output error ||Y - Y_hat|| / ||Y|| on calibration tokens


# Everything quantize_group computes outside ``evaluate`` runs in a few jitted functions: run
# op by op, each of ~80 small operations compiled once per weight shape (CPU: 86 compilations
# per new shape, now 19). On the GPU most of a new shape's ~20 s was XLA's GEMM autotuning,
# which QUANTIZE_COMPILER_OPTIONS turns off (2026-12-03; docs/benchmarks/README.md).
@functools.partial(jax.jit, compiler_options=QUANTIZE_COMPILER_OPTIONS)
def _reference_outputs(x, w):
  """f32 [S, N] = x [S, K] @ w [K, N]."""
  return matmul_f32(x, w)


@functools.partial(jax.jit, compiler_options=QUANTIZE_COMPILER_OPTIONS)
def _smoothed_weight(w, x_absmax, alpha):
  """(lambda f32 [K], lambda[:, None] * w f32 [K, N]) at smoothing strength alpha, lambda as
  ``smooth_factors`` gives it op by op (``apart``)."""
  lam = smooth_factors(x_absmax, jnp.max(jnp.abs(w), axis=1), alpha, apart=True)
  return lam, lam[:, None] * w


@functools.partial(jax.jit, compiler_options=QUANTIZE_COMPILER_OPTIONS)
def _smoothed_hessian(hessian, lam):
  """f32 [K, K] X_hat^T X_hat from the raw inputs' X^T X, x_hat = x / lambda."""
  return hessian * (1.0 / lam)[:, None] * (1.0 / lam)[None, :]


@functools.partial(jax.jit, compiler_options=QUANTIZE_COMPILER_OPTIONS)
def _residual(w_hat, down, up):
  """f32 [N, K]: what the 4-bit weight holds beside the branch, (W_hat - L_down L_up)^T
  (``down`` None: W_hat^T), stored K-major."""
  return (w_hat if down is None else w_hat - matmul_f32(down, up)).T


@functools.partial(jax.jit, compiler_options=QUANTIZE_COMPILER_OPTIONS,
                   static_argnames="fmt")
def _stored_residual(w_hat, down, up, *, fmt):
  """The ``QuantizedLinear`` weight fields of the ``_residual`` rounded to nearest."""
  residual = _residual.__wrapped__(w_hat, down, up)
  return stored_weight(formats.quantize_weight(residual, fmt), fmt)


@functools.partial(jax.jit, compiler_options=QUANTIZE_COMPILER_OPTIONS,
                   static_argnames=("weight_format", "act_format"))
def _quantized_error(x, lam, y_ref, q, down, up, *, weight_format, act_format):
  """(``output_error`` of a quantized residual q, its dequantized f32 [K, N])."""
  deq = formats.dequantize(q, weight_format).T
  return output_error(x, lam, y_ref, deq, down, up, act_format), deq


@functools.partial(jax.jit, compiler_options=QUANTIZE_COMPILER_OPTIONS)
def _relative_error(error, y_ref):
  """f32 sqrt(error / ||y_ref||^2)."""
  return jnp.sqrt(error / jnp.maximum(jnp.sum(jnp.square(y_ref)), 1e-30))


def quantize_group(weights: list[jax.Array], method: Method, rank: int, alpha: float | None,
                   config: QuantConfig, key: jax.Array, x_absmax=None, samples=None,
                   name: str = "layer", hessian=None
                   ) -> tuple[list[QuantizedLinear], LayerReport]:
  """Quantizes layers that share one input.

  Args:
    weights: kernels [K, N_i] (any float dtype), concatenated along N internally.
    method: what to do (formats, smoothing, low-rank).
    rank: low-rank branch rank (ignored unless method.lowrank).
    alpha: fixed smoothing strength, or None to search ``config.alpha_grid``.
    x_absmax: f32 [K] per-channel absmax of the input over calibration tokens.
    samples: f32 [S, K] calibration input tokens (needed when method.needs_calibration).
    name: the layer(s), for error messages.
    hessian: f32 [K, K] X^T X of the raw inputs over all calibration tokens (needed when
      ``config.uses_gptq``; ``calibrate(..., hessian=True)``).

  Returns:
    One QuantizedLinear per weight (bias None) and a report.
  """
  w = jnp.concatenate([jnp.asarray(x, jnp.float32) for x in weights], axis=1)
  if not bool(jnp.isfinite(w).all()):  # codes and scales would hide them, or spread them
    raise ValueError(f"{name}: kernel holds NaN or Inf")
  rank = rank if method.lowrank else 0
  static = dict(rank=rank, weight_format=method.weight_format, act_format=method.act_format,
                oversample=config.svd_oversample, power_iters=config.svd_power_iters)
  lam = None
  best_alpha = None
  iterations = 0
  rel_error = float("nan")
  if method.needs_calibration:
    x = jnp.asarray(samples, jnp.float32)
    y_ref = _reference_outputs(x, w)
    if method.smooth:
      x_absmax = jnp.asarray(x_absmax, jnp.float32)
      if alpha is not None:
        best_alpha = float(alpha)
      elif config.alpha_grid == 1:  # nothing to search: the grid's only point
        best_alpha = 0.0
      else:
        # jnp, not numpy: XLA's k * (1 / n) is the grid's definition (3 of 20 points differ
        # by an ulp from numpy's k / n, and that moves the chosen models)
        grid = jnp.arange(config.alpha_grid, dtype=jnp.float32) / config.alpha_grid
        errs = alpha_errors(w, x, y_ref, x_absmax, grid, key, **static)
        best_alpha = float(grid[int(jnp.argmin(errs))])
      lam, w_hat = _smoothed_weight(w, x_absmax, best_alpha)
    else:
      w_hat = w
    h_hat = None
    if config.uses_gptq:  # (QuantConfig allows it with calibrated methods only)
      if hessian is None:
        raise ValueError(f"{name}: residual={config.residual!r} needs the inputs' Hessian: "
                         "calibrate with svdq_jax.calibrate(..., hessian=True)")
      h_hat = jnp.asarray(hessian, jnp.float32)
      if lam is not None:
        h_hat = _smoothed_hessian(h_hat, lam)

    def with_gptq(cand: Candidate) -> tuple[Candidate, formats.Quantized]:
      """The candidate's branch with its residual quantized by GPTQ instead."""
      q = gptq.quantize_weight(_residual(w_hat, cand.down if rank else None, cand.up),
                               h_hat, method.weight_format, damp=config.gptq_damp, name=name)
      error, deq = _quantized_error(x, lam, y_ref, q, cand.down, cand.up,
                                    weight_format=method.weight_format,
                                    act_format=method.act_format)
      return cand._replace(error=error, residual=deq), q

    best, best_qt, q_prev, stale = None, None, jnp.zeros_like(w_hat), 0
    for iterations in range(1, (config.lowrank_iters if rank else 1) + 1):
      cand = evaluate(w_hat, x, lam, y_ref, q_prev, key, **static)
      qt = None
      if config.residual == "gptq_loop":
        cand, qt = with_gptq(cand)
      if best is None or float(cand.error) < float(best.error):
        best, best_qt, stale = cand, qt, 0
      else:
        stale += 1
        if stale >= config.lowrank_patience:
          break
      q_prev = cand.residual
    if config.residual == "gptq":
      best, best_qt = with_gptq(best)
    down, up = best.down, best.up
    if best_qt is None:  # residual='rtn'
      stored = _stored_residual(w_hat, down if rank else None, up, fmt=method.weight_format)
    else:
      stored = stored_weight(best_qt, method.weight_format)
    rel_error = float(_relative_error(best.error, y_ref))
  else:  # data-free: plain round-to-nearest of the weight (rank is 0 here)
    stored = _stored_residual(w, None, None, fmt=method.weight_format)
  layers, start = [], 0
  for part in weights:
    stop = start + part.shape[1]
    layers.append(QuantizedLinear(
        **{f: None if v is None else v[start:stop] for f, v in stored.items()},
        smooth=lam,
        lora_down=down.astype(LOWRANK_DTYPE) if rank else None,
        lora_up=up[:, start:stop].astype(LOWRANK_DTYPE) if rank else None,
        weight_format=method.weight_format,
        act_format=method.act_format))
    start = stop
  return layers, LayerReport(best_alpha, iterations, rel_error)
