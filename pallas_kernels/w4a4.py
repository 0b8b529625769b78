"""Fused W4A4 linear on int8 tensor cores (Pallas, Triton backend).

Hopper has no 4-bit MMA, but INT4 values [-8, 7] (and unsigned [0, 15]) are exact in int8,
so the W4A4 product runs exactly on int8 tensor cores:

  activation kernel, one pass over X [M, K] (bf16), one program per (row block, K chunk):
      x_hat = X / lambda                                    (f32)
      per row and 64-group:  s = absmax / 7,  q = clip(round(x_hat / s), -8, 7)
      packed [M, K/2] uint8, scales [M, K/64] f32
      lr = sum over chunks of x_hat[:, chunk] @ L_down[chunk]  [M, r]  (bf16 operands, f32)
  GEMM kernel, per (BM x BN) output tile, over K one 64-group at a time:
      unpack the two nibble halves of A and W tiles to int8 (see ``formats``: a 64-block's
      low nibbles hold its first 32 elements, the high nibbles the last 32, so each half
      is contiguous and the group's dot is lo.lo^T + hi.hi^T)
      acc += f32(int32 dot) * s_a[m, g] * s_w[n, g]
      epilogue: acc += bf16(lr) @ L_up + bias, stored in the output dtype.

Ragged M is handled inside the kernels with row masks (no padding copies). K must be a
multiple of 64 and N of ``block_n``. Formats: INT4 weights with INT4 or UINT4 activations;
NVFP4 layers use the jnp reference for now.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from svdq_jax import formats
from svdq_jax.pallas_kernels import w4a4_hopper

GROUP = formats.PACK_BLOCK   # 64: one INT4 group = one packing block
HALF = GROUP // 2            # 32 bytes per group and row
SUPPORTED_ACT_FORMATS = ("int4", "uint4")
_MIN_DOT = 16                # smallest dot dimension Triton accepts


def _unpack(b: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array]:
  """uint8 [R, 32] -> (low nibbles, high nibbles) as int8 [R, 32] values."""
  if signed:
    s = b.astype(jnp.int8)
    return (jax.lax.shift_right_arithmetic(jax.lax.shift_left(s, jnp.int8(4)), jnp.int8(4)),
            jax.lax.shift_right_arithmetic(s, jnp.int8(4)))
  return (b & 0xF).astype(jnp.int8), (b >> 4).astype(jnp.int8)


def _asm(instruction: str, *args: jax.Array) -> jax.Array:
  """One f32 PTX instruction applied elementwise: ``instruction $0, $1, ...;``."""
  args = jnp.broadcast_arrays(*args)
  operands = ", ".join(f"${i}" for i in range(len(args) + 1))
  return plgpu.elementwise_inline_asm(
      f"{instruction} {operands};", args=list(args),
      constraints=",".join(["=f"] + ["f"] * len(args)), pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.float32)])[0]


def _div(a: jax.Array, b: jax.Array, interpret: bool) -> jax.Array:
  """Correctly rounded f32 a / b, as XLA divides (Triton lowers ``/`` to the approximate
  div.full.f32, which would make codes differ from the reference near rounding ties)."""
  if interpret:
    return a / b
  return _asm("div.rn.f32", a, b)


def _round_half_even(v: jax.Array, interpret: bool) -> jax.Array:
  """jnp.round (to nearest, ties to even); the Triton lowering has no round primitive."""
  if interpret:
    return jnp.round(v)
  return _asm("cvt.rni.f32.f32", v)


def _quantize_half(v: jax.Array, scale: jax.Array, signed: bool, interpret: bool) -> jax.Array:
  """f32 [R, 32], scale f32 [R] -> 4-bit codes int32 [R, 32] (same rounding as formats)."""
  q = _round_half_even(_div(v, jnp.where(scale == 0, 1.0, scale)[:, None], interpret),
                       interpret)
  q = jnp.clip(q, -8, 7) if signed else jnp.clip(q, 0, 15)
  return q.astype(jnp.int32)


def _nibbles(q: jax.Array) -> jax.Array:
  return (q & 0xF).astype(jnp.uint8)


def _act_kernel(x_ref, smooth_ref, down_ref, q_ref, s_ref, lr_ref, *, m, signed, has_lr,
                codes, interpret):
  """One (row block, K chunk) program: quantizes the chunk's groups (packed, or as int8
  codes with transposed scales when ``codes``) and writes the chunk's partial low-rank
  product x_hat[:, chunk] @ L_down[chunk]."""
  bm, kc = x_ref.shape
  rows = pl.program_id(0) * bm + jnp.arange(bm)
  row_ok = (rows < m)[:, None]
  qmax = 7.0 if signed else 15.0

  def body(g, lr):
    lo_cols, hi_cols = pl.ds(g * GROUP, HALF), pl.ds(g * GROUP + HALF, HALF)
    lo = plgpu.load(x_ref.at[:, lo_cols], mask=row_ok, other=0).astype(jnp.float32)
    hi = plgpu.load(x_ref.at[:, hi_cols], mask=row_ok, other=0).astype(jnp.float32)
    if smooth_ref is not None:
      lo = _div(lo, smooth_ref[lo_cols][None, :], interpret)
      hi = _div(hi, smooth_ref[hi_cols][None, :], interpret)
    if signed:
      amax = jnp.maximum(jnp.max(jnp.abs(lo), axis=1), jnp.max(jnp.abs(hi), axis=1))
    else:
      amax = jnp.maximum(jnp.max(jnp.maximum(lo, 0.0), axis=1),
                         jnp.max(jnp.maximum(hi, 0.0), axis=1))
    scale = _div(amax, jnp.full_like(amax, qmax), interpret)
    q_lo = _quantize_half(lo, scale, signed, interpret)
    q_hi = _quantize_half(hi, scale, signed, interpret)
    if codes:
      plgpu.store(q_ref.at[:, lo_cols], q_lo.astype(jnp.int8), mask=row_ok)
      plgpu.store(q_ref.at[:, hi_cols], q_hi.astype(jnp.int8), mask=row_ok)
      plgpu.store(s_ref.at[g], scale, mask=row_ok[:, 0])
    else:
      plgpu.store(q_ref.at[:, pl.ds(g * HALF, HALF)], _nibbles(q_lo) | (_nibbles(q_hi) << 4),
                  mask=row_ok)
      plgpu.store(s_ref.at[:, g], scale, mask=row_ok[:, 0])
    if has_lr:
      lr += plgpu.dot(lo.astype(jnp.bfloat16), down_ref[lo_cols, :])
      lr += plgpu.dot(hi.astype(jnp.bfloat16), down_ref[hi_cols, :])
    return lr

  lr = jax.lax.fori_loop(0, kc // GROUP, body,
                         jnp.zeros((bm, lr_ref.shape[1] if has_lr else 1), jnp.float32))
  if has_lr:
    plgpu.store(lr_ref, lr, mask=row_ok)


def _groups_per_program(groups: int, target: int) -> int:
  """The largest divisor of ``groups`` not above ``target`` (K chunk size, in groups)."""
  return max(d for d in range(1, min(groups, max(target, 1)) + 1) if groups % d == 0)


def _pad_rank(a: jax.Array, axis: int) -> jax.Array:
  """Zero-pads the rank axis up to a multiple of 16 (Triton's smallest dot size)."""
  r = a.shape[axis]
  extra = -r % _MIN_DOT
  if not extra:
    return a
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, extra)
  return jnp.pad(a, pad)


def _check_k(k: int) -> None:
  if k % GROUP:
    raise ValueError(f"W4A4 kernels need K to be a multiple of {GROUP}, got K={k}")


@functools.partial(jax.jit, static_argnames=("act_format", "codes", "block_m", "num_warps",
                                              "num_stages", "groups_per_program", "interpret"))
def quantize_act(x: jax.Array, smooth: jax.Array | None, down: jax.Array | None, *,
                 act_format: str = "int4", codes: bool = False, block_m: int = 32,
                 num_warps: int = 4, num_stages: int = 2, groups_per_program: int = 8,
                 interpret: bool = False):
  """Activation kernel: one pass over x.

  The grid is (row blocks, K chunks of ``groups_per_program`` 64-groups, reduced to a
  divisor of K/64): each program quantizes its chunk and writes its partial low-rank product;
  the partials (f32 [M, chunks, r], a few % of x's bytes) are summed afterwards.

  Args:
    x: [M, K] (bf16 or f32). smooth: f32 [K] or None. down: bf16 [K, r] or None.
    act_format: 'int4' or 'uint4'.
    codes: instead of packed codes and [M, K/64] scales, return int8 codes [M, K] and f32
      scales [K/64, M]: the operands of the Hopper GEMM (``w4a4_hopper.w4a4_gemm_t``).
    block_m, num_warps, num_stages, groups_per_program: tiling; the defaults were the
      fastest measured on the H100 (docs/benchmarks/2026-11-22-act-kernel-sweep-h100.log).

  Returns:
    (packed uint8 [M, K/2], scales f32 [M, K/64], lr f32 [M, r] or None): identical to
    ``formats.pack(formats.quantize(x / smooth, act_format))`` and, up to f32 summation
    order, ``qlinear.lowrank_down(x / smooth, down)``. With ``codes``: (int8 [M, K],
    f32 [K/64, M], lr), the same codes unpacked and the scales transposed.
  """
  if act_format not in SUPPORTED_ACT_FORMATS:
    raise ValueError(f"activation kernel supports {SUPPORTED_ACT_FORMATS}, got {act_format!r}")
  m, k = x.shape
  _check_k(k)
  r = 0 if down is None else down.shape[1]
  down_p = None if down is None else _pad_rank(down.astype(jnp.bfloat16), 1)
  rp = 0 if down_p is None else down_p.shape[1]
  gpp = _groups_per_program(k // GROUP, groups_per_program)
  chunks = k // GROUP // gpp
  lr_cols = max(rp, 1)
  grid = (pl.cdiv(m, block_m), chunks)
  tile = lambda cols: pl.BlockSpec((block_m, cols), lambda i, j: (i, j))
  in_specs = [tile(gpp * GROUP)]
  if smooth is not None:
    in_specs.append(pl.BlockSpec((gpp * GROUP,), lambda i, j: (j,)))
  if down_p is not None:
    in_specs.append(pl.BlockSpec((gpp * GROUP, rp), lambda i, j: (j, 0)))
  if codes:
    out_shape = [jax.ShapeDtypeStruct((m, k), jnp.int8),
                 jax.ShapeDtypeStruct((k // GROUP, m), jnp.float32)]
    out_specs = [tile(gpp * GROUP), pl.BlockSpec((gpp, block_m), lambda i, j: (j, i))]
  else:
    out_shape = [jax.ShapeDtypeStruct((m, k // 2), jnp.uint8),
                 jax.ShapeDtypeStruct((m, k // GROUP), jnp.float32)]
    out_specs = [tile(gpp * HALF), tile(gpp)]
  out_shape.append(jax.ShapeDtypeStruct((m, chunks * lr_cols), jnp.float32))
  out_specs.append(tile(lr_cols))
  kernel = functools.partial(_act_kernel, m=m, signed=act_format == "int4", has_lr=r > 0,
                             codes=codes, interpret=interpret)
  args = [x] + [a for a in (smooth, down_p) if a is not None]

  def wrapped(x_ref, *refs):
    it = iter(refs)
    smooth_ref = next(it) if smooth is not None else None
    down_ref = next(it) if down_p is not None else None
    q_ref, s_ref, lr_ref = it
    kernel(x_ref, smooth_ref, down_ref, q_ref, s_ref, lr_ref)

  q, s, lr = pl.pallas_call(
      wrapped, grid=grid, in_specs=in_specs, out_shape=out_shape,
      out_specs=out_specs,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="svdq_quantize_act")(*args)
  if not r:
    return q, s, None
  return q, s, lr.reshape(m, chunks, rp).sum(axis=1)[:, :r]


def _gemm_kernel(a_ref, sa_ref, w_ref, sw_ref, lr_ref, up_ref, bias_ref, o_ref, *, m,
                 act_signed, groups_per_step):
  bm, kh = a_ref.shape
  bn = w_ref.shape[0]
  rows = pl.program_id(0) * bm + jnp.arange(bm)
  row_ok = (rows < m)[:, None]

  def group(g, acc):
    cols = pl.ds(g * HALF, HALF)
    a_lo, a_hi = _unpack(plgpu.load(a_ref.at[:, cols], mask=row_ok, other=0), act_signed)
    w_lo, w_hi = _unpack(w_ref[:, cols], True)
    part = plgpu.dot(a_lo, w_lo, trans_b=True) + plgpu.dot(a_hi, w_hi, trans_b=True)
    sa = plgpu.load(sa_ref.at[:, g], mask=row_ok[:, 0], other=0.0)
    sw = sw_ref[:, g].astype(jnp.float32)
    return acc + part.astype(jnp.float32) * sa[:, None] * sw[None, :]

  def step(i, acc):  # several groups per loop iteration, in K order
    for j in range(groups_per_step):
      acc = group(i * groups_per_step + j, acc)
    return acc

  acc = jax.lax.fori_loop(0, kh // HALF // groups_per_step, step,
                          jnp.zeros((bm, bn), jnp.float32))
  if lr_ref is not None:
    lr = plgpu.load(lr_ref, mask=row_ok, other=0.0).astype(jnp.bfloat16)
    acc += plgpu.dot(lr, up_ref[...])
  if bias_ref is not None:
    acc += bias_ref[...].astype(jnp.float32)[None, :]
  plgpu.store(o_ref, acc.astype(o_ref.dtype), mask=row_ok)


@functools.partial(jax.jit, static_argnames=("act_format", "out_dtype", "block_m", "block_n",
                                              "num_warps", "num_stages", "groups_per_step",
                                              "interpret"))
def w4a4_gemm(a_packed, a_scale, w_packed, w_scale, lr=None, up=None, bias=None, *,
              act_format: str = "int4", out_dtype=jnp.bfloat16, block_m: int = 64,
              block_n: int = 128, num_warps: int = 4, num_stages: int = 4,
              groups_per_step: int = 1, interpret: bool = False):
  """GEMM kernel: Y = dequant(A) dequant(W)^T + bf16(lr) @ up + bias.

  Args:
    a_packed: uint8 [M, K/2]; a_scale: f32 [M, K/64] (from ``quantize_act``).
    w_packed: uint8 [N, K/2] INT4; w_scale: [N, K/64] (bf16).
    lr: f32 [M, r] or None; up: [r, N] or None; bias: [N] or None.
    block_m, block_n, num_warps, num_stages: tiling (defaults: the fastest measured on the
      H100, docs/benchmarks/); groups_per_step: K-groups per loop iteration (reduced to a
      divisor of the group count).

  Returns:
    [M, N] in out_dtype, equal to ``qlinear.apply``'s arithmetic up to f32 rounding order.
  """
  m, kh = a_packed.shape
  n = w_packed.shape[0]
  _check_k(2 * kh)
  if w_packed.shape[1] != kh:
    raise ValueError(f"weights [N, K/2] = {w_packed.shape} do not match activations "
                     f"[M, K/2] = {a_packed.shape}")
  block_n = min(block_n, n)
  if n % block_n:
    raise ValueError(f"N={n} is not a multiple of block_n={block_n}")
  groups = 2 * kh // GROUP
  groups_per_step = math.gcd(groups_per_step, groups)
  grid = (pl.cdiv(m, block_m), n // block_n)
  rows = lambda cols: pl.BlockSpec((block_m, cols), lambda i, j: (i, 0))
  cols_of_n = lambda r: pl.BlockSpec((r, block_n), lambda i, j: (0, j))
  n_rows = lambda cols: pl.BlockSpec((block_n, cols), lambda i, j: (j, 0))
  args = [a_packed, a_scale, w_packed, w_scale]
  specs = [rows(kh), rows(groups), n_rows(kh), n_rows(groups)]
  if lr is not None:
    lr_p, up_p = _pad_rank(lr, 1), _pad_rank(up.astype(jnp.bfloat16), 0)
    args += [lr_p, up_p]
    specs += [rows(lr_p.shape[1]), cols_of_n(up_p.shape[0])]
  if bias is not None:
    args.append(bias)
    specs.append(pl.BlockSpec((block_n,), lambda i, j: (j,)))

  def wrapped(a_ref, sa_ref, w_ref, sw_ref, *refs):
    it = iter(refs)
    lr_ref, up_ref = (next(it), next(it)) if lr is not None else (None, None)
    bias_ref = next(it) if bias is not None else None
    o_ref, = it
    _gemm_kernel(a_ref, sa_ref, w_ref, sw_ref, lr_ref, up_ref, bias_ref, o_ref, m=m,
                 act_signed=act_format == "int4", groups_per_step=groups_per_step)

  return pl.pallas_call(
      wrapped, grid=grid, in_specs=specs,
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="svdq_w4a4_gemm")(*args)


def supports(weight_format: str, act_format: str | None) -> bool:
  """Whether a layer with these formats runs on the kernels."""
  return weight_format == "int4" and act_format in SUPPORTED_ACT_FORMATS


GEMM_KERNELS = ("auto", "triton", "hopper")
_gemm_choice = "auto"


def set_gemm_kernel(name: str) -> None:
  """Which GEMM kernel ``w4a4_linear`` uses: 'hopper' (Mosaic GPU, wgmma; Hopper GPUs),
  'triton', or 'auto' (hopper on a Hopper GPU where the shape allows, else triton)."""
  global _gemm_choice
  if name not in GEMM_KERNELS:
    raise ValueError(f"GEMM kernel must be one of {GEMM_KERNELS}, got {name!r}")
  _gemm_choice = name


def hopper_gemm(m: int, k: int, n: int, interpret: bool) -> bool:
  """Whether ``w4a4_linear`` runs this problem's GEMM on the Hopper kernel."""
  if _gemm_choice == "triton" or not w4a4_hopper.supports(m, k, n):
    return False
  return _gemm_choice == "hopper" or (not interpret and w4a4_hopper.on_hopper())


def w4a4_linear(layer, x: jax.Array, bias: jax.Array | None = None, *,
                interpret: bool = False) -> jax.Array:
  """A QuantizedLinear's forward pass on the two kernels. x [..., K] -> [..., N] (x.dtype)."""
  if not supports(layer.weight_format, layer.act_format):
    raise ValueError(f"no W4A4 kernel for weights {layer.weight_format!r} with activations "
                     f"{layer.act_format!r}; supported: int4 weights, {SUPPORTED_ACT_FORMATS}")
  lead, k = x.shape[:-1], x.shape[-1]
  bias = layer.bias if bias is None else bias
  x2 = x.reshape(-1, k)
  hopper = hopper_gemm(x2.shape[0], k, layer.out_features, interpret)
  # the Hopper GEMM takes int8 codes and transposed scales (``codes``), Triton packed ones
  q, s, lr = quantize_act(x2, layer.smooth, layer.lora_down, act_format=layer.act_format,
                          codes=hopper, interpret=interpret)
  if hopper:
    y = w4a4_hopper.gemm(q, s, layer.qweight, layer.wscale, lr, layer.lora_up, bias,
                         out_dtype=x.dtype, interpret=interpret)
  else:
    y = w4a4_gemm(q, s, layer.qweight, layer.wscale, lr, layer.lora_up, bias,
                  act_format=layer.act_format, out_dtype=x.dtype, interpret=interpret)
  return y.reshape(*lead, layer.out_features)
