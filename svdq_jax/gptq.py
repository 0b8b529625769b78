"""GPTQ: quantize a weight with error feedback through the inverse Hessian of its inputs.

Round-to-nearest quantizes each weight on its own. GPTQ (Frantar et al., 2022) walks the
input channels k = 0..K-1 in order, quantizes column k of W [N, K] and pushes its rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
inputs H = X^T X [K, K], so the output error ||X (W - Q)^T|| on those inputs is what gets
minimized, not the weight error. Same format, same kernels: only which codes are chosen
changes.

Scales follow the format (``formats``), chosen when the walk enters a group, from the
already error-updated weights of that group, exactly as ``formats.quantize_weight`` would
choose them for that block: ``int4`` one bf16 scale per 64-group; ``nvfp4`` the per-row f32
channel scale fixed first (from the whole row), then one E4M3 scale per 16-group; ``int4_2l``
the per-row unit fixed first, then one multiplier per 64-group; ``int8`` the per-row scale
fixed first. With H = I there is no feedback and the result is ``formats.quantize_weight``'s,
bit for bit (tested).

The Hessian is damped, H + damp * mean(diag H) * I, and inputs that never fire in the
calibration data (diag 0) get a unit diagonal (they are rounded to nearest). A Hessian that
is still not positive definite (NaN or Inf in it, say) is an error naming the layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from svdq_jax import formats
from svdq_jax.config import QUANTIZE_COMPILER_OPTIONS
from svdq_jax.formats import matmul_f32


def hessian(x: jax.Array) -> jax.Array:
  """f32 [K, K] X^T X of the inputs x [S, K] (the layer's smoothed calibration tokens)."""
  x = jnp.asarray(x, jnp.float32)
  return matmul_f32(x.T, x)


def inverse_cholesky(h: jax.Array, damp: float) -> jax.Array:
  """Upper-triangular U with U^T U = (H + damp mean(diag H) I)^-1: f32 [K, K], NaN if H is
  not positive definite after damping."""
  k = h.shape[0]
  diag = jnp.diagonal(h)
  dead = diag <= 0
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
  h = h + damp * jnp.mean(jnp.where(dead, 1.0, diag)) * jnp.eye(k, dtype=h.dtype)
  lower = jnp.linalg.cholesky(h)
  h_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(k, dtype=h.dtype))
  return jnp.linalg.cholesky(h_inv).T


def _row_context(w: jax.Array, fmt: formats.Format) -> jax.Array:
  """The per-row scale a format fixes from the whole row before any group: f32 [N, 1]."""
  if fmt.two_level:
    return formats.two_level_unit(jnp.max(jnp.abs(w), axis=1, keepdims=True))
  if fmt.name == "nvfp4":
    return formats.nvfp4_channel_scale(w)
  if fmt.name == "int8":
    return formats.quantize(w, fmt).scale.astype(jnp.float32)
  return jnp.ones((w.shape[0], 1), jnp.float32)


def _group_scale(block: jax.Array, fmt: formats.Format, row: jax.Array) -> jax.Array:
  """The stored scale of one group [N, G] entered now (f32 [N]), as ``quantize_weight``."""
  if fmt.two_level:
    gmax = jnp.max(jnp.abs(block), axis=1, keepdims=True)
    return formats.two_level_codes(block, row, gmax)[0][:, 0]
  if fmt.name == "int8":
    return row[:, 0]
  ts = row if fmt.name == "nvfp4" else None
  qt = formats.quantize(block, fmt, scale_dtype=fmt.scale_dtype, tensor_scale=ts)
  return qt.scale[:, 0].astype(jnp.float32)


def _quantize_column(col: jax.Array, scale: jax.Array, fmt: formats.Format, row: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """(q f32 integers [N], value f32 [N]) of one column under its group's scale."""
  if fmt.two_level:
    step = row[:, 0] * scale
    q = jnp.clip(jnp.round(col * formats.reciprocal(step)), fmt.qmin, fmt.qmax)
    return q, q * step
  if fmt.name == "int8":
    q = jnp.clip(jnp.round(col * formats.reciprocal(scale)), fmt.qmin, fmt.qmax)
    return q, q * scale
  step = scale * row[:, 0]  # int4: row is 1
  y = col / jnp.where(step == 0, 1.0, step)
  if fmt.name == "nvfp4":
    q = jnp.sign(y) * formats.round_e2m1_units(jnp.abs(y))
  else:
    q = jnp.clip(jnp.round(y), fmt.qmin, fmt.qmax)
  return q, q * fmt.step * step


@functools.partial(jax.jit, compiler_options=QUANTIZE_COMPILER_OPTIONS,
                   static_argnames=("fmt", "block"))
def _gptq(w, u, *, fmt: str, block: int):
  fmt = formats.get_format(fmt)
  n, k = w.shape
  row = _row_context(w, fmt)
  # the walk takes one group at a time, entered at its start (int8: one row scale, `block`)
  sub = fmt.group_size or block
  cols = jnp.arange(k)

  def one_block(b, carry):
    w, q_all, scales = carry
    c0 = b * sub
    wb = jax.lax.dynamic_slice(w, (0, c0), (n, sub))
    ub = jax.lax.dynamic_slice(u, (c0, c0), (sub, sub))
    scale = _group_scale(wb, fmt, row)

    def one_column(j, carry):
      wb, qb, err = carry
      col = jax.lax.dynamic_index_in_dim(wb, j, axis=1, keepdims=False)
      q, value = _quantize_column(col, scale, fmt, row)
      e = (col - value) / ub[j, j]
      # feedback onto this block's later columns only
      later = jnp.where(jnp.arange(sub) > j, ub[j], 0.0)
      wb = wb - e[:, None] * later[None, :]
      qb = jax.lax.dynamic_update_index_in_dim(qb, q, j, axis=1)
      err = jax.lax.dynamic_update_index_in_dim(err, e, j, axis=1)
      return wb, qb, err

    zeros = jnp.zeros((n, sub), jnp.float32)
    wb, qb, err = jax.lax.fori_loop(0, sub, one_column, (wb, zeros, zeros))
    # then onto every later column at once (U is upper triangular: earlier ones get 0)
    rows_u = jax.lax.dynamic_slice(u, (c0, 0), (sub, k))
    rows_u = jnp.where(cols[None, :] >= c0 + sub, rows_u, 0.0)
    w = w - matmul_f32(err, rows_u)
    w = jax.lax.dynamic_update_slice(w, wb, (0, c0))
    q_all = jax.lax.dynamic_update_slice(q_all, qb, (0, c0))
    if fmt.group_size:
      scales = jax.lax.dynamic_update_index_in_dim(scales, scale, b, axis=1)
    return w, q_all, scales

  q_all = jnp.zeros((n, k), jnp.float32)
  scales = jnp.zeros((n, fmt.groups(k)), jnp.float32)
  _, q_all, scales = jax.lax.fori_loop(0, k // sub, one_block, (w, q_all, scales))
  if not fmt.group_size:
    scales = row
  return q_all, scales, row


def quantize_weight(w: jax.Array, h: jax.Array, fmt: str | formats.Format, *,
                    damp: float = 0.01, name: str = "layer") -> formats.Quantized:
  """GPTQ version of ``formats.quantize_weight``.

  Args:
    w: [N, K] weight (stored layout: K-major), any float dtype. h: f32 [K, K] Hessian of the
      inputs (``hessian``). fmt: a weight format. damp: relative diagonal damping.
    name: the layer, for error messages.

  Returns:
    ``formats.Quantized`` as ``formats.quantize_weight`` lays it out (codes int8 [N, K],
    scales in the format's scale dtype, tensor_scale).
  """
  fmt = formats.get_format(fmt)
  w = jnp.asarray(w, jnp.float32)
  n, k = w.shape
  if h.shape != (k, k):
    raise ValueError(f"{name}: Hessian must be [K, K] = [{k}, {k}], got {h.shape}")
  if fmt.group_size and k % fmt.group_size:
    raise ValueError(f"{name}: K={k} is not a multiple of {fmt.name}'s group of "
                     f"{fmt.group_size}")
  u = inverse_cholesky(jnp.asarray(h, jnp.float32), damp)
  if not bool(jnp.isfinite(u).all()):
    raise ValueError(f"{name}: the inputs' Hessian is not positive definite even with "
                     f"damping {damp} (NaN/Inf in the calibration inputs, or raise damp)")
  block = 64 if k % 64 == 0 else k
  q, scales, row = _gptq(w, u, fmt=fmt.name, block=block)
  q = q.astype(jnp.int8)
  if fmt.two_level:
    return formats.Quantized(q, scales, row)
  if fmt.name == "int8":
    return formats.Quantized(q, scales.astype(fmt.scale_dtype), jnp.float32(1.0))
  ts = row if fmt.name == "nvfp4" else jnp.float32(1.0)
  return formats.Quantized(q, scales.astype(fmt.scale_dtype), ts)
