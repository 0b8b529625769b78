"""The quantized linear layer: one pytree, and its pure-jnp reference ``apply``.

``apply`` defines the numerics the Pallas kernels reproduce: activations are smoothed
(times the f32 reciprocal of lambda, ``smoothed``) in f32, quantized per token and per K-group, multiplied with the
quantized weight as exact integer products per group, and each group's int32 partial sum
is scaled by both group scales and accumulated in f32 in K order. The low-rank branch
(x / lambda) L_down L_up runs as x (L_down / lambda) L_up, the smoothing folded into the down
projection (``lowrank_down``), with bf16 operands and f32 accumulation (the tensor-core
precision the kernels use); the bias is added last, in f32. Weight-only layers (W4A16)
dequantize the weight to the input's dtype and multiply with f32 accumulation.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from flax import struct

from svdq_jax import formats
from svdq_jax.formats import matmul_f32


def round_bf16_bits(v: jax.Array) -> jax.Array:
  """f32 ``v`` rounded to the nearest bf16 (ties to even), as f32: the values of
  ``v.astype(bfloat16).astype(float32)`` for every non-NaN v, computed with integer
  operations on the bits. A NaN may come out as any value (the GPU's canonical NaN as -0):
  callers keep NaN elsewhere.

  Why: in a Mosaic GPU kernel the cast pair lets LLVM shrink a rounded f32 product and sum
  into bf16 operations and contract them into one fma.rn.bf16 (one rounding where the
  definition has two); integer operations are opaque to that."""
  bits = lax.bitcast_convert_type(v, jnp.int32)
  bits = bits + 0x7FFF + (lax.shift_right_logical(bits, 16) & 1)   # two's complement wraps
  return lax.bitcast_convert_type(bits & -0x10000, jnp.float32)


def gelu_tanh(x: jax.Array, tanh=jnp.tanh, round_bits: bool = False) -> jax.Array:
  """``jax.nn.gelu(x, approximate=True)`` in x's dtype, each operation rounded to that dtype
  as jnp's is (the same bits for every bf16 value on the CPU), written out in f32 operations
  so that the activation kernels compute the same ones (``Gelu``). (f32 inputs: the same
  formula, but XLA may contract its products and sums differently.) ``tanh``: the f32 tanh
  (the kernels pass the hardware's approximate one: its input and its rounded output are bf16
  values, so one check of all 65536 inputs shows it exact, scripts/bench_rowscaled.py
  --parts). ``round_bits`` (bf16 x only): the one product that a sum adds is rounded by
  ``round_bf16_bits``, the same values, so that no compiler contracts the two into an fma
  (the Mosaic GPU GEMM epilogue did, in 0.22% of elements; one integer rounding there was
  enough and all six cost 6x more, H200 2026-12-03). A NaN x makes that product NaN, and the
  sum keeps the NaN whatever its rounding gives."""
  dt = x.dtype
  if round_bits and dt != jnp.bfloat16:
    raise ValueError(f"gelu_tanh(round_bits=True) rounds to bf16; x is {dt}")
  r = lambda v: v.astype(dt).astype(jnp.float32)   # one operation in dt
  c = lambda v: jnp.asarray(v, dt).astype(jnp.float32)
  xf = x.astype(jnp.float32)
  cubic = (round_bf16_bits if round_bits else r)(c(0.044715) * r(r(xf * xf) * xf))
  inner = r(xf + cubic)
  cdf = r(c(0.5) * r(1.0 + r(tanh(r(c(np.sqrt(2 / np.pi)) * inner)))))
  return (xf * cdf).astype(dt)


def residual_sum(r: jax.Array, gate: jax.Array, y: jax.Array) -> jax.Array:
  """``r + gate * y``, a gated residual (FLUX's ``x + gate * out``): r [..., N], gate
  broadcastable to it, y [..., N] (the layer's output), computed as jnp computes the
  expression, so that a quantized layer's path without the kernel gives exactly the float
  model's values (XLA included: where it fuses the sum into a consumer it may skip roundings,
  its excess precision, on both alike). Its semantics op by op, for bf16: the product
  rounded to bf16, then the sum (what jnp gives on the CPU for the sum alone, bit for bit),
  which the W4A8 GEMM's epilogue computes (``w4a8_hopper``: the product rounded by integer
  operations, so no compiler contracts it into the sum)."""
  return r + gate * y


@struct.dataclass
class Gelu:
  """Part of a linear layer's input: ``jax.nn.gelu(x[..., start:], approximate=True)``, left
  to the layer (the kernels compute it as ``gelu_tanh``, the same bits for bf16).

  ``apply`` (and ``layers.dense``) take an input given as parts, a tuple of arrays and Gelu
  parts meaning their concatenation along the last axis (``join``), or a single Gelu. The
  Hopper activation kernel reads each part where it lies and computes the GELU while it
  quantizes, where the joined bf16 input would be written and read once more (FLUX's single
  blocks: [4608, 15360] per block); every other path joins the parts first. ``start`` lets a
  part be the tail of a wider array (the MLP half of FLUX's fused linear1 output) without a
  sliced copy.

  ``applied``: the columns from ``start`` on already hold the GELU's values (a layer given
  ``gelu_from`` returns its output so when a kernel computed the GELU in its epilogue, and
  as a plain Gelu part otherwise: ``apply``).

  ``row_max``: f32 [(K_part) / 64, M] or None, with ``applied``: per 64 columns, each token's
  max |value / lambda| for the layer that the part feeds (its last columns), which the GEMM
  that wrote x computed in its epilogue (``apply(..., feeds=)``), so that that layer's
  activation kernel skips its pass over the part for the token scales. Valid for that layer
  only; every other path ignores it.

  ``head``: [..., H] or None: the layer output's columns before the GELU ones, where a kernel
  wrote them as an array of their own (``w4a4.set_split_gelu``); x then holds the GELU
  columns only (start 0). Not part of the input the Gelu stands for; ``before_gelu`` reads
  the columns before the GELU ones either way.
  """

  x: jax.Array
  start: int = struct.field(pytree_node=False, default=0)
  applied: bool = struct.field(pytree_node=False, default=False)
  row_max: jax.Array | None = None
  head: jax.Array | None = None

  @property
  def before_gelu(self) -> jax.Array:
    """An array whose first columns are the layer output's before the GELU ones: ``head``, or
    x itself ([..., start:] its GELU columns; not sliced, which would copy it)."""
    return self.x if self.head is None else self.head


@struct.dataclass
class Scaled:
  """Part of a linear layer's input: ``(x.astype(float32) * scale).astype(bfloat16)``, an FP8
  array and its f32 scale (a scalar) left to the layer.

  FLUX's single blocks give linear2 cuDNN FP8 attention's E4M3 output so: the Hopper
  activation kernel reads it at one byte an element and descales it while it quantizes,
  where the bf16 output would be written and read once more ([4608, 3072] per block);
  every other path joins the parts first (``join``), the same values.
  """

  x: jax.Array
  scale: jax.Array


class Part(NamedTuple):
  """One part of a layer input (``input_parts``): the columns ``start``.. of ``x``, times
  ``scale`` and rounded to bf16 (an f32 scalar; None: as they are), then through the GELU if
  ``gelu`` (``part_values``); ``row_max``: a Gelu part's (``Gelu``)."""
  x: jax.Array
  start: int
  gelu: bool
  scale: jax.Array | None
  row_max: jax.Array | None = None


PARTS = (tuple, Gelu, Scaled)   # a layer input given as parts, not an array


def input_parts(x) -> tuple[Part, ...]:
  """A layer input (an array, a Gelu or a Scaled part, or a tuple of them) as ``Part`` tuples."""
  parts = x if isinstance(x, tuple) else (x,)
  out = tuple(Part(p.x, p.start, not p.applied, None, p.row_max) if isinstance(p, Gelu)
              else Part(p.x, 0, False, p.scale) if isinstance(p, Scaled)
              else Part(p, 0, False, None) for p in parts)
  if not out or any(not hasattr(p.x, "shape") or p.x.ndim < 1 for p in out):
    raise ValueError("a linear layer's input must be an array, a Gelu or Scaled part or a "
                     f"tuple of them, got {x!r:.200}")
  if any(not 0 <= p.start < p.x.shape[-1] for p in out):
    raise ValueError("a Gelu part's start must be a column of its array, got start "
                     f"{[p.start for p in out]} for widths {[p.x.shape[-1] for p in out]}")
  if len({p.x.shape[:-1] for p in out}) > 1:
    raise ValueError("the parts of a linear layer's input must share their leading "
                     f"dimensions, got {[p.x.shape for p in out]}")
  if any(p.scale is not None and jnp.shape(p.scale) != () for p in out):
    raise ValueError("a Scaled part's scale must be a scalar, got shapes "
                     f"{[jnp.shape(p.scale) for p in out if p.scale is not None]}")
  for p in out:
    want = ((p.x.shape[-1] - p.start) // 64, math.prod(p.x.shape[:-1]))
    if p.row_max is not None and (p.gelu or jnp.shape(p.row_max) != want):
      raise ValueError(f"a Gelu part's row_max must be [{want[0]}, {want[1]}] (64-column "
                       f"groups, tokens) on an applied part, got {jnp.shape(p.row_max)}, "
                       f"applied={not p.gelu}")
  return out


def part_values(p: Part) -> jax.Array:
  """The columns a ``Part`` stands for."""
  v = p.x[..., p.start:]
  if p.scale is not None:
    v = (v.astype(jnp.float32) * p.scale).astype(jnp.bfloat16)
  return jax.nn.gelu(v, approximate=True) if p.gelu else v


def join(x) -> jax.Array:
  """The input array a layer input stands for: an array itself; parts concatenated along the
  last axis, each Gelu or Scaled part computed (``Gelu``, ``Scaled``)."""
  if not isinstance(x, PARTS):
    return x
  cols = [part_values(p) for p in input_parts(x)]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def input_dtype(x):
  """The dtype of ``join(x)``, without computing it (a Scaled part's is bf16)."""
  p = input_parts(x)[0]
  return jnp.dtype(jnp.bfloat16) if p.scale is not None else p.x.dtype


def map_parts(x, f):
  """A layer input with ``f`` applied to each part's array (and a Gelu's ``head``; starts,
  flags, scales kept)."""
  if isinstance(x, tuple):
    return tuple(map_parts(p, f) for p in x)
  if isinstance(x, Gelu) and x.head is not None:
    return x.replace(x=f(x.x), head=f(x.head))
  return x.replace(x=f(x.x)) if isinstance(x, PARTS) else f(x)


def input_width(x) -> int:
  """K, the last dimension of ``join(x)``, without computing it."""
  return sum(p.x.shape[-1] - p.start for p in input_parts(x))


@struct.dataclass
class QuantizedLinear:
  """A linear layer ``y = x W + b`` with W [K, N] stored quantized.

  Data (pytree leaves; a None field is absent):
    qweight: uint8 [N, K // 2] packed 4-bit codes (see ``formats``), or int8 [N, K].
    wscale: [N, K // G] weight group scales, in the weight format's scale dtype; for
      ``int4_2l`` the multipliers, uint8 [N, ceil(K / 128)] (``formats.pack_multipliers``).
    wcscale: f32 [N] per-output-channel scale multiplying ``wscale`` (NVFP4, and the row
      units of ``int4_2l``).
    smooth: f32 [K] smoothing factors lambda; activations are divided by them.
    lora_down: [K, r] low-rank down projection (16-bit), applied to x / lambda (folded:
      ``lowrank_down``).
    lora_up: [r, N] low-rank up projection (16-bit).
    bias: [N] or None.
  Static:
    weight_format: name of the weight format ('int4', 'nvfp4', 'int4_2l', 'int8').
    act_format: name of the activation format ('int4', 'uint4', 'nvfp4', 'int4_2l', 'int8'), or
      None for 16-bit activations (weight-only quantization).
  """

  qweight: jax.Array
  wscale: jax.Array
  wcscale: jax.Array | None = None
  smooth: jax.Array | None = None
  lora_down: jax.Array | None = None
  lora_up: jax.Array | None = None
  bias: jax.Array | None = None
  weight_format: str = struct.field(pytree_node=False, default="int4")
  act_format: str | None = struct.field(pytree_node=False, default="int4")

  @property
  def in_features(self) -> int:
    k = self.qweight.shape[-1]
    return 2 * k if formats.get_format(self.weight_format).packed else k

  @property
  def out_features(self) -> int:
    return self.qweight.shape[0]

  @property
  def rank(self) -> int:
    return 0 if self.lora_down is None else self.lora_down.shape[1]

  @property
  def nbytes(self) -> int:
    """Bytes of every array held (weights, scales, smoothing, low-rank, bias)."""
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))

  def weight(self) -> formats.Quantized:
    """The stored weight residual, unpacked: q int8 [N, K], scales, channel scales."""
    fmt = formats.get_format(self.weight_format)
    q = formats.unpack(self.qweight, fmt) if fmt.packed else self.qweight
    ts = jnp.float32(1.0) if self.wcscale is None else self.wcscale[:, None]
    scale = self.wscale
    if fmt.two_level:
      scale = formats.unpack_multipliers(scale, fmt.groups(q.shape[-1])).astype(jnp.float32)
    return formats.Quantized(q, scale, ts)

  def row_scaled_weight(self) -> tuple[jax.Array, jax.Array]:
    """A row-scaled weight (``formats.ROW_SCALED``) as the int8 GEMM's operand: int8 [N, K]
    (``m * q`` for int4_2l) and f32 [N] row scales."""
    return formats.row_scaled(self.weight(), self.weight_format)

  def dequantized_weight(self) -> jax.Array:
    """f32 [K, N]: the effective weight ``diag(1/lambda) (Q(R) + L_down L_up)``."""
    w = formats.dequantize(self.weight(), self.weight_format).T
    if self.lora_down is not None:
      w = w + matmul_f32(self.lora_down.astype(jnp.float32), self.lora_up.astype(jnp.float32))
    if self.smooth is not None:
      w = w / self.smooth[:, None]
    return w

  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    return apply(self, x, bias)


@struct.dataclass
class PreparedLinear:
  """A row-scaled QuantizedLinear (weights and activations in ``formats.ROW_SCALED``) with
  the work that depends on its weights alone done once (``prepare``), for a loop that applies
  it many times. ``apply`` gives the layer's results, bit for bit.

  Data:
    layer: the QuantizedLinear as stored.
    w: int8 [N, K] weight values (``QuantizedLinear.row_scaled_weight``; ``m * q`` for
      int4_2l: twice the bytes of the packed codes), or None (``prepare(expand=False)``): the
      weights stay packed, and ``w4a4.row_scaled_linear`` expands them where the int8 GEMM
      runs. sw: f32 [N] weight row scales (None with w None for all but int4_2l).
    mult_t: uint8 [K/128, N], int4_2l's packed multipliers transposed (the W4A8 register
      kernel's operand) when w is None; else None.
    inv_smooth: f32 [K] 1 / lambda, down: bf16 [K, r] L_down / lambda (``folded_smoothing``);
      up_t: bf16 [N, r16] L_up^T zero-padded to a multiple of 16 ranks (the GEMMs' epilogue
      operand). None where the layer has no smoothing / low-rank branch.
  """

  layer: QuantizedLinear
  w: jax.Array | None
  sw: jax.Array | None
  inv_smooth: jax.Array | None = None
  down: jax.Array | None = None
  up_t: jax.Array | None = None
  mult_t: jax.Array | None = None

  in_features = property(lambda self: self.layer.in_features)
  out_features = property(lambda self: self.layer.out_features)
  weight_format = property(lambda self: self.layer.weight_format)
  act_format = property(lambda self: self.layer.act_format)
  bias = property(lambda self: self.layer.bias)

  def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    return apply(self, x, bias)


def runs_row_scaled_kernels() -> bool:
  """Whether row-scaled layers traced now run on the int8 kernels (``set_backend``; 'auto':
  on a Hopper GPU)."""
  if _backend == "auto":
    if jax.default_backend() != "gpu":
      return False
    from svdq_jax.pallas_kernels import int8_hopper
    return int8_hopper.on_hopper()
  return _backend != "reference"


def prepare(tree, expand: bool = True):
  """``tree`` with every row-scaled QuantizedLinear replaced by a ``PreparedLinear``, when
  the kernels will run them (``runs_row_scaled_kernels``; else ``tree`` itself).

  Inside a jitted loop, before it, on the loop's weights: the work that depends on the
  weights alone is done once instead of at every step. ``expand``: the int8 weight values
  too, at a cost of N * K bytes per layer for as long as the loop runs (FLUX.1-dev W4A8,
  H200: the 28-step loop 4% faster for 8.6 GB over the 6.4 GB model, docs/benchmarks,
  2026-12-03); else only the small operands (1 / lambda, L_down / lambda, L_up^T, the
  transposed multipliers and f32 scales: ~2 ms of small kernels a FLUX.1-dev step on an
  H200, 2026-12-04), which ``sampling.sample`` always hoists.
  """
  if not runs_row_scaled_kernels():
    return tree
  from svdq_jax.pallas_kernels import w4a4

  def prep(node):
    if (isinstance(node, QuantizedLinear) and node.weight_format in formats.ROW_SCALED
        and node.act_format in formats.ROW_SCALED):
      return w4a4.prepare_row_scaled(node, interpret=_backend == "interpret", expand=expand)
    return node

  return jax.tree_util.tree_map(prep, tree, is_leaf=lambda n: isinstance(n, QuantizedLinear))


def stored_weight(qt: formats.Quantized, fmt: str | formats.Format) -> dict:
  """The ``QuantizedLinear`` fields (``qweight``, ``wscale``, ``wcscale``) holding a weight
  [N, K] from ``formats.quantize_weight``; the inverse of ``QuantizedLinear.weight``. Every
  field is indexed by output channel first, so a slice of rows is a slice of each."""
  fmt = formats.get_format(fmt)
  return dict(
      qweight=formats.pack(qt.q, fmt) if fmt.packed else qt.q,
      wscale=formats.pack_multipliers(qt.scale) if fmt.two_level else qt.scale,
      wcscale=qt.tensor_scale[:, 0] if fmt.name == "nvfp4" or fmt.two_level else None)


def group_scaled_matmul(qa: formats.Quantized, qw: formats.Quantized,
                        group_size: int) -> jax.Array:
  """Block-scaled integer matmul, the arithmetic of the W4A4 GEMM kernel.

  Args:
    qa: activations, q int8 [M, K], scale f32 [M, G], tensor_scale scalar.
    qw: weights, q int8 [N, K], scale [N, G], tensor_scale scalar or [N, 1].
    group_size: K // G.

  Returns:
    f32 [M, N]: sum over groups g in K order of
    ``f32(int32 dot(qa[:, g], qw[:, g])) * sa[:, g] * sw[:, g]``, times the tensor scales.
  """
  m, k = qa.q.shape
  n = qw.q.shape[0]
  n_groups = k // group_size
  sa = qa.scale.astype(jnp.float32)
  sw = qw.scale.astype(jnp.float32)

  def body(g, acc):
    start = g * group_size
    a = jax.lax.dynamic_slice_in_dim(qa.q, start, group_size, axis=1)
    w = jax.lax.dynamic_slice_in_dim(qw.q, start, group_size, axis=1)
    part = jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.int32)
    sa_g = jax.lax.dynamic_index_in_dim(sa, g, axis=1)           # [M, 1]
    sw_g = jax.lax.dynamic_index_in_dim(sw, g, axis=1, keepdims=False)  # [N]
    return acc + part.astype(jnp.float32) * sa_g * sw_g[None, :]

  acc = jax.lax.fori_loop(0, n_groups, body, jnp.zeros((m, n), jnp.float32))
  wts = jnp.asarray(qw.tensor_scale, jnp.float32)
  wts = wts.reshape(1, -1) if wts.ndim else wts
  return acc * (qa.tensor_scale * wts)


def row_scaled_matmul(a: jax.Array, sa: jax.Array, w: jax.Array, sw: jax.Array) -> jax.Array:
  """The arithmetic of the Hopper int8 GEMM: one exact int32 dot over all of K, scaled once.

  a: int8 [M, K], sa: f32 [M], w: int8 [N, K], sw: f32 [N] -> f32 [M, N] =
  ``(f32(a . w) * sa[m]) * sw[n]``.
  """
  acc = jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
  return acc.astype(jnp.float32) * sa[:, None] * sw[None, :]


def _at_groups(qt: formats.Quantized, fmt: formats.Format, group: int) -> formats.Quantized:
  """``qt`` with its scales (tensor scale folded in) repeated to groups of ``group``."""
  k = qt.q.shape[-1]
  s = qt.scale.astype(jnp.float32) * jnp.asarray(qt.tensor_scale, jnp.float32)
  s = jnp.repeat(s, fmt.group_len(k) // group, axis=-1)
  return formats.Quantized(qt.q, s, jnp.float32(1.0))


def quantized_matmul(qa: formats.Quantized, afmt: formats.Format, qw: formats.Quantized,
                     wfmt: formats.Format) -> jax.Array:
  """f32 [M, N]: quantized activations [M, K] times quantized weights [N, K]^T, exact
  integer products. Two row-scaled formats (``formats.ROW_SCALED``) take one int32 dot over
  K (``row_scaled_matmul``); otherwise per group, at the finer of the two group sizes
  (``group_scaled_matmul``)."""
  k = qa.q.shape[-1]
  if afmt.name in formats.ROW_SCALED and wfmt.name in formats.ROW_SCALED:
    a, sa = formats.row_scaled(qa, afmt)
    w, sw = formats.row_scaled(qw, wfmt)
    return row_scaled_matmul(a, sa, w, sw)
  step = afmt.step * wfmt.step
  ga, gw = afmt.group_len(k), wfmt.group_len(k)
  if ga == gw and not (afmt.two_level or wfmt.two_level):
    return group_scaled_matmul(qa, qw, gw) * step
  g = min(ga, gw)
  return group_scaled_matmul(_at_groups(qa, afmt, g), _at_groups(qw, wfmt, g), g) * step


LOWRANK_DTYPE = jnp.bfloat16



def bf16_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """f32 a @ b of bf16-rounded operands (the low-rank branch's tensor-core precision)."""
  return jnp.matmul(a.astype(LOWRANK_DTYPE), b.astype(LOWRANK_DTYPE),
                    preferred_element_type=jnp.float32)


def folded_down(down: jax.Array, smooth: jax.Array | None) -> jax.Array:
  """bf16 [K, r] = down [K, r] * (1 / lambda)[:, None] (f32 product, rounded once)."""
  if smooth is not None:
    down = down.astype(jnp.float32) * inverse_smooth(smooth)[:, None]
  return down.astype(LOWRANK_DTYPE)


def folded_smoothing(smooth: jax.Array | None, down: jax.Array | None
                     ) -> tuple[jax.Array | None, jax.Array | None]:
  """A layer's smoothing folded into the operands the activation kernels take: (f32 [K]
  1 / lambda or None, bf16 [K, r] ``folded_down`` or None). Weight-only work: a loop
  computes it once (``prepare``)."""
  inv = None if smooth is None else inverse_smooth(smooth)
  return inv, (None if down is None else folded_down(down, smooth))


def lowrank_down(x: jax.Array, down: jax.Array, smooth: jax.Array | None = None) -> jax.Array:
  """f32 [M, r] = (x [M, K] / lambda) @ down [K, r], computed as bf16(x) @ ``folded_down``
  with f32 accumulation. Folding lambda into the [K, r] factor, rather than rounding
  x / lambda to bf16, lets the branch read the layer's input as it is: on the GPU the
  activation quantization then writes no bf16 copy of x / lambda (one pass over the
  activations fewer per layer)."""
  return bf16_dot(x, folded_down(down, smooth))


def lowrank_up(lr: jax.Array, up: jax.Array) -> jax.Array:
  """f32 [M, N] = lr [M, r] @ up [r, N], bf16 operands, f32 accumulation."""
  return bf16_dot(lr, up)


BACKENDS = ("auto", "reference", "pallas", "interpret")
_backend = "auto"


def set_backend(name: str) -> None:
  """Chooses how ``apply`` runs quantized layers (read when a function is traced):

  'auto': the Pallas kernels on GPU for the formats they support, the jnp reference
  otherwise (weight-only layers too, XLA fusing their dequantization, except int4_2l ones
  given a few bf16 rows: ``pallas_kernels.w4a16_gemv``); 'reference': always
  the jnp reference; 'pallas': always the kernels (an error for unsupported formats);
  'interpret': the kernels in Pallas interpret mode (CPU checks).
  """
  global _backend
  if name not in BACKENDS:
    raise ValueError(f"unknown backend {name!r}; known: {BACKENDS}")
  _backend = name


@contextlib.contextmanager
def backend(name: str):
  """Context manager form of ``set_backend``."""
  previous = _backend
  set_backend(name)
  try:
    yield
  finally:
    set_backend(previous)


# (kernel module, switch) read by ``_dispatch`` while a function is traced, besides _backend
_KERNEL_SWITCHES = (("w4a4", "_act_choice"), ("w4a4", "_gemm_choice"),
                    ("w4a4", "_input_parts"), ("int8_hopper", "SPLIT_STORE"),
                    ("w4a4", "_epilogue_gelu"), ("w4a4", "_epilogue_row_max"),
                    ("w4a4", "_packed_gelu"), ("w4a16_gemv", "_enabled"),
                    ("w4a4", "_register_expansion"), ("w4a8_hopper", "_narrow_tiles"),
                    ("w4a8_hopper", "_three_wgs"), ("w4a8_hopper", "_three_wgs_gelu"),
                    ("w4a4", "_split_gelu"), ("w4a16_gemv", "_bit_unpack"),
                    ("w4a4", "_epilogue_residual"), ("w4a16_gemv", "_grouped_on"))


def trace_settings() -> tuple:
  """Every switch ``apply`` reads while a function is traced (``set_backend``, the kernel
  modules' choices), as a hashable tuple: a jitted function that closes over quantized layers
  takes it as a static argument so that changing a switch retraces it (``models.sampling``).
  The kernel modules are imported here: a module first imported while tracing would change
  the tuple after the first trace, and the second call would trace again."""
  mods = [importlib.import_module(f"svdq_jax.pallas_kernels.{m}") for m, _ in _KERNEL_SWITCHES]
  return (_backend, *(getattr(mod, switch) for mod, (_, switch) in zip(mods, _KERNEL_SWITCHES)))


def apply(layer: QuantizedLinear | PreparedLinear, x: jax.Array,
          bias: jax.Array | None = None, gelu_from: int | None = None,
          feeds=None, residual: tuple[jax.Array, jax.Array] | None = None
          ) -> jax.Array | Gelu:
  """Forward pass. x [..., K] -> [..., N] in x's dtype (f32 for integer x), on the backend
  ``set_backend`` chose.

  x may also be given as parts (``Gelu``): a tuple of arrays [..., K_i] and Gelu parts whose
  widths sum to K, meaning their concatenation. ``bias`` (optional, [N]) is added like
  ``layer.bias``; pass it when the bias lives outside the layer (a Flax module's own ``bias``
  parameter). Giving both is an error. ``gelu_from``: the output's columns from there on
  feed a GELU (FLUX's fc1, linear1's MLP half); the result is then ``Gelu(y, gelu_from)``,
  with ``applied`` when the Hopper int8 GEMM computed the GELU in its epilogue. ``feeds``:
  the layer (a QuantizedLinear, PreparedLinear or float kernel) whose input ends with those
  GELU columns: the W4A8 GEMM may then compute its activation kernel's token maxima over them
  in its epilogue (``Gelu.row_max``; ``w4a4.set_epilogue_row_max``). ``residual``: (r [..., N],
  gate broadcastable to it): the result is ``residual_sum(r, gate, y)`` (FLUX's gated residual
  ``r + gate * y``), which the W4A8 GEMM may compute in its epilogue
  (``w4a4.set_epilogue_residual``); not with ``gelu_from``.
  """
  k = layer.in_features
  if input_width(x) != k:
    shapes = [(p.x.shape, p.start) if p.start else p.x.shape for p in input_parts(x)]
    raise ValueError(f"QuantizedLinear expects inputs [..., {k}], got "
                     f"{shapes if isinstance(x, PARTS) else shapes[0]}")
  if not jnp.issubdtype(input_dtype(x), jnp.inexact):   # as x @ a float kernel would
    x = map_parts(x, lambda a: a.astype(jnp.float32))
  if bias is not None and layer.bias is not None:
    raise ValueError("bias given twice: the layer already holds one")
  if bias is not None and jnp.shape(bias) != (layer.out_features,):
    raise ValueError(f"bias must be [N={layer.out_features}], got {jnp.shape(bias)}")
  if gelu_from is not None and not 0 <= gelu_from < layer.out_features:
    raise ValueError(f"gelu_from={gelu_from} is not a column of the output [..., "
                     f"{layer.out_features}]")
  if residual is not None:
    check_residual(residual, input_parts(x)[0].x.shape[:-1] + (layer.out_features,),
                   gelu_from)
  from svdq_jax import parallel  # under parallel.tokens_over: each device its own tokens
  y = None
  if parallel.token_mesh() is not None:
    x = join(x)
    y = parallel.split_tokens(_dispatch, layer, x, bias)
    if y is not None and residual is not None:
      return residual_sum(*residual, y)
  if y is None:
    y = _dispatch(layer, x, bias, gelu_from, feeds, residual)
  return y if gelu_from is None or isinstance(y, Gelu) else Gelu(y, gelu_from)


def check_residual(residual, out_shape: tuple, gelu_from: int | None = None) -> None:
  """``apply``'s / ``layers.dense``'s ``residual``: (r, gate), r of the output's shape, gate
  broadcastable to it, and no ``gelu_from`` beside it."""
  if gelu_from is not None:
    raise ValueError("residual and gelu_from exclude each other: a GELU output feeds a "
                     "layer, a gated residual ends a branch")
  if not (isinstance(residual, tuple) and len(residual) == 2):
    raise ValueError("residual must be a pair (r, gate): the result is r + gate * y")
  r, gate = residual
  if jnp.shape(r) != tuple(out_shape):
    raise ValueError(f"residual r must have the output's shape {tuple(out_shape)}, got "
                     f"{jnp.shape(r)}")
  try:
    jnp.broadcast_shapes(jnp.shape(gate), jnp.shape(r))
  except ValueError:
    raise ValueError(f"residual gate {jnp.shape(gate)} does not broadcast to the output "
                     f"{tuple(out_shape)}") from None


def _dispatch(layer: QuantizedLinear, x: jax.Array, bias: jax.Array | None,
              gelu_from: int | None = None, feeds=None, residual=None) -> jax.Array | Gelu:
  """``apply`` on the backend ``set_backend`` chose (inputs already checked); an applied
  ``Gelu`` where a kernel computed the GELU from ``gelu_from`` on, else the plain output;
  with ``residual``, ``residual_sum`` of it (the W4A4 / W4A8 kernels' path computes that
  itself, in the GEMM's epilogue where it can)."""
  summed = lambda y: y if residual is None else residual_sum(*residual, y)
  k = layer.in_features
  if _backend == "reference":
    return summed(reference_apply(layer, x, bias))
  if layer.act_format is None and not isinstance(layer, PreparedLinear):
    from svdq_jax.pallas_kernels import w4a16_gemv
    first = input_parts(x)[0].x
    if ((_backend != "auto" or jax.default_backend() == "gpu")
        and w4a16_gemv.supports_layer(layer, math.prod(first.shape[:-1]), input_dtype(x))):
      return summed(reference_apply(layer, x, bias, functools.partial(
          w4a16_gemv.layer_product, interpret=_backend == "interpret")))
    # on every backend: XLA fuses the dequantization into the matmul (no W4A4 kernel exists
    # for weight-only layers)
    return summed(reference_apply(layer, x, bias))
  from svdq_jax.pallas_kernels import w4a4  # lazily: Pallas loads only when needed
  supported = w4a4.supports(layer.weight_format, layer.act_format)
  if _backend == "auto":
    on_gpu = jax.default_backend() == "gpu"
    if w4a4.row_scaled(layer.weight_format):  # the int8 GEMM is Hopper-only
      from svdq_jax.pallas_kernels import int8_hopper
      dtype = input_dtype(x)
      on_gpu = runs_row_scaled_kernels() and int8_hopper.supports(
          k, layer.out_features, jnp.float32 if dtype == jnp.float32 else jnp.bfloat16)
    if supported and on_gpu:
      return w4a4.w4a4_linear(layer, x, bias, gelu_from=gelu_from, feeds=feeds,
                              residual=residual)
    return summed(reference_apply(layer, x, bias))
  return w4a4.w4a4_linear(layer, x, bias, gelu_from=gelu_from, feeds=feeds,
                          residual=residual, interpret=_backend == "interpret")


def inverse_smooth(smooth: jax.Array) -> jax.Array:
  """f32 [K] 1 / lambda, the factor ``smoothed`` multiplies by (kernels take it as input)."""
  return formats.reciprocal(smooth)


def smoothed(x: jax.Array, smooth: jax.Array) -> jax.Array:
  """x_hat = x * (1 / lambda): f32 [..., K]. Written as the product with the f32 reciprocal
  because XLA rewrites a division by a broadcast vector into exactly this on every backend;
  kernels that divide instead (div.rn) differ from it by an ulp in some elements."""
  return x.astype(jnp.float32) * inverse_smooth(smooth)


def weight_only_product(layer: QuantizedLinear, xs: jax.Array) -> jax.Array:
  """A weight-only layer's product, f32 [M, N]: xs [M, K] (the smoothed input, in the input's
  dtype) times the weight dequantized to that dtype, f32 accumulation (``Precision.HIGHEST``).
  ``pallas_kernels.w4a16_gemv`` computes it for a few bf16 rows."""
  w = formats.dequantize(layer.weight(), layer.weight_format).T.astype(xs.dtype)
  return jnp.matmul(xs, w, preferred_element_type=jnp.float32,
                    precision=jax.lax.Precision.HIGHEST)


def reference_apply(layer: QuantizedLinear | PreparedLinear, x: jax.Array,
                    bias: jax.Array | None = None, product=weight_only_product) -> jax.Array:
  """The pure-jnp forward pass, the semantics every kernel reproduces (see ``apply``).
  ``product`` computes a weight-only layer's ``weight_only_product`` (a kernel may stand in:
  the smoothing, LoRA and bias around it are this function's)."""
  if isinstance(layer, PreparedLinear):  # defined by the layer it was prepared from
    layer = layer.layer
  x = join(x)
  k, n = layer.in_features, layer.out_features
  bias = layer.bias if bias is None else bias
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)
  xf = x2.astype(jnp.float32)
  if layer.smooth is not None:
    xf = smoothed(xf, layer.smooth)
  if layer.act_format is None:  # weight-only: dequantize to the input's dtype, f32 accumulation
    y = product(layer, xf.astype(x.dtype))
  else:
    afmt = formats.get_format(layer.act_format)
    y = quantized_matmul(formats.quantize(xf, afmt), afmt, layer.weight(),
                         formats.get_format(layer.weight_format))
  if layer.lora_down is not None:
    y = y + lowrank_up(lowrank_down(x2, layer.lora_down, layer.smooth), layer.lora_up)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype).reshape(*lead, n)
