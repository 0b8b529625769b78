"""The one linear dispatch: a float kernel or a QuantizedLinear, same call.

Models call ``dense`` (or use ``Linear``) for every linear layer, so a parameter tree
returned by ``svdq_jax.quantize`` runs in the same model code, jitted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from svdq_jax.qlinear import Gelu, PreparedLinear, QuantizedLinear, apply, join

__all__ = ["Gelu", "Linear", "dense", "lookup"]


def dense(x, kernel, bias: jax.Array | None = None) -> jax.Array:
  """x [..., K] -> [..., N] with kernel either f [K, N] or a QuantizedLinear (or its
  ``PreparedLinear``).

  x may be given as parts (``Gelu``: e.g. ``(attn, Gelu(h))`` for
  ``concatenate([attn, gelu(h)], -1)``), which a quantized kernel on the Hopper path reads
  where they lie; float kernels join them first. Float kernels compute in the promoted dtype
  of x and kernel; quantized ones return x's dtype.
  """
  if isinstance(kernel, (QuantizedLinear, PreparedLinear)):
    return apply(kernel, x, bias)
  y = jnp.matmul(join(x), kernel)
  return y if bias is None else y + bias


def lookup(table: nnx.Embed, ids: jax.Array) -> jax.Array:
  """int ids [...] -> the table's rows [..., features] in the table's own dtype. (Calling
  ``nnx.Embed`` casts to the dtype the module was built with, f32 by default, whatever the
  restored weights are: a bf16 checkpoint would run its whole tower on f32 activations.)"""
  return jnp.take(table.embedding[...], ids, axis=0)


class Linear(nnx.Linear):
  """``nnx.Linear`` whose kernel may be replaced by a QuantizedLinear."""

  def __call__(self, x) -> jax.Array:
    """x: [..., K], or its parts (``dense``)."""
    bias = None if self.bias is None else self.bias.get_value()
    return dense(x, self.kernel.get_value(), bias)
