"""Number formats: quantize, dequantize, pack.

Every format here represents a real value as ``q * step * scale`` where ``q`` is a small
integer held in int8, ``step`` is a per-format constant (1 for the integer formats, 1/2 for
NVFP4) and ``scale`` is one number per group of ``group_size`` consecutive elements along
the last axis (the reduction axis K of a matmul). Keeping ``q`` integral is what lets every
4-bit format run exactly on int8 tensor cores: INT4 values are in [-8, 7], unsigned INT4 in
[0, 15], and NVFP4 (E2M1) values times two are integers in [-12, 12].

Formats:
  * ``int4``:  signed, scale = absmax / 7, values clipped to [-8, 7], groups of 64.
  * ``uint4``: unsigned, for non-negative inputs, scale = max / 15, values in [0, 15],
    groups of 64; negative inputs clip to 0.
  * ``nvfp4``: FP4 E2M1 values {0, 0.5, 1, 1.5, 2, 3, 4, 6} with sign, groups of 16, group
    scales in FP8 E4M3, optionally times one per-tensor f32 scale (used for weights so that
    the group scales stay inside the E4M3 range).
  * ``int8``:  signed, scale = absmax * f32(1/127), q = clip(round(x * (1 / scale)), -127,
    127), one group over the whole last axis (per output channel for weights, per token for
    activations). Not packed.
  * ``int4_2l``: two-level INT4, whose scales leave a matmul's K loop. Per row (an output
    channel of a weight [N, K], a token of activations [M, K]) one f32 ``unit`` and per
    64-group an integer multiplier ``m`` in 1..16:
        unit = rowmax|x| * f32(1/112)           (112 = 7 * 16; an all-zero row: unit 1)
        m_g  = clip(ceil(max_g|x| * (1 / (7 unit))), 1, 16)
        q    = clip(round(x * (1 / (unit m_g))), -8, 7)   (round half to even)
    (every 1 / . an f32 reciprocal, correctly rounded; see INV_112).
    value = unit * m_g * q. ``m * q`` is an int8 in [-128, 112], so a product of two
    row-scaled operands is one exact int32 dot over all of K times ``unit_a * unit_w``. In
    ``Quantized`` the multipliers are the group ``scale`` (f32 integers) and the units the
    ``tensor_scale`` [..., 1]. Stored weights: codes packed as ``int4``, multipliers
    ``m - 1`` packed two 4-bit values per byte along the groups (``pack_multipliers``).

NaN: a row holding a NaN quantizes to codes 0 (multipliers 1) with a NaN scale, so whatever
it multiplies comes out NaN, as in a float matmul (``int4_2l`` and ``int8``; the grouped
formats give NaN scales to the groups holding the NaN).

Packing (4-bit formats): two values per uint8 along the last axis, in blocks of
``PACK_BLOCK`` = 64 elements (32 bytes): within a block, element ``j`` (j < 32) goes into
the low nibble of byte ``j`` and element ``32 + j`` into its high nibble. Each half-block is
then a contiguous run of K, so a kernel unpacks a tile into two contiguous int8 tiles
without any interleaving (one INT4 group = one block; one NVFP4 group = half of a
half-block). K must be a multiple of 64 for packed formats. Nibble codes: two's complement for
``int4``, plain binary for ``uint4``, and for ``nvfp4`` the E2M1 bit pattern (bit 3 = sign,
bits 0-2 = index into the magnitudes).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FP8_E4M3_MAX = 448.0
PACK_BLOCK = 64
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclasses.dataclass(frozen=True)
class Format:
  """A quantization format.

  Attributes:
    name: registry name.
    bits: bits per value in storage (4 values are packed two per byte).
    group_size: elements per scale along the last axis; None means one group over the
      whole axis.
    qmin, qmax: the integer range of ``q``.
    step: value of one integer unit of ``q`` before scaling (1 or 1/2).
    scale_dtype: dtype of stored weight scales (activation scales are always f32).
  """

  name: str
  bits: int
  group_size: int | None
  qmin: int
  qmax: int
  step: float
  scale_dtype: jnp.dtype
  two_level: bool = False

  @property
  def max_value(self) -> float:
    """Largest representable magnitude before scaling (7, 15, 6, 127)."""
    return self.qmax * self.step

  @property
  def packed(self) -> bool:
    return self.bits == 4

  def groups(self, k: int) -> int:
    """Number of scale groups along an axis of length ``k``."""
    return 1 if self.group_size is None else k // self.group_size

  def group_len(self, k: int) -> int:
    return k if self.group_size is None else self.group_size


INT4 = Format("int4", 4, 64, -8, 7, 1.0, jnp.bfloat16)
UINT4 = Format("uint4", 4, 64, 0, 15, 1.0, jnp.bfloat16)
NVFP4 = Format("nvfp4", 4, 16, -12, 12, 0.5, jnp.float8_e4m3fn)
INT8 = Format("int8", 8, None, -127, 127, 1.0, jnp.float32)
INT4_2L = Format("int4_2l", 4, 64, -8, 7, 1.0, jnp.float32, two_level=True)
MULT_MAX = 16  # largest int4_2l multiplier: -8 * 16 = -128 is still an int8

FORMATS = {f.name: f for f in (INT4, UINT4, NVFP4, INT8, INT4_2L)}
# Formats whose scale is one number per row: products of two of them are one int32 dot over
# K (the Hopper fast path); int4_2l's group multipliers live inside its int8 values
ROW_SCALED = ("int8", "int4_2l")


def matmul_f32(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """a @ b at full f32 precision on every backend (no bf16/tf32 passes)."""
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def get_format(name: str | Format) -> Format:
  if isinstance(name, Format):
    return name
  try:
    return FORMATS[name]
  except KeyError:
    raise ValueError(f"unknown format {name!r}; known formats: {sorted(FORMATS)}") from None


class Quantized(NamedTuple):
  """A quantized tensor, unpacked.

  q: int8 [..., K], integer values in [fmt.qmin, fmt.qmax].
  scale: [..., K // group] group scales (fmt.scale_dtype for weights, f32 for activations).
  tensor_scale: f32 scalar, or [..., 1] (one per row), multiplying the group scales of
    its row (1 except NVFP4 weights).
  """

  q: jnp.ndarray
  scale: jnp.ndarray
  tensor_scale: jnp.ndarray


def check_groups(k: int, fmt: Format, what: str = "tensor", *, storage: bool = True) -> None:
  """Raises ValueError naming ``what`` when K does not split into the format's groups
  (and, with ``storage``, into whole packing blocks for 4-bit formats)."""
  g = fmt.group_len(k)
  if k % g:
    raise ValueError(
        f"{what}: K={k} is not a multiple of the {fmt.name} group size {g}")
  if storage and fmt.packed and k % PACK_BLOCK:
    raise ValueError(
        f"{what}: K={k} is not a multiple of the 4-bit packing block {PACK_BLOCK}")


def _grouped(x: jnp.ndarray, fmt: Format) -> jnp.ndarray:
  """[..., K] -> [..., K // g, g]."""
  k = x.shape[-1]
  check_groups(k, fmt, storage=False)
  g = fmt.group_len(k)
  return x.reshape(*x.shape[:-1], k // g, g)


def round_e2m1_units(y: jnp.ndarray, round_half_even=jnp.round) -> jnp.ndarray:
  """|value| (f32, >= 0) -> nearest E2M1 magnitude in units of 1/2, ties to even code.

  The E2M1 grid has spacing 1/2 below 2, 1 in [2, 4) and 2 in [4, 6]; within each
  binade, round-half-to-even on the grid index is exactly jnp.round on the scaled value.
  ``round_half_even`` replaces jnp.round where it cannot lower (inside a Triton kernel).
  """
  y = jnp.minimum(y, 6.0)
  units = jnp.where(y < 2.0, round_half_even(y * 2.0),
                    jnp.where(y < 4.0, 2.0 * round_half_even(y),
                              4.0 * round_half_even(y * 0.5)))
  return units


def _per_group(ts: jnp.ndarray) -> jnp.ndarray:
  """Tensor scale (scalar or [..., 1] per row) -> broadcastable to [..., G, g]."""
  ts = jnp.asarray(ts, jnp.float32)
  return ts[..., None] if ts.ndim else ts


def absmax(x: jnp.ndarray, axis: int, unsigned: bool = False) -> jnp.ndarray:
  """max |x| (max(x, 0) if ``unsigned``) over ``axis``, kept; NaN where any element is NaN
  (XLA's vectorized max reductions may drop NaN, so it is made explicit)."""
  v = jnp.maximum(x, 0.0) if unsigned else jnp.abs(x)
  amax = jnp.max(v, axis=axis, keepdims=True)
  return jnp.where(jnp.any(jnp.isnan(x), axis=axis, keepdims=True), jnp.nan, amax)


def _safe_div(x: jnp.ndarray, s: jnp.ndarray) -> jnp.ndarray:
  return x / jnp.where(s == 0, 1.0, s)


def quantize(x: jnp.ndarray, fmt: str | Format, *, scale_dtype=None,
             tensor_scale: jnp.ndarray | None = None) -> Quantized:
  """Quantizes ``x`` [..., K] along its last axis in groups.

  Args:
    x: values, any float dtype (computed in f32).
    fmt: format or its name.
    scale_dtype: dtype the group scales are rounded to before ``q`` is computed (so
      ``q * step * scale`` is what dequantization returns); default f32.
    tensor_scale: f32 scalar or [..., 1] per row that the group scales are taken
      relative to (NVFP4 weights, so group scales fit FP8 E4M3).

  Returns:
    Quantized(q int8 [..., K], scale [..., K // g], tensor_scale f32).
  """
  fmt = get_format(fmt)
  if fmt.two_level:
    return quantize_two_level(x)
  scale_dtype = jnp.float32 if scale_dtype is None else scale_dtype
  xg = _grouped(jnp.asarray(x, jnp.float32), fmt)
  ts = jnp.float32(1.0) if tensor_scale is None else jnp.asarray(tensor_scale, jnp.float32)
  amax = absmax(xg, -1, unsigned=fmt.qmin == 0)
  # int8 is row-scaled (see INV_127); the group formats keep amax / max_value
  scale = amax * INV_127 if fmt.name == "int8" else amax / fmt.max_value
  scale = _safe_div(scale, _per_group(ts))
  if scale_dtype == jnp.float8_e4m3fn:
    scale = jnp.minimum(scale, FP8_E4M3_MAX)
  scale = scale.astype(scale_dtype)
  if fmt.name == "int8":  # times the reciprocal, see INV_127
    y = xg * reciprocal(scale.astype(jnp.float32) * _per_group(ts))
  else:
    y = _safe_div(xg, scale.astype(jnp.float32) * _per_group(ts))
  if fmt.name == "nvfp4":
    q = jnp.sign(y) * round_e2m1_units(jnp.abs(y))
  else:
    q = jnp.clip(jnp.round(y), fmt.qmin, fmt.qmax)
  q = jnp.where(jnp.isnan(q), 0, q).astype(jnp.int8).reshape(x.shape)
  return Quantized(q, scale[..., 0], ts)


# The row-scaled formats multiply by f32 reciprocals instead of dividing: XLA rewrites a
# division by a constant or by a broadcast vector into a product with the (correctly
# rounded) reciprocal, on some backends and shapes and not others, so the formats are
# defined by the products themselves and every backend and kernel computes them alike.
INV_112 = np.float32(1.0 / (7 * MULT_MAX))
INV_127 = np.float32(1.0 / 127)


def reciprocal(s: jnp.ndarray) -> jnp.ndarray:
  """f32 1 / s, correctly rounded on every backend, with 1 for s == 0.

  An f32 divide is not correctly rounded on NVIDIA GPUs: XLA emits the approximate
  ``div.full.f32`` (openxla/xla#37181). Measured on an H200 (2026-12-01), that moved ~1 in
  10^7 activation codes off the kernels' ``div.rn.f32`` at products within an ulp of a tie.
  So the quotient is taken in f64 and rounded once to f32, which is the correctly rounded f32
  quotient (53 >= 2 * 24 + 2 bits). The numerator is 1 + 2^-52, not 1: with an exact-in-f32
  numerator LLVM narrows ``fptrunc(fdiv(1.0, fpext(s)))`` back to an f32 divide inside XLA's
  fusions (measured: the jitted quotient still differed, the op-by-op one did not); 1/s lies
  at least 2^-49 (relative) from every f32 rounding midpoint, so the 2^-52 never changes the
  result. The operands are per-row / per-group scales: the f64 work is small.
  """
  s = jnp.where(s == 0, 1.0, s).astype(jnp.float32)
  with jax.enable_x64(True):
    return (_ONE_PLUS / s.astype(jnp.float64)).astype(jnp.float32)


_ONE_PLUS = np.float64(1.0 + 2.0 ** -52)


def two_level_unit(rowmax: jnp.ndarray) -> jnp.ndarray:
  """int4_2l row unit from the row's absmax (f32, any shape): max * f32(1/112), 1 for 0."""
  return jnp.where(rowmax == 0, 1.0, rowmax * INV_112)


def two_level_codes(x: jnp.ndarray, unit: jnp.ndarray, gmax: jnp.ndarray
                    ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """int4_2l multipliers and codes of one 64-group per row.

  Args: x f32 [..., g] (one group), unit f32 [..., 1], gmax f32 [..., 1] its absmax.
  Returns: (m f32 [..., 1] integers in 1..16, q f32 [..., g] integers in [-8, 7]); a NaN
  anywhere in the row (unit NaN) gives m 1 and q 0.
  """
  m = jnp.clip(jnp.ceil(gmax * reciprocal(7.0 * unit)), 1.0, float(MULT_MAX))
  m = jnp.where(jnp.isnan(m), 1.0, m)
  q = jnp.clip(jnp.round(x * reciprocal(unit * m)), -8.0, 7.0)
  return m, jnp.where(jnp.isnan(q), 0.0, q)


def quantize_two_level(x: jnp.ndarray) -> Quantized:
  """int4_2l (module docstring): x [..., K] -> Quantized(q int8 [..., K], multipliers
  f32 [..., K/64], units f32 [..., 1])."""
  xg = _grouped(jnp.asarray(x, jnp.float32), INT4_2L)
  gmax = absmax(xg, -1)                                    # [..., G, 1]
  rowmax = absmax(gmax, -2)                                # [..., 1, 1]
  unit = two_level_unit(rowmax)
  m, q = two_level_codes(xg, unit, gmax)
  return Quantized(q.astype(jnp.int8).reshape(x.shape), m[..., 0], unit[..., 0])


def row_scaled(qt: Quantized, fmt: str | Format) -> tuple[jnp.ndarray, jnp.ndarray]:
  """A row-scaled operand (``ROW_SCALED``) as the int8 GEMM takes it.

  Returns (int8 [..., K]: q for int8, m * q for int4_2l; f32 [...]: the row scale), so
  the value is ``values * scale[..., None]``.
  """
  fmt = get_format(fmt)
  if fmt.name not in ROW_SCALED:
    raise ValueError(f"format {fmt.name} is not row-scaled; row-scaled: {ROW_SCALED}")
  if fmt.two_level:
    qg = _grouped(qt.q.astype(jnp.int32), fmt) * qt.scale.astype(jnp.int32)[..., None]
    return qg.reshape(qt.q.shape).astype(jnp.int8), qt.tensor_scale[..., 0]
  return qt.q, qt.scale[..., 0].astype(jnp.float32) * qt.tensor_scale


def dequantize(qt: Quantized, fmt: str | Format) -> jnp.ndarray:
  """Quantized -> f32 [..., K]: ``q * step * scale * tensor_scale``."""
  fmt = get_format(fmt)
  qg = _grouped(qt.q.astype(jnp.float32), fmt)
  s = qt.scale.astype(jnp.float32)[..., None] * _per_group(qt.tensor_scale)
  return (qg * fmt.step * s).reshape(qt.q.shape)


def fake_quantize(x: jnp.ndarray, fmt: str | Format, **kwargs) -> jnp.ndarray:
  """dequantize(quantize(x)): the value the format represents, in f32."""
  return dequantize(quantize(x, fmt, **kwargs), fmt)


def nvfp4_channel_scale(x: jnp.ndarray) -> jnp.ndarray:
  """f32 [..., 1]: per-row scale mapping the row's largest NVFP4 group scale onto 448."""
  amax = jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)), axis=-1, keepdims=True)
  return jnp.where(amax > 0, amax / (6.0 * FP8_E4M3_MAX), 1.0)


def quantize_weight(w: jnp.ndarray, fmt: str | Format) -> Quantized:
  """Quantizes a weight stored [N, K] (K-major) as it is kept in a layer.

  Group scales are rounded to the format's scale dtype; NVFP4 scales are relative to a
  per-output-channel f32 scale (``tensor_scale`` [N, 1]).
  """
  fmt = get_format(fmt)
  if fmt.two_level:
    return quantize_two_level(w)
  ts = nvfp4_channel_scale(w) if fmt.name == "nvfp4" else None
  return quantize(w, fmt, scale_dtype=fmt.scale_dtype, tensor_scale=ts)


# q (in units of 1/2) -> E2M1 magnitude index, for |q| in {0, 1, 2, 3, 4, 6, 8, 12}.
_E2M1_UNITS = np.array([int(2 * m) for m in E2M1_MAGNITUDES], np.int8)
_UNITS_TO_INDEX = np.zeros(13, np.uint8)
_UNITS_TO_INDEX[_E2M1_UNITS] = np.arange(8, dtype=np.uint8)


def to_codes(q: jnp.ndarray, fmt: str | Format) -> jnp.ndarray:
  """Integer values int8 -> 4-bit codes uint8 in [0, 15] (see the module docstring)."""
  fmt = get_format(fmt)
  if fmt.name == "nvfp4":
    mag = jnp.asarray(_UNITS_TO_INDEX)[jnp.abs(q.astype(jnp.int32))]
    return jnp.where(q < 0, mag | 8, mag).astype(jnp.uint8)
  return (q.astype(jnp.int32) & 0xF).astype(jnp.uint8)


def from_codes(codes: jnp.ndarray, fmt: str | Format) -> jnp.ndarray:
  """4-bit codes uint8 [0, 15] -> integer values int8."""
  fmt = get_format(fmt)
  c = codes.astype(jnp.int32)
  if fmt.name == "nvfp4":
    mag = jnp.asarray(_E2M1_UNITS.astype(np.int32))[c & 7]
    return jnp.where(c & 8, -mag, mag).astype(jnp.int8)
  if fmt.qmin < 0:
    c = jnp.where(c >= 8, c - 16, c)  # two's complement nibble
  return c.astype(jnp.int8)


def pack(q: jnp.ndarray, fmt: str | Format) -> jnp.ndarray:
  """int8 [..., K] -> uint8 [..., K // 2] in the block layout of the module docstring."""
  fmt = get_format(fmt)
  if not fmt.packed:
    raise ValueError(f"format {fmt.name} is not packed")
  *lead, k = q.shape
  if k % PACK_BLOCK:
    raise ValueError(f"cannot pack a last axis of {k}: not a multiple of {PACK_BLOCK}")
  codes = to_codes(q, fmt).reshape(*lead, k // PACK_BLOCK, 2, PACK_BLOCK // 2)
  lo, hi = codes[..., 0, :], codes[..., 1, :]
  return (lo | (hi << 4)).astype(jnp.uint8).reshape(*lead, k // 2)


def _nibbles(packed: jnp.ndarray, axis: int) -> jnp.ndarray:
  """uint8 [...] -> uint8 with a new axis of 2 at ``axis`` (negative): each byte's low
  nibble, then its high one. One broadcast shift rather than a concatenation of the two
  halves: XLA's CPU compiler, splitting that concatenation over more than 2 threads, spent
  minutes in LLVM (2026-12-03)."""
  shifts = np.array([0, 4], np.uint8).reshape((2,) + (1,) * (-axis - 1))
  return (jnp.expand_dims(packed, axis) >> shifts) & 0xF


def unpack(packed: jnp.ndarray, fmt: str | Format) -> jnp.ndarray:
  """uint8 [..., K // 2] -> int8 [..., K], inverse of ``pack``."""
  *lead, kb = packed.shape
  blocks = packed.reshape(*lead, kb // (PACK_BLOCK // 2), PACK_BLOCK // 2)
  return from_codes(_nibbles(blocks, axis=-2), fmt).reshape(*lead, 2 * kb)


def pack_multipliers(m: jnp.ndarray) -> jnp.ndarray:
  """int4_2l multipliers (integers 1..16, any dtype) [..., G] -> uint8 [..., ceil(G/2)]:
  ``m - 1`` of group 2i in the low nibble of byte i, of group 2i + 1 in its high nibble (an
  odd G leaves the last high nibble 0)."""
  c = (m.astype(jnp.int32) - 1).astype(jnp.uint8)
  if c.shape[-1] % 2:
    c = jnp.concatenate([c, jnp.zeros((*c.shape[:-1], 1), jnp.uint8)], axis=-1)
  return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_multipliers(packed: jnp.ndarray, groups: int) -> jnp.ndarray:
  """uint8 [..., ceil(G/2)] -> int32 multipliers [..., G] in 1..16, inverse of
  ``pack_multipliers``."""
  m = _nibbles(packed, axis=-1).reshape(*packed.shape[:-1], -1)[..., :groups]
  return m.astype(jnp.int32) + 1
