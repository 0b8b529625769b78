"""Fused W4A4 linear on tensor cores (Pallas, Triton backend).

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

NVFP4 (E2M1 values, groups of 16, f32 activation scales, E4M3 weight scales times a
per-channel f32 scale) takes the same two passes with 16-groups: a 64-block's low nibbles
hold groups 0 and 1, its high nibbles groups 2 and 3. The int8 MMA's K step is 32, two
NVFP4 groups with different scales, so the GEMM runs each 16-group as a bf16 MMA with the
weight scale folded into the weights: an E2M1 value (2 significant bits) times an E4M3
scale (4) is exact in bf16, so each group's partial sum_k a_k (w_k s_w) = s_w (a . w) is
exact in f32, and only the activation scale is applied per group:
      acc += dot(bf16(2 a), bf16(2 w * s_w[n, g])) * s_a[m, g]
      epilogue: acc * s_channel[n] / 4, then the low-rank branch and bias as above.

Ragged M is handled inside the kernels with row masks (no padding copies). K must be a
multiple of 64 and N of ``block_n``. Formats: INT4 weights with INT4 or UINT4 activations,
NVFP4 weights with NVFP4 activations.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from svdq_jax import formats, qlinear
from svdq_jax.pallas_kernels import w4a4_hopper

GROUP = formats.PACK_BLOCK   # 64: one INT4 group = one packing block
HALF = GROUP // 2            # 32 bytes per group and row
SUPPORTED_ACT_FORMATS = ("int4", "uint4", "nvfp4")
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


def _scaled(v: jax.Array, scale: jax.Array, interpret: bool) -> jax.Array:
  """v / scale per row (f32 [R, C], scale f32 [R]), a zero scale dividing by 1."""
  return _div(v, jnp.where(scale == 0, 1.0, scale)[:, None], interpret)


def _int_codes(v: jax.Array, scale: jax.Array, signed: bool, interpret: bool) -> jax.Array:
  """INT4 / UINT4: f32 [R, C] -> values int32 [R, C] (same rounding as ``formats``)."""
  q = _round_half_even(_scaled(v, scale, interpret), interpret)
  q = jnp.clip(q, -8, 7) if signed else jnp.clip(q, 0, 15)
  return q.astype(jnp.int32)


def _e2m1_codes(v: jax.Array, scale: jax.Array, interpret: bool) -> jax.Array:
  """NVFP4: f32 [R, C] -> E2M1 nibble codes int32 [R, C] (``formats.quantize`` then
  ``formats.to_codes``): the magnitude rounds to the E2M1 grid with ties to the even code,
  bit 3 is the sign of a nonzero value."""
  y = _scaled(v, scale, interpret)
  units = formats.round_e2m1_units(  # in halves: 0, 1, 2, 3, 4, 6, 8, 12
      jnp.abs(y), lambda t: _round_half_even(t, interpret)).astype(jnp.int32)
  # formats' table lookups (to_codes, from_codes) as selects: Triton has no gather
  index = jnp.where(units <= 4, units, jnp.where(units == 6, 5, jnp.where(units == 8, 6, 7)))
  return index | jnp.where((y < 0) & (units > 0), 8, 0)


def _e2m1_values(codes: jax.Array) -> jax.Array:
  """E2M1 nibble codes [R, C] (any int dtype, 0..15) -> values in halves, f32 [R, C]."""
  c = codes.astype(jnp.int32)
  index = c & 7
  units = jnp.where(index <= 4, index, jnp.where(index == 5, 6, jnp.where(index == 6, 8, 12)))
  return jnp.where((c & 8) != 0, -units, units).astype(jnp.float32)


def _nibbles(q: jax.Array) -> jax.Array:
  return (q & 0xF).astype(jnp.uint8)


def _act_kernel(x_ref, smooth_ref, down_ref, q_ref, s_ref, lr_ref, *, m, act_format, has_lr,
                codes, interpret):
  """One (row block, K chunk) program: quantizes the chunk's groups (packed, or as int8
  codes with transposed scales when ``codes``) and writes the chunk's partial low-rank
  product x[:, chunk] @ L_down[chunk] (``down_ref`` holds L_down / lambda).

  Each 64-block is read as ``parts`` column slices: two halves for INT4 / UINT4 (one group),
  four quarters for NVFP4 (a group each). Part i and part i + parts/2 share the bytes of
  the packed block (low and high nibbles)."""
  bm, kc = x_ref.shape
  rows = pl.program_id(0) * bm + jnp.arange(bm)
  row_ok = (rows < m)[:, None]
  nvfp4 = act_format == "nvfp4"
  parts = 4 if nvfp4 else 2
  width = GROUP // parts
  qmax = {"int4": 7.0, "uint4": 15.0, "nvfp4": 6.0}[act_format]

  def absmax(v):
    return jnp.max(jnp.maximum(v, 0.0) if act_format == "uint4" else jnp.abs(v), axis=1)

  def scale_of(amax):  # as formats: amax / qmax, correctly rounded
    return _div(amax, jnp.full_like(amax, qmax), interpret)

  def body(g, lr):
    cols = [pl.ds(g * GROUP + i * width, width) for i in range(parts)]
    raw = [plgpu.load(x_ref.at[:, c], mask=row_ok, other=0) for c in cols]
    xs = [v.astype(jnp.float32) for v in raw]
    if smooth_ref is not None:
      xs = [_div(v, smooth_ref[c][None, :], interpret) for v, c in zip(xs, cols)]
    if nvfp4:
      scales = [scale_of(absmax(v)) for v in xs]
      qs = [_e2m1_codes(v, s, interpret) for v, s in zip(xs, scales)]
    else:
      scales = [scale_of(jnp.maximum(absmax(xs[0]), absmax(xs[1])))]
      qs = [_int_codes(v, scales[0], act_format == "int4", interpret) for v in xs]
    n_groups = len(scales)
    for j, scale in enumerate(scales):
      if codes:
        plgpu.store(s_ref.at[g * n_groups + j], scale, mask=row_ok[:, 0])
      else:
        plgpu.store(s_ref.at[:, g * n_groups + j], scale, mask=row_ok[:, 0])
    if codes:
      for c, q in zip(cols, qs):
        plgpu.store(q_ref.at[:, c], q.astype(jnp.int8), mask=row_ok)
    else:
      for i in range(parts // 2):
        packed = _nibbles(qs[i]) | (_nibbles(qs[i + parts // 2]) << 4)
        plgpu.store(q_ref.at[:, pl.ds(g * HALF + i * width, width)], packed, mask=row_ok)
    if has_lr:
      for v, c in zip(raw, cols):
        lr += plgpu.dot(v.astype(jnp.bfloat16), down_ref[c, :])
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


def check_act_inputs(x: jax.Array, smooth, down) -> tuple[int, int]:
  """(M, K) of an activation kernel's x [M, K], after checking smooth [K] and down [K, r]."""
  if x.ndim != 2:
    raise ValueError(f"activation kernel takes x [M, K], got shape {x.shape}")
  m, k = x.shape
  _check_k(k)
  if smooth is not None and smooth.shape != (k,):
    raise ValueError(f"smooth must be [K] = [{k}], got {smooth.shape}")
  if down is not None and (down.ndim != 2 or down.shape[0] != k):
    raise ValueError(f"down must be [K, r] with K = {k}, got {down.shape}")
  return m, k


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
    act_format: 'int4', 'uint4' (64-groups) or 'nvfp4' (16-groups; G = K/16 below).
    codes: instead of packed codes and [M, G] scales, return int8 codes [M, K] and f32
      scales [G, M]: the operands of the Hopper GEMM (``w4a4_hopper.w4a4_gemm_t``; INT4
      and UINT4 only).
    block_m, num_warps, num_stages, groups_per_program: tiling; the defaults were the
      fastest measured on the H100 (docs/benchmarks/2026-11-22-act-kernel-sweep-h100.log).

  Returns:
    (packed uint8 [M, K/2], scales f32 [M, G], lr f32 [M, r] or None): identical to
    ``formats.pack(formats.quantize(x / smooth, act_format))`` and, up to f32 summation
    order, ``qlinear.lowrank_down(x, down, smooth)``. With ``codes``: (int8 [M, K],
    f32 [G, M], lr), the same codes unpacked and the scales transposed.
  """
  if act_format not in SUPPORTED_ACT_FORMATS:
    raise ValueError(f"activation kernel supports {SUPPORTED_ACT_FORMATS}, got {act_format!r}")
  if codes and act_format == "nvfp4":
    raise ValueError("codes=True is the Hopper INT4 GEMM's operand layout; nvfp4 activations "
                     "come packed")
  m, k = check_act_inputs(x, smooth, down)
  per_block = GROUP // formats.get_format(act_format).group_size  # scale groups per 64
  r = 0 if down is None else down.shape[1]
  down_p = None if down is None else _pad_rank(qlinear.folded_down(down, smooth), 1)
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
                 jax.ShapeDtypeStruct((m, k // GROUP * per_block), jnp.float32)]
    out_specs = [tile(gpp * HALF), tile(gpp * per_block)]
  out_shape.append(jax.ShapeDtypeStruct((m, chunks * lr_cols), jnp.float32))
  out_specs.append(tile(lr_cols))
  kernel = functools.partial(_act_kernel, m=m, act_format=act_format, has_lr=r > 0,
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


def _gemm_kernel(a_ref, sa_ref, w_ref, sw_ref, wc_ref, lr_ref, up_ref, bias_ref, o_ref, *, m,
                 act_format, groups_per_step):
  bm, kh = a_ref.shape
  bn = w_ref.shape[0]
  rows = pl.program_id(0) * bm + jnp.arange(bm)
  row_ok = (rows < m)[:, None]

  def int4_block(g, acc):  # one 64-block = one group
    cols = pl.ds(g * HALF, HALF)
    a_lo, a_hi = _unpack(plgpu.load(a_ref.at[:, cols], mask=row_ok, other=0),
                         act_format == "int4")
    w_lo, w_hi = _unpack(w_ref[:, cols], True)
    part = plgpu.dot(a_lo, w_lo, trans_b=True) + plgpu.dot(a_hi, w_hi, trans_b=True)
    sa = plgpu.load(sa_ref.at[:, g], mask=row_ok[:, 0], other=0.0)
    sw = sw_ref[:, g].astype(jnp.float32)
    return acc + part.astype(jnp.float32) * sa[:, None] * sw[None, :]

  def nvfp4_block(g, acc):  # one 64-block = four 16-groups, in K order
    quarter = HALF // 2
    for i in range(4):  # group i: bytes [16 (i % 2), + 16), low nibbles if i < 2, else high
      cols = pl.ds(g * HALF + (i % 2) * quarter, quarter)
      shift = 0 if i < 2 else 4
      a = _e2m1_values(plgpu.load(a_ref.at[:, cols], mask=row_ok, other=0) >> shift)
      w = _e2m1_values(w_ref[:, cols] >> shift)
      sw = sw_ref[:, 4 * g + i].astype(jnp.float32)
      part = plgpu.dot(a.astype(jnp.bfloat16), (w * sw[:, None]).astype(jnp.bfloat16),
                       trans_b=True)  # exact: see the module docstring
      sa = plgpu.load(sa_ref.at[:, 4 * g + i], mask=row_ok[:, 0], other=0.0)
      acc = acc + part * sa[:, None]
    return acc

  block = nvfp4_block if act_format == "nvfp4" else int4_block

  def step(i, acc):  # several 64-blocks per loop iteration, in K order
    for j in range(groups_per_step):
      acc = block(i * groups_per_step + j, acc)
    return acc

  acc = jax.lax.fori_loop(0, kh // HALF // groups_per_step, step,
                          jnp.zeros((bm, bn), jnp.float32))
  if wc_ref is not None:  # NVFP4: the per-channel scale and the two 1/2 steps
    acc = acc * (wc_ref[...] * 0.25)[None, :]
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
              w_channel_scale=None, act_format: str = "int4", out_dtype=jnp.bfloat16,
              block_m: int = 64, block_n: int = 128, num_warps: int = 4, num_stages: int = 4,
              groups_per_step: int = 1, interpret: bool = False):
  """GEMM kernel: Y = dequant(A) dequant(W)^T + bf16(lr) @ up + bias.

  Args:
    a_packed: uint8 [M, K/2]; a_scale: f32 [M, G] (from ``quantize_act``), G = K/64 for
      act_format 'int4' / 'uint4' (INT4 weights), K/16 for 'nvfp4' (NVFP4 weights).
    w_packed: uint8 [N, K/2]; w_scale: [N, G] (bf16 for INT4, float8_e4m3fn for NVFP4).
    lr: f32 [M, r] or None; up: [r, N] or None; bias: [N] or None.
    w_channel_scale: f32 [N], NVFP4's per-channel weight scale (required for it).
    block_m, block_n, num_warps, num_stages: tiling (defaults: the fastest measured on the
      H100, docs/benchmarks/); groups_per_step: 64-blocks per loop iteration (reduced to a
      divisor of their count).

  Returns:
    [M, N] in out_dtype, equal to ``qlinear.apply``'s arithmetic up to f32 rounding order.
  """
  if act_format not in SUPPORTED_ACT_FORMATS:
    raise ValueError(f"GEMM kernel supports activations {SUPPORTED_ACT_FORMATS}, got "
                     f"{act_format!r}")
  m, kh = a_packed.shape
  n = w_packed.shape[0]
  _check_k(2 * kh)
  if w_packed.shape[1] != kh:
    raise ValueError(f"weights [N, K/2] = {w_packed.shape} do not match activations "
                     f"[M, K/2] = {a_packed.shape}")
  groups = 2 * kh // formats.get_format(act_format).group_size
  if a_scale.shape != (m, groups) or w_scale.shape != (n, groups):
    raise ValueError(f"{act_format} scales must be [M, {groups}] and [N, {groups}], got "
                     f"{a_scale.shape} and {w_scale.shape}")
  nvfp4 = act_format == "nvfp4"
  if nvfp4 != (w_channel_scale is not None):
    raise ValueError("w_channel_scale [N] is required for nvfp4 and only for it")
  block_n = min(block_n, n)
  if n % block_n:
    raise ValueError(f"N={n} is not a multiple of block_n={block_n}")
  blocks = 2 * kh // GROUP
  groups_per_step = math.gcd(groups_per_step, blocks)
  grid = (pl.cdiv(m, block_m), n // block_n)
  rows = lambda cols: pl.BlockSpec((block_m, cols), lambda i, j: (i, 0))
  cols_of_n = lambda r: pl.BlockSpec((r, block_n), lambda i, j: (0, j))
  n_rows = lambda cols: pl.BlockSpec((block_n, cols), lambda i, j: (j, 0))
  n_vector = pl.BlockSpec((block_n,), lambda i, j: (j,))
  if nvfp4:  # E4M3 -> f32 here: exact, and the kernel then reads one dtype everywhere
    w_scale = w_scale.astype(jnp.float32)
  args = [a_packed, a_scale, w_packed, w_scale]
  specs = [rows(kh), rows(groups), n_rows(kh), n_rows(groups)]
  if nvfp4:
    args.append(w_channel_scale.astype(jnp.float32))
    specs.append(n_vector)
  if lr is not None:
    lr_p, up_p = _pad_rank(lr, 1), _pad_rank(up.astype(jnp.bfloat16), 0)
    args += [lr_p, up_p]
    specs += [rows(lr_p.shape[1]), cols_of_n(up_p.shape[0])]
  if bias is not None:
    args.append(bias)
    specs.append(n_vector)

  def wrapped(a_ref, sa_ref, w_ref, sw_ref, *refs):
    it = iter(refs)
    wc_ref = next(it) if nvfp4 else None
    lr_ref, up_ref = (next(it), next(it)) if lr is not None else (None, None)
    bias_ref = next(it) if bias is not None else None
    o_ref, = it
    _gemm_kernel(a_ref, sa_ref, w_ref, sw_ref, wc_ref, lr_ref, up_ref, bias_ref, o_ref, m=m,
                 act_format=act_format, groups_per_step=groups_per_step)

  return pl.pallas_call(
      wrapped, grid=grid, in_specs=specs,
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="svdq_w4a4_gemm")(*args)


def _block_n(n: int, largest: int = 128) -> int:
  """The Triton GEMM's output-feature tile for N: the largest power of two up to
  ``largest`` (the measured default) that divides N, at least 16 (Triton's smallest dot)."""
  block = largest
  while n % block and block > _MIN_DOT:
    block //= 2
  if n % block:
    raise ValueError(f"W4A4 kernels need N to be a multiple of {_MIN_DOT}, got N={n}")
  return block


# The Triton GEMM's tiling per weight format, the fastest of the configs swept on the H100
# at 4608 x 3072 -> 12288 (INT4: docs/benchmarks/2026-11-22-w4a4-h100-v3.md; NVFP4, where
# 128 x 128 with 8 warps was 9% faster than INT4's 64 x 128 with 4:
# docs/benchmarks/2026-11-23-w4a4-nvfp4-triton-h100.log)
TRITON_GEMM_TILING = {
    "int4": dict(block_m=64, num_warps=4, num_stages=4, groups_per_step=1),
    "nvfp4": dict(block_m=128, num_warps=8, num_stages=4, groups_per_step=2),
}

# (weight format, activation formats) pairs the kernels run; the row-scaled pairs run on
# the Hopper int8 GEMM only (``int8_hopper``)
KERNEL_FORMATS = {"int4": ("int4", "uint4"), "nvfp4": ("nvfp4",),
                  "int4_2l": ("int8", "int4_2l"), "int8": ("int8",)}


def supports(weight_format: str, act_format: str | None) -> bool:
  """Whether a layer with these formats runs on the kernels."""
  return act_format in KERNEL_FORMATS.get(weight_format, ())


def row_scaled(weight_format: str) -> bool:
  """Whether a layer's GEMM is the row-scaled int8 one (``int8_hopper``)."""
  return weight_format in formats.ROW_SCALED


GEMM_KERNELS = ("auto", "triton", "hopper")
_gemm_choice = "auto"


def set_gemm_kernel(name: str) -> None:
  """Which GEMM kernel ``w4a4_linear`` uses for INT4 layers: 'hopper' (Mosaic GPU, wgmma;
  Hopper GPUs), 'triton', or 'auto' (hopper on a Hopper GPU where the shape allows, else
  triton). NVFP4 layers always use the Triton GEMM."""
  global _gemm_choice
  if name not in GEMM_KERNELS:
    raise ValueError(f"GEMM kernel must be one of {GEMM_KERNELS}, got {name!r}")
  _gemm_choice = name


def hopper_gemm(m: int, k: int, n: int, interpret: bool, weight_format: str = "int4") -> bool:
  """Whether ``w4a4_linear`` runs this problem's GEMM on the Hopper kernel."""
  if (_gemm_choice == "triton" or weight_format != "int4"
      or not w4a4_hopper.supports(m, k, n)):
    return False
  return _gemm_choice == "hopper" or (not interpret and w4a4_hopper.on_hopper())


def w4a4_linear(layer, x: jax.Array, bias: jax.Array | None = None, *,
                gelu_from: int | None = None, feeds=None, residual=None,
                interpret: bool = False):
  """A QuantizedLinear's forward pass on the two kernels. x [..., K] -> [..., N] (x.dtype);
  with ``gelu_from``, an applied ``qlinear.Gelu`` where the GEMM computed the GELU
  (``row_scaled_linear``; ``feeds``: its ``feeds``); with ``residual`` (r, gate),
  ``qlinear.residual_sum(r, gate, y)``, in the W4A8 GEMM's epilogue where one gate row
  serves every token (``row_scaled_linear``)."""
  if not supports(layer.weight_format, layer.act_format):
    raise ValueError(f"no W4A4 kernel for weights {layer.weight_format!r} with activations "
                     f"{layer.act_format!r}; supported (weights: activations): "
                     f"{KERNEL_FORMATS}")
  bias = layer.bias if bias is None else bias
  n = layer.out_features
  if row_scaled(layer.weight_format):  # reads input parts (qlinear.Gelu) where they lie
    lead = qlinear.input_parts(x)[0].x.shape[:-1]
    one_gate = residual is not None and math.prod(jnp.shape(residual[1])) == n
    y = row_scaled_linear(layer, qlinear.map_parts(x, lambda a: a.reshape(-1, a.shape[-1])),
                          bias, gelu_from=gelu_from, feeds=feeds, interpret=interpret,
                          residual=((residual[0].reshape(-1, n), residual[1].reshape(n))
                                    if one_gate else None))
    y = qlinear.map_parts(y, lambda a: a.reshape(*lead, a.shape[-1]))
    return y if residual is None or one_gate else qlinear.residual_sum(*residual, y)
  x = qlinear.join(x)
  lead, k = x.shape[:-1], x.shape[-1]
  x2 = x.reshape(-1, k)
  hopper = hopper_gemm(x2.shape[0], k, layer.out_features, interpret, layer.weight_format)
  # the Hopper GEMM takes int8 codes and transposed scales (``codes``), Triton packed ones
  q, s, lr = quantize_act(x2, layer.smooth, layer.lora_down, act_format=layer.act_format,
                          codes=hopper, interpret=interpret)
  if hopper:
    y = w4a4_hopper.gemm(q, s, layer.qweight, layer.wscale, lr, layer.lora_up, bias,
                         out_dtype=x.dtype, interpret=interpret)
  else:
    y = w4a4_gemm(q, s, layer.qweight, layer.wscale, lr, layer.lora_up, bias,
                  w_channel_scale=layer.wcscale, act_format=layer.act_format,
                  out_dtype=x.dtype, block_n=_block_n(layer.out_features), interpret=interpret,
                  **TRITON_GEMM_TILING[layer.weight_format])
  y = y.reshape(*lead, layer.out_features)
  return y if residual is None else qlinear.residual_sum(*residual, y)


ACT_KERNELS = ("pallas", "xla", "wide_k")
_act_choice = "wide_k"  # FLUX.1-dev step and loop fastest, H200 (docs/benchmarks, 2026-12-03)


def act_kernel() -> str:
  """The activation path of row-scaled layers now (``set_act_kernel``)."""
  return _act_choice


def set_act_kernel(name: str) -> None:
  """How row-scaled layers quantize activations: 'pallas' (``act_rowscaled.quantize_rows``),
  'xla' (its jnp definition, left to XLA's fusions, which can also fuse the op before), or
  'wide_k' (the Pallas kernel for K >= ``act_rowscaled.WIDE_K``, where alone it ran 15-20%
  faster than XLA's fusions, XLA below)."""
  global _act_choice
  if name not in ACT_KERNELS:
    raise ValueError(f"activation kernel must be one of {ACT_KERNELS}, got {name!r}")
  _act_choice = name


_input_parts = True


def set_input_parts(read: bool) -> None:
  """Whether the Pallas activation kernel reads a layer input given as parts
  (``qlinear.Gelu``) where they lie (the default) or XLA joins them first (as before
  2026-12-03; kept to time the difference, scripts/bench_flux_full.py --joined-inputs)."""
  global _input_parts
  _input_parts = bool(read)


_epilogue_gelu = True


def set_epilogue_gelu(on: bool) -> None:
  """Whether a row-scaled layer asked for ``gelu_from`` (FLUX's fc1, linear1) computes the
  GELU in its int8 GEMM's epilogue (the default), so that the next layer's activation kernel
  reads its values as they are, or leaves it to the next layer (as before 2026-12-03; kept
  to time the difference, scripts/bench_flux_full.py --next-layer-gelu)."""
  global _epilogue_gelu
  _epilogue_gelu = bool(on)


_packed_gelu = True


def set_packed_gelu(on: bool) -> None:
  """Whether the int8 GEMMs' epilogue GELU runs in bf16x2 instructions (``int8_hopper.
  GELU_BF16X2``; the default since 2026-12-06) or in f32 ones (as before; kept to time the
  difference, scripts/bench_flux_full.py --f32-gelu); the same bits either way."""
  global _packed_gelu
  _packed_gelu = bool(on)


# FLUX.1-dev 1024x1024 step, W4A8 + cuDNN FP8 attention (H100, 2026-12-06): 86.54 ms against
# 87.96, the 28-step loop 2.317 s against 2.367, the same output (docs/benchmarks). One launch
# whose tiles take either epilogue cost linear1 its next layer's maxima (0.050 ms a call on
# an H200) where fc1, all of whose tiles take the GELU, pays nothing.
_split_gelu = True


def set_split_gelu(on: bool) -> None:
  """Whether the W4A8 register GEMM of a layer whose GELU starts past column 0 (FLUX.1's
  linear1) runs as two launches, the columns before the GELU and the GELU columns (as fc1's),
  returning ``qlinear.Gelu(tail, 0, head=head)`` (the default), or as one launch whose tiles
  take either epilogue (as before 2026-12-06; kept to time the difference,
  scripts/bench_flux_full.py --one-launch-gelu). The same values either way."""
  global _split_gelu
  _split_gelu = bool(on)


_register_expansion = True


def set_register_expansion(on: bool) -> None:
  """Whether W4A8 / two-level W4A4 layers with int4_2l weights (bf16 outputs, K and N
  multiples of 128) run ``w4a8_hopper.w4a8_gemm_t``, which expands the packed weights in
  registers (the default), or the expansion pass and ``int8_hopper.int8_gemm`` (as before
  2026-12-03; kept to time the difference, scripts/bench_flux_full.py --expansion-pass)."""
  global _register_expansion
  _register_expansion = bool(on)


# FLUX.1-dev 1024x1024 step (H100, 2026-12-05): 97.87 ms against 99.59 with the pass, the
# same output (max |difference| 0.0); fc1 -> fc2's activation path at M = 4096 0.091 against
# 0.128 ms, the pair 0.627 against 0.677 (docs/benchmarks).
_epilogue_row_max = True


def set_epilogue_row_max(on: bool) -> None:
  """Whether the W4A8 register GEMM computing a GELU in its epilogue for a layer that
  ``feeds`` a row-scaled one (FLUX's fc1 -> fc2, linear1 -> linear2) also computes, per 64
  GELU columns, each token's max |y / lambda| of that layer (``qlinear.Gelu.row_max``), so
  that its activation kernel skips the pass that finds the token scales (the default), or
  leaves the maxima to that pass (as before 2026-12-05; kept to time the difference,
  scripts/bench_flux_full.py --pass-row-max)."""
  global _epilogue_row_max
  _epilogue_row_max = bool(on)


# FLUX's gated residuals (``x + gate * out`` after proj, fc2 and linear2) in the W4A8 GEMM's
# epilogue: the output tile is summed where it lies instead of written, read back and
# rewritten by XLA (~56 MB a call at M = 4608; ~76 such calls a FLUX.1-dev step). H100,
# W4A8 + FP8 attention (2026-12-06): step 87.07 ms against 89.74, loop 2.340 s against 2.422.
_epilogue_residual = True


def set_epilogue_residual(on: bool) -> None:
  """Whether the W4A8 register GEMM computes a layer's ``residual`` (``qlinear.apply``) in
  its epilogue, reading r's tile where the output tile goes (one gate row for all tokens,
  bf16; the default), or leaves ``qlinear.residual_sum`` to XLA after it (as before
  2026-12-06's thirty-fifth session; scripts/bench_flux_full.py --xla-residual). The
  epilogue rounds as jnp's expression does op by op (``w4a8_hopper.residual_rounded``); XLA
  may round its own sums otherwise and fuse them into the next LayerNorm unrounded (its
  excess precision), which the epilogue's stored sums cannot give: the FLUX step's values
  differ slightly between the two."""
  global _epilogue_residual
  _epilogue_residual = bool(on)


def _fed_inv_smooth(feeds, width: int) -> jax.Array | None:
  """f32 [width]: the 1 / lambda of the last ``width`` input columns of the layer ``feeds``
  (``row_scaled_linear``), where the epilogue maxima serve it: a row-scaled quantized layer
  with smoothing whose activations go to the Pallas kernel reading input parts; else None."""
  from svdq_jax.pallas_kernels import act_rowscaled  # which imports this module
  if (not _epilogue_row_max or not _input_parts
      or not isinstance(feeds, (qlinear.QuantizedLinear, qlinear.PreparedLinear))
      or feeds.act_format not in act_rowscaled.ACT_FORMATS):
    return None
  k = feeds.in_features
  if width > k or not _pallas_activations(k):
    return None
  inv = (feeds.inv_smooth if isinstance(feeds, qlinear.PreparedLinear)
         else qlinear.folded_smoothing(feeds.smooth, None)[0])
  return None if inv is None else inv[k - width:]


def _pallas_activations(k: int) -> bool:
  """Whether a row-scaled layer with K = k input features quantizes its activations with the
  Pallas kernel (``act_rowscaled``), by ``set_act_kernel``'s choice, rather than XLA."""
  from svdq_jax.pallas_kernels import act_rowscaled  # which imports this module
  return _act_choice == "pallas" or (_act_choice == "wide_k" and k >= act_rowscaled.WIDE_K)


def _register_tiling(layer, m: int, k: int, n: int, rank: int, out_dtype,
                     gelu_from: int | None) -> dict | None:
  """``w4a8_hopper.w4a8_gemm_t``'s tiling for this layer (``gelu_from``: the GELU epilogue
  is wanted from that column on), or None where it does not run it."""
  from svdq_jax.pallas_kernels import w4a8_hopper
  if (not _register_expansion or layer.weight_format != "int4_2l"
      or jnp.dtype(out_dtype) != jnp.dtype(jnp.bfloat16)):
    return None
  return w4a8_hopper.tiling(m, k, n, rank, gelu_from=gelu_from)


def _split_tiling(layer, m: int, k: int, n: int, rank: int, out_dtype,
                  gelu_from: int) -> dict | None:
  """The GELU columns' tiling where ``set_split_gelu`` runs a layer whose GELU starts past
  column 0 as two launches (its CTAs dividing gelu_from), else None: one launch."""
  from svdq_jax.pallas_kernels import w4a8_hopper
  if not (_split_gelu and gelu_from):
    return None
  tiles = _register_tiling(layer, m, k, n - gelu_from, rank, out_dtype, 0)
  return tiles if tiles is not None and gelu_from % w4a8_hopper.cta_rows(tiles) == 0 else None


def _row_scaled_weight(layer, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """(int8 [N, K], f32 [N]): the weight operand of the int8 GEMM."""
  from svdq_jax.pallas_kernels import act_rowscaled  # which imports this module
  if layer.weight_format == "int4_2l" and layer.in_features % 128 == 0:  # one Pallas pass
    return (act_rowscaled.expand_two_level(layer.qweight, layer.wscale, interpret=interpret),
            layer.wcscale)
  return layer.row_scaled_weight()


def prepare_row_scaled(layer, *, interpret: bool = False,
                       expand: bool = True) -> qlinear.PreparedLinear:
  """A row-scaled QuantizedLinear's weight-side operands (``qlinear.PreparedLinear``): what
  ``row_scaled_linear`` computes from the layer alone. expand=False leaves the int8 weight
  operand ``w`` None (``row_scaled_linear`` computes it only for the int8 GEMM) and, for
  int4_2l, holds the register kernel's multipliers ``mult_t`` and scales ``sw``."""
  w, sw = _row_scaled_weight(layer, interpret) if expand else (None, None)
  mult_t = None
  if not expand and layer.weight_format == "int4_2l":
    mult_t, sw = layer.wscale.T, layer.wcscale.astype(jnp.float32)
  inv, down = qlinear.folded_smoothing(layer.smooth, layer.lora_down)
  up_t = None
  if layer.lora_up is not None:
    up_t = _pad_rank(layer.lora_up.astype(jnp.bfloat16).T, 1)  # wgmma takes K in steps of 16
  return qlinear.PreparedLinear(layer=layer, w=w, sw=sw, inv_smooth=inv, down=down,
                                up_t=up_t, mult_t=mult_t)


def row_scaled_linear(layer, x: jax.Array, bias: jax.Array | None, *,
                      gelu_from: int | None = None, feeds=None, residual=None,
                      interpret: bool = False):
  """A row-scaled layer (W4A8, two-level W4A4, W8A8) on the Hopper kernels.

  x [M, K] -> [M, N] in x.dtype: activations quantized per token (``act_rowscaled``), then
  for int4_2l weights (bf16 outputs, K and N multiples of 128, ``set_register_expansion``)
  one W4A8 GEMM that expands the packed weights in registers (``w4a8_hopper``), else the
  weights expanded from 4 bits to int8 (``act_rowscaled.expand_two_level``) and one int8 GEMM
  (``int8_hopper``); both take the scales, the low-rank up projection and the bias in their
  epilogue, and compute the same bf16 values. ``layer``: a
  QuantizedLinear, or a PreparedLinear (``qlinear.prepare``) holding the weight-side operands.
  x may be given as parts [M, K_i] (``qlinear.Gelu``), which the Pallas activation kernel
  reads where they lie (``set_input_parts``). ``gelu_from``: with ``set_epilogue_gelu`` and
  a tiling whose CTA tiles it falls between, the GEMM stores the output's columns from there
  through the GELU and the result is ``qlinear.Gelu(y, gelu_from, applied=True)``; otherwise
  the plain output (the caller marks the GELU as still to be computed). ``feeds``: the layer
  whose input ends with the GELU columns; with ``set_epilogue_row_max``, where the W4A8
  register GEMM computes the GELU and that layer's activations go to the Pallas kernel, the
  epilogue also computes their token maxima for it (``qlinear.Gelu.row_max``).
  ``residual``: (r [M, N], gate [N]): the result is ``qlinear.residual_sum(r, gate, y)``,
  computed in the W4A8 GEMM's epilogue with ``set_epilogue_residual`` (bf16 r), else after.
  """
  from svdq_jax.pallas_kernels import act_rowscaled, int8_hopper, w4a8_hopper
  prepared = isinstance(layer, qlinear.PreparedLinear)
  p = layer if prepared else prepare_row_scaled(layer, interpret=interpret, expand=False)
  n = p.out_features
  dtype = qlinear.input_dtype(x)
  # f32 callers get the f32 result; everything else is rounded once, to bf16
  out_dtype = jnp.float32 if jnp.dtype(dtype) == jnp.dtype(jnp.float32) else jnp.bfloat16
  k = qlinear.input_width(x)
  if bias is not None:
    bias = bias.astype(jnp.float32)
  if not int8_hopper.supports(k, n, out_dtype):
    raise ValueError(f"the int8 GEMM needs K % 64 == 0 and N % 128 == 0 (64 for bf16 "
                     f"outputs), got K={k}, N={n}")
  if _pallas_activations(k):
    a, sa, lr = act_rowscaled.quantize_rows_folded(
        x if _input_parts else qlinear.join(x), p.inv_smooth, p.down,
        act_format=p.act_format, interpret=interpret, **act_rowscaled.tiling(k))
  else:
    a, sa, lr = act_rowscaled.reference_folded(x, p.inv_smooth, p.down, p.act_format)
  if lr is not None:
    lr = _pad_rank(lr.astype(jnp.bfloat16), 1)
  rank = 0 if lr is None else lr.shape[1]
  # weights prepared expanded (``qlinear.prepare``): the int8 GEMM reads them
  in_registers = (None if p.w is not None else _register_tiling(
      p.layer, a.shape[0], k, n, rank, out_dtype, gelu_from if _epilogue_gelu else None))
  if in_registers is None and p.w is None:
    w, sw = _row_scaled_weight(p.layer, interpret)
    p = p.replace(w=w, sw=sw)
  tiles = in_registers or int8_hopper.tiling(n, out_dtype, rank)
  if tiles is not None:
    cta_n = (w4a8_hopper.cta_rows(tiles) if in_registers
             else int8_hopper.cta_cols(tiles["tile_n"], tiles["wg_dim"]))
    gelu = (_epilogue_gelu and gelu_from is not None and gelu_from % cta_n == 0
            and jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16))
    inv_next = _fed_inv_smooth(feeds, n - gelu_from) if gelu and in_registers else None
    row_max = head = None
    # (bf16 r and gate: the expression's result is then bf16, as the epilogue's)
    fused = (residual if in_registers and _epilogue_residual and not gelu
             and residual is not None
             and residual[0].dtype == residual[1].dtype == jnp.bfloat16
             and w4a8_hopper.takes_residual(rank=rank, **in_registers) else None)
    if in_registers:
      gemm = lambda inv, gelu_from, tiles, cols=None: w4a8_hopper.w4a8_gemm_t(
          a, sa, p.layer.qweight, p.mult_t, p.sw, lr, p.up_t, bias, inv, gelu_from=gelu_from,
          packed_gelu=_packed_gelu, cols=cols, residual=fused, interpret=interpret, **tiles)
      tail_tiles = (_split_tiling(p.layer, a.shape[0], k, n, rank, out_dtype, gelu_from)
                    if gelu else None)
      if tail_tiles is None:
        y = gemm(inv_next, gelu_from if gelu else None, tiles)
      else:   # the columns before the GELU, then the GELU columns
        head = gemm(None, None, _register_tiling(p.layer, a.shape[0], k, gelu_from, rank,
                                                 out_dtype, None), (0, gelu_from))
        y = gemm(inv_next, 0, tail_tiles, (gelu_from, n))
      if inv_next is not None:
        y, row_max = y
    else:
      y = int8_hopper.int8_gemm(a, sa, p.w, p.sw, lr, p.up_t, bias, out_dtype=out_dtype,
                                gelu_from=gelu_from if gelu else None,
                                packed_gelu=_packed_gelu, interpret=interpret, **tiles)
    if not gelu:
      y = y.astype(dtype)
      return y if residual is None or fused else qlinear.residual_sum(*residual, y)
    return qlinear.Gelu(y, 0 if head is not None else gelu_from, applied=True,
                        row_max=row_max, head=head)
  # a branch too wide for shared memory: its up projection runs in XLA, added to the
  # kernel's f32 output so that the result is still rounded once
  tiles = int8_hopper.tiling(n, jnp.float32)
  if tiles is None:
    raise ValueError(f"low-rank branch of rank {lr.shape[1]} with N={n}: the int8 GEMM needs "
                     "N % 128 == 0 to add it outside the kernel")
  y = int8_hopper.int8_gemm(a, sa, p.w, p.sw, None, None, bias, out_dtype=jnp.float32,
                            interpret=interpret, **tiles)
  y = (y + qlinear.lowrank_up(lr, p.up_t.T)).astype(dtype)
  return y if residual is None else qlinear.residual_sum(*residual, y)
