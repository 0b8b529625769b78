"""The one linear dispatch: a float kernel or a QuantizedLinear, same call.

Models call ``dense`` (or use ``Linear``) for every linear layer, so a parameter tree
returned by ``svdq_jax.quantize`` runs in the same model code, jitted. Models written with
Flax's own linears run unchanged too: ``svdq_jax.quantize`` on an NNX module turns its
quantized ``nnx.Linear``s into ``Linear``s (``runnable``), and a Linen model's ``nn.Dense``
layers run their quantized kernels inside ``quantized_dense()``.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from svdq_jax.qlinear import (Gelu, PreparedLinear, QuantizedLinear, Scaled, apply,
                              check_residual, join, residual_sum)

__all__ = ["Gelu", "Linear", "Scaled", "dense", "lookup", "quantized_dense", "runnable",
           "runs_quantized", "dense_input"]


def dense(x, kernel, bias: jax.Array | None = None, gelu_from: int | None = None,
          feeds=None, residual: tuple[jax.Array, jax.Array] | None = None):
  """x [..., K] -> [..., N] with kernel either f [K, N] or a QuantizedLinear (or its
  ``PreparedLinear``).

  x may be given as parts (``Gelu``: e.g. ``(attn, Gelu(h))`` for
  ``concatenate([attn, gelu(h)], -1)``; ``Scaled``: an FP8 array and its scale), which a
  quantized kernel on the Hopper path reads where they lie; float kernels join them first.
  Float kernels compute in the promoted dtype of x and kernel; quantized ones return x's
  dtype (bf16 for a Scaled first part). ``gelu_from``: the output's columns from
  there on feed a GELU, and the output is returned as ``Gelu(y, gelu_from)`` to be given to
  the next layer (a quantized layer on the Hopper path computes the GELU in its GEMM's
  epilogue: ``qlinear.apply``); columns before it are y's as they are. ``feeds``: the
  kernel of the layer whose input ends with those GELU columns (``qlinear.apply``).
  ``residual``: (r, gate), r of the output's shape: returns ``r + gate * y``
  (``qlinear.residual_sum``; a quantized layer on Hopper sums it in its GEMM's epilogue), as
  FLUX's blocks end their branches.
  """
  if _is_quantized(kernel):
    return apply(kernel, x, bias, gelu_from, feeds, residual)
  y = jnp.matmul(join(x), kernel)
  y = y if bias is None else y + bias
  if residual is None:
    return y if gelu_from is None else Gelu(y, gelu_from)
  check_residual(residual, y.shape, gelu_from)
  return residual_sum(*residual, y)


def lookup(table: nnx.Embed, ids: jax.Array) -> jax.Array:
  """int ids [...] -> the table's rows [..., features] in the table's own dtype. (Calling
  ``nnx.Embed`` casts to the dtype the module was built with, f32 by default, whatever the
  restored weights are: a bf16 checkpoint would run its whole tower on f32 activations.)"""
  return jnp.take(table.embedding[...], ids, axis=0)


class Linear(nnx.Linear):
  """``nnx.Linear`` whose kernel may be replaced by a QuantizedLinear."""

  def __call__(self, x, gelu_from: int | None = None, feeds: nnx.Linear | None = None,
               residual: tuple[jax.Array, jax.Array] | None = None):
    """x: [..., K], or its parts; ``gelu_from``: see ``dense``; ``feeds``: the linear layer
    whose input ends with the GELU columns (``dense``); ``residual``: (r, gate), returns
    r + gate * y (``dense``)."""
    bias = None if self.bias is None else self.bias.get_value()
    fed = None if feeds is None else feeds.kernel.get_value()
    return dense(x, self.kernel.get_value(), bias, gelu_from, fed, residual)


def _is_quantized(kernel) -> bool:
  return isinstance(kernel, (QuantizedLinear, PreparedLinear))


def runs_quantized(module) -> bool:
  """Whether a module holding a kernel can run a quantized one: not one of Flax's own
  classes (nnx.LinearGeneral, nnx.Conv, nn.DenseGeneral, ...: their calls read the kernel as
  an array), unless nnx.Linear or nn.Dense (which ``runnable`` / ``quantized_dense`` run)."""
  return (not type(module).__module__.startswith("flax.")
          or isinstance(module, (nnx.Linear, nn.Dense)))


def unrunnable_error(path: str, module) -> ValueError:
  """The error for a quantized kernel in a Flax module that cannot run it."""
  return ValueError(
      f"layer {path or '(root)'} is a Flax {type(module).__name__}, which cannot run a "
      f"quantized kernel (only nnx.Linear / nn.Dense can): leave it out with "
      f"Rule({path!r}, 'skip'), or have the model call svdq_jax.layers.dense for it")


def runnable(model: nnx.Module) -> nnx.Module:
  """``model`` with every ``nnx.Linear`` whose kernel is a QuantizedLinear turned into a
  ``Linear`` (its subclass that runs one; same fields), in place; returns it.
  ``svdq_jax.quantize`` does this to the module it returns.

  Raises ValueError for any other Flax module (nnx.LinearGeneral, nnx.Conv, ...) holding a
  quantized kernel."""
  for path, node in nnx.iter_graph(model):
    kernel = getattr(node, "kernel", None)
    if not (isinstance(node, nnx.Module) and isinstance(kernel, nnx.Variable)
            and _is_quantized(kernel.get_value())):
      continue
    if not runs_quantized(node):
      raise unrunnable_error("/".join(str(p) for p in path), node)
    if type(node) is nnx.Linear:
      node.__class__ = Linear   # a subclass adding no fields: only its __call__ differs
  return model


def dense_input(path: str, args: tuple, kwargs: dict):
  """The input of an ``nn.Dense`` call seen by a Linen interceptor: its one argument, by
  position or by name (``inputs``)."""
  if len(args) + len(kwargs) != 1 or (kwargs and "inputs" not in kwargs):
    raise TypeError(f"layer {path}: nn.Dense takes one input, got {len(args)} positional "
                    f"and {sorted(kwargs)} keyword arguments")
  return args[0] if args else kwargs["inputs"]


def _dense_interceptor(next_fun, args, kwargs, context):
  """``quantized_dense``'s interceptor: an ``nn.Dense`` whose 'kernel' parameter is a
  QuantizedLinear runs it through ``dense``; everything else runs as it is."""
  module = context.module
  if (context.method_name != "__call__" or not module.has_variable("params", "kernel")
      or not _is_quantized(module.get_variable("params", "kernel"))):
    return next_fun(*args, **kwargs)
  path = "/".join(module.path)
  if not runs_quantized(module):
    raise unrunnable_error(path, module)
  if type(module) is not nn.Dense:   # the model's own module, which runs its kernel itself
    return next_fun(*args, **kwargs)
  x = dense_input(path, args, kwargs)
  if module.dtype is not None:   # nn.Dense computes in its dtype
    x = jnp.asarray(x, module.dtype)
  bias = module.get_variable("params", "bias") if module.use_bias else None
  return dense(x, module.get_variable("params", "kernel"), bias)


@contextlib.contextmanager
def quantized_dense():
  """Within it, Flax Linen ``nn.Dense`` layers whose 'kernel' parameter is a QuantizedLinear
  (``svdq_jax.quantize`` on Linen params) run it, the model's code unchanged::

      qparams = svdq_jax.quantize(params, calib, config)
      with svdq_jax.layers.quantized_dense():
        y = model.apply(qparams, x)

  It acts where the model is traced: under ``jax.jit``, enter it inside the jitted function.
  x [..., K] -> [..., N] in x's dtype (``nn.Dense``'s ``dtype`` if set), as ``dense``; the
  dense's ``precision`` and ``dot_general`` do not apply to a quantized kernel. Other Linen
  modules holding a quantized kernel (nn.DenseGeneral, nn.Conv, ...) raise ValueError."""
  with nn.intercept_methods(_dense_interceptor):
    yield
