"""Sequence (token) parallelism for quantized linears over a device mesh.

Under ``with tokens_over(mesh):`` (read when a function is traced, like
``qlinear.backend``), ``qlinear.apply`` runs each quantized layer inside ``jax.shard_map``
with its tokens split over every axis of ``mesh`` and the layer replicated: each device runs
the kernels on its own tokens. Everything else (float linears, attention, norms) is left to
XLA's SPMD partitioner, which follows the token sharding of the inputs and gathers keys and
values for attention. A linear is token-wise, so the split changes no result.

Without this, XLA cannot partition a Pallas kernel (an opaque custom call) and would run every
quantized layer on all tokens on every device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P

_mesh: jax.sharding.Mesh | None = None


@contextlib.contextmanager
def tokens_over(mesh: jax.sharding.Mesh):
  """Quantized layers traced inside split their tokens over ``mesh`` (all its axes)."""
  global _mesh
  previous, _mesh = _mesh, mesh
  try:
    yield
  finally:
    _mesh = previous


def token_mesh() -> jax.sharding.Mesh | None:
  """The mesh set by ``tokens_over``, or None."""
  return _mesh


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Every device of ``mesh`` holds the whole array: how data- and sequence-parallel
  sampling place the weights (``load_flux(path, device=replicated(mesh))`` restores them so
  straight from a checkpoint)."""
  return jax.sharding.NamedSharding(mesh, P())


def split_tokens(fn: Callable, layer, x: jax.Array, bias) -> jax.Array | None:
  """``fn(layer, x2, bias)`` on x [..., K] flattened to tokens x2 [M, K], the tokens split over
  the current mesh, the layer and bias replicated: [..., N]. None when no mesh is set or M
  does not divide evenly (the caller then runs ``fn`` whole)."""
  mesh = _mesh
  x2 = x.reshape(-1, x.shape[-1])
  if mesh is None or x2.shape[0] % mesh.devices.size:
    return None
  tokens = P(mesh.axis_names, None)
  y = jax.shard_map(fn, mesh=mesh, in_specs=(P(), tokens, P()), out_specs=tokens,
                    check_vma=False)(layer, x2, bias)
  return y.reshape(*x.shape[:-1], y.shape[-1])
