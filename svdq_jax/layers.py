"""The one linear dispatch: a float kernel or a QuantizedLinear, same call.

Models call ``dense`` (or use ``Linear``) for every linear layer, so a parameter tree
returned by ``svdq_jax.quantize`` runs in the same model code, jitted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from svdq_jax.qlinear import Gelu, PreparedLinear, QuantizedLinear, Scaled, apply, join

__all__ = ["Gelu", "Linear", "Scaled", "dense", "lookup"]


def dense(x, kernel, bias: jax.Array | None = None, gelu_from: int | None = None):
  """x [..., K] -> [..., N] with kernel either f [K, N] or a QuantizedLinear (or its
  ``PreparedLinear``).

  x may be given as parts (``Gelu``: e.g. ``(attn, Gelu(h))`` for
  ``concatenate([attn, gelu(h)], -1)``; ``Scaled``: an FP8 array and its scale), which a
  quantized kernel on the Hopper path reads where they lie; float kernels join them first.
  Float kernels compute in the promoted dtype of x and kernel; quantized ones return x's
  dtype (bf16 for a Scaled first part). ``gelu_from``: the output's columns from
  there on feed a GELU, and the output is returned as ``Gelu(y, gelu_from)`` to be given to
  the next layer (a quantized layer on the Hopper path computes the GELU in its GEMM's
  epilogue: ``qlinear.apply``); columns before it are y's as they are.
  """
  if isinstance(kernel, (QuantizedLinear, PreparedLinear)):
    return apply(kernel, x, bias, gelu_from)
  y = jnp.matmul(join(x), kernel)
  y = y if bias is None else y + bias
  return y if gelu_from is None else Gelu(y, gelu_from)


def lookup(table: nnx.Embed, ids: jax.Array) -> jax.Array:
  """int ids [...] -> the table's rows [..., features] in the table's own dtype. (Calling
  ``nnx.Embed`` casts to the dtype the module was built with, f32 by default, whatever the
  restored weights are: a bf16 checkpoint would run its whole tower on f32 activations.)"""
  return jnp.take(table.embedding[...], ids, axis=0)


class Linear(nnx.Linear):
  """``nnx.Linear`` whose kernel may be replaced by a QuantizedLinear."""

  def __call__(self, x, gelu_from: int | None = None):
    """x: [..., K], or its parts; ``gelu_from``: see ``dense``."""
    bias = None if self.bias is None else self.bias.get_value()
    return dense(x, self.kernel.get_value(), bias, gelu_from)
