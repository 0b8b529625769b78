"""Truncated SVD for the low-rank branch.

Only the top ``rank`` (32 by default) singular triplets of a [K, N] weight are needed, so a
randomized range finder with power iterations (Halko, Martinsson & Tropp 2011) replaces a
full SVD: a few thin matmuls and one small SVD instead of O(K N min(K, N)) work. Accurate
to f32 rounding on matrices whose spectrum decays past the rank; the refinement loop in
``transforms`` re-runs it every iteration anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from svdq_jax.formats import matmul_f32



def truncated_svd(a: jax.Array, rank: int, key: jax.Array, *, oversample: int = 16,
                  power_iters: int = 4) -> tuple[jax.Array, jax.Array]:
  """Best rank-``rank`` factorization of ``a`` [K, N] (f32).

  Returns:
    (down [K, rank], up [rank, N]) with ``down = U_r S_r`` and ``up = V_r^T``, so that
    ``down @ up`` approximates ``a`` and ``up`` has orthonormal rows.
  """
  a = a.astype(jnp.float32)
  k, n = a.shape
  width = min(rank + oversample, k, n)
  if width == min(k, n):  # the sketch would be as large as the matrix: solve exactly
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
  else:
    omega = jax.random.normal(key, (n, width), jnp.float32)
    q, _ = jnp.linalg.qr(matmul_f32(a, omega))
    for _ in range(power_iters):
      z, _ = jnp.linalg.qr(matmul_f32(a.T, q))
      q, _ = jnp.linalg.qr(matmul_f32(a, z))
    ub, s, vt = jnp.linalg.svd(matmul_f32(q.T, a), full_matrices=False)
    u = matmul_f32(q, ub)
  return u[:, :rank] * s[:rank], vt[:rank]
