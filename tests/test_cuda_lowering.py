"""The GPU kernels lowered for CUDA on this CPU machine (``jax.export`` with
platforms=['cuda'], an abstract H200 standing in for the device the Triton lowering asks
for), at the tilings the library picks: Pallas builds each kernel's MLIR (Mosaic GPU) or
Triton IR, including the code that only runs on a GPU and that interpret mode replaces by
jnp (``w4a8_hopper._expand``'s register arithmetic, written with ``inline_mgpu``), so a
kernel that cannot be built for the GPU fails here rather than on the first lent machine.
What the lowering cannot show (PTX compilation, wgmma shape limits, run-time behaviour) the
GPU benchmarks check against the references."""

import re

import jax
import jax.numpy as jnp
import pytest

from svdq_jax import qlinear
from svdq_jax.pallas_kernels import (attention_fp8, attention_int8, int8_hopper, w4a4,
                                     w4a4_hopper, w4a8_hopper, w4a16_gemv)

from layer_helpers import quantize_one

MOSAIC, TRITON = "mosaic_gpu_v2", "__gpu$xla.gpu.triton"
H200 = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
    device_kind="NVIDIA H200", num_cores=132, platform="cuda"))
M, K, N, R = 200, 384, 256, 32


def _lowered(fn, *args) -> str:
  """fn(*args) lowered for CUDA, as MLIR text (Triton's kernels are not a stable export
  target: allowed here, as nothing is serialized)."""
  with jax.sharding.use_abstract_mesh(H200):
    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
  return exported.mlir_module()


def _custom_calls(fn, *args) -> list[str]:
  """The custom-call targets of fn(*args) lowered for CUDA."""
  return re.findall(r"custom_call @([\w.$]+)", _lowered(fn, *args))


def _epilogue(rank=R):
  return (jnp.zeros((M, rank), jnp.bfloat16), jnp.zeros((N, rank), jnp.bfloat16),
          jnp.zeros((N,), jnp.float32))


@pytest.mark.parametrize("tiles", [w4a8_hopper.tiling(4608, K, N, R, num_sms=1),
                                   w4a8_hopper.tiling(M, K, N, R, num_sms=132),
                                   w4a8_hopper.tiling(4608, K, N, 96, num_sms=1)],
                         ids=["wide", "narrow", "lora_wide"])
@pytest.mark.parametrize("epilogue", ["none", "lowrank_bias", "gelu", "gelu_row_max",
                                      "gelu_row_max_cols", "gelu_packed", "residual"])
def test_w4a8_register_gemm_lowers(tiles, epilogue):
  """256- and 128-token tiles, the shallower pipeline of a LoRA-wide branch; without and
  with the epilogue (scales only / + low-rank up projection and bias / + GELU / + the next
  layer's token maxima over the GELU columns, of the whole output or of its columns from
  128 on (cols) / + GELU in bf16x2 instructions, whose PTX the module holds only then / +
  a gated residual read where the output tile is staged)."""
  rank = 96 if tiles["steps"] == 2 else R
  args = [jnp.zeros((M, K), jnp.int8), jnp.zeros((M,)), jnp.zeros((N, K // 2), jnp.uint8),
          jnp.zeros((K // 128, N), jnp.uint8), jnp.zeros((N,))]
  if epilogue != "none":
    args += _epilogue(rank)
  gelu_from = 128 if epilogue.startswith("gelu") else None
  cols = (128, N) if epilogue.endswith("cols") else None
  if cols:
    gelu_from = 0
  if epilogue.startswith("gelu_row_max"):
    args.append(jnp.zeros((N - 128,)))
  packed = epilogue == "gelu_packed"
  res = (epilogue == "residual") * 2
  if res and not w4a8_hopper.takes_residual(rank=rank, **tiles):
    assert tiles["steps"] == 2   # the LoRA-wide branch's: no room (RESIDUAL_ROOM)
    return
  if res:
    args += [jnp.zeros((M, N), jnp.bfloat16), jnp.zeros((N,), jnp.bfloat16)]
  text = _lowered(lambda *a: w4a8_hopper.w4a8_gemm_t(
      *a[:len(a) - res], residual=a[len(a) - res:] or None, gelu_from=gelu_from,
      packed_gelu=packed, cols=cols, **tiles), *args)
  assert re.findall(r"custom_call @([\w.$]+)", text) == [MOSAIC]
  assert ("mul.rn.bf16x2" in text) == packed


@pytest.mark.parametrize("copies_at", [None, 1])
def test_w4a8_register_gemm_copies_lower(copies_at):
  """The epilogue operands copied before the K loop (the layers' choice above COPIES_MAX_K)
  or at a K step, with the low-rank branch and bias."""
  args = [jnp.zeros((M, K), jnp.int8), jnp.zeros((M,)), jnp.zeros((N, K // 2), jnp.uint8),
          jnp.zeros((K // 128, N), jnp.uint8), jnp.zeros((N,)), *_epilogue()]
  text = _lowered(lambda *a: w4a8_hopper.w4a8_gemm_t(*a, tile_m=256, steps=3, num_sms=1,
                                                     copies_at=copies_at), *args)
  assert re.findall(r"custom_call @([\w.$]+)", text) == [MOSAIC]
  assert "w4a8_t_m256s3_200x384x256" in text


@pytest.mark.parametrize("tiles", [dict(tile_m=128, steps=4), dict(tile_m=192, steps=3)])
def test_w4a8_register_gemm_three_warpgroups_lowers(tiles):
  """compute_wgs=3 (192 weight rows a CTA) with the low-rank branch, bias, GELU and the
  next layer's token maxima."""
  n = 384
  args = [jnp.zeros((M, K), jnp.int8), jnp.zeros((M,)), jnp.zeros((n, K // 2), jnp.uint8),
          jnp.zeros((K // 128, n), jnp.uint8), jnp.zeros((n,)), jnp.zeros((M, R), jnp.bfloat16),
          jnp.zeros((n, R), jnp.bfloat16), jnp.zeros((n,), jnp.float32),
          jnp.zeros((n - 192,), jnp.float32)]
  calls = _custom_calls(lambda *a: w4a8_hopper.w4a8_gemm_t(
      *a, gelu_from=192, compute_wgs=3, **tiles), *args)
  assert calls == [MOSAIC], calls


@pytest.mark.parametrize("tile_m,compute_wgs", [(128, 2), (192, 3)])
def test_w4a8_row_maxima_array_holds_whole_token_tiles(tile_m, compute_wgs):
  """The kernel's token-maxima array spans whole tiles of tokens (sliced to M after it), so
  that a ragged last tile's copy of one 64-column group stays inside the array: given [G, M]
  on an H100, the copy past M overwrote the next group's first tokens (FLUX.1's fc1 at
  M = 4096 in 192-token tiles: 11776 maxima wrong, 2026-12-05). Interpret mode cannot show
  it (its copies index the array); the GPU benchmark (``bench_rowscaled.py --row-max --m
  4096``) does."""
  n, gelu_from = 128 * compute_wgs, 64 * compute_wgs   # two CTA tiles, the second GELU
  args = [jnp.zeros((M, K), jnp.int8), jnp.zeros((M,)), jnp.zeros((n, K // 2), jnp.uint8),
          jnp.zeros((K // 128, n), jnp.uint8), jnp.zeros((n,)),
          jnp.zeros((n - gelu_from,), jnp.float32)]
  gemm = lambda *a: w4a8_hopper.w4a8_gemm_t(
      *a[:5], row_max_inv=a[5], gelu_from=gelu_from, compute_wgs=compute_wgs, tile_m=tile_m,
      steps=2, num_sms=132)
  # the kernel call: the one equation of the jitted function with two results
  (call,) = [e for e in jax.make_jaxpr(gemm)(*args).jaxpr.eqns[0].params["jaxpr"].jaxpr.eqns
             if len(e.outvars) == 2]
  y, row_max = (v.aval.shape for v in call.outvars)
  assert y == (M, n) and row_max[0] == (n - gelu_from) // 64
  assert row_max[1] == -(-M // tile_m) * tile_m, row_max
  assert jax.eval_shape(gemm, *args)[1].shape == ((n - gelu_from) // 64, M)


@pytest.mark.parametrize("n_tiled,rank,out_dtype", [(3072, R, jnp.bfloat16),
                                                     (12288, R, jnp.bfloat16),
                                                     (N, 160, jnp.bfloat16),
                                                     (N, R, jnp.float32)],
                         ids=["n3072", "wide_n", "lora_wide", "f32"])
def test_int8_gemm_lowers(n_tiled, rank, out_dtype):
  """At the library tiling of N = n_tiled (the problem's N divides its CTA tile)."""
  args = (jnp.zeros((M, K), jnp.int8), jnp.zeros((M,)), jnp.zeros((N, K), jnp.int8),
          jnp.zeros((N,)), *_epilogue(rank))
  gelu_from = None if out_dtype == jnp.float32 else 128
  packed = n_tiled == 3072   # the GELU in bf16x2 instructions at one tiling
  text = _lowered(lambda *a: int8_hopper.int8_gemm(
      *a, out_dtype=out_dtype, gelu_from=gelu_from, packed_gelu=packed,
      **int8_hopper.tiling(n_tiled, out_dtype, rank)), *args)
  assert re.findall(r"custom_call @([\w.$]+)", text) == [MOSAIC]
  assert ("mul.rn.bf16x2" in text) == packed


def test_gemms_lower_with_a_bf16_bias():
  """A bf16 bias read as given (``int8_hopper.bias_operand``): its shared-memory copy and the
  epilogue's widening, in both GEMM kernels at the library's tilings, with no convert of it
  before the kernel."""
  epi = (*_epilogue()[:2], jnp.zeros((N,), jnp.bfloat16))
  texts = [_lowered(lambda *a: w4a8_hopper.w4a8_gemm_t(
      *a, **w4a8_hopper.tiling(4608, K, N, R, num_sms=1)), jnp.zeros((M, K), jnp.int8),
      jnp.zeros((M,)), jnp.zeros((N, K // 2), jnp.uint8), jnp.zeros((K // 128, N), jnp.uint8),
      jnp.zeros((N,)), *epi),
           _lowered(lambda *a: int8_hopper.int8_gemm(
      *a, **int8_hopper.tiling(N, jnp.bfloat16, R)), jnp.zeros((M, K), jnp.int8),
      jnp.zeros((M,)), jnp.zeros((N, K), jnp.int8), jnp.zeros((N,)), *epi)]
  n = 384   # three compute warpgroups: a [3, 64] bf16 bias buffer
  texts.append(_lowered(lambda *a: w4a8_hopper.w4a8_gemm_t(
      *a, tile_m=192, steps=3, compute_wgs=3), jnp.zeros((M, K), jnp.int8), jnp.zeros((M,)),
      jnp.zeros((n, K // 2), jnp.uint8), jnp.zeros((K // 128, n), jnp.uint8), jnp.zeros((n,)),
      jnp.zeros((M, R), jnp.bfloat16), jnp.zeros((n, R), jnp.bfloat16),
      jnp.zeros((n,), jnp.bfloat16)))
  for text in texts:
    assert re.findall(r"custom_call @([\w.$]+)", text) == [MOSAIC]
    assert not re.search(r"tensor<\d+xbf16>\) -> tensor<\d+xf32>", text)


@pytest.mark.parametrize("mma", ["s8", "e4m3"])
def test_exact_int4_gemm_lowers(mma):
  args = (jnp.zeros((M, K), jnp.int8), jnp.ones((K // 64, M)),
          jnp.zeros((N, K // 2), jnp.uint8), jnp.ones((K // 64, N)), *_epilogue())
  calls = _custom_calls(lambda *a: w4a4_hopper.w4a4_gemm_t(
      *a, mma=mma, **w4a4_hopper.tiling(N)), *args)
  assert calls == [MOSAIC], calls


@pytest.mark.parametrize("pv", ["bf16", "fp8"])
def test_int8_attention_lowers(pv):
  q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  calls = _custom_calls(lambda q: attention_int8.flash(*attention_int8.prepare(q, q, q, pv)), q)
  assert calls == [MOSAIC], calls


def test_fp8_operands_lower():
  """FLUX's FP8 attention operands (``attention_fp8.fp8_operands``) at a double block's two
  streams, 24 heads of 128 (the second stream's outputs aliased onto the first's)."""
  h, d = 24, 128
  x = lambda length: jnp.zeros((1, length, 3 * h * d), jnp.bfloat16)
  scale = jnp.ones((d,))
  angles = jnp.zeros((4608, d // 2))
  fn = lambda inv: attention_fp8.fp8_operands(
      [(x(512), scale, scale), (x(4096), scale, scale)], angles, angles,
      jnp.zeros((1, h, d)), inv, h, 1e-6)
  assert _custom_calls(fn, jnp.ones((3,))) == [TRITON, TRITON]


def _layer(method, fmt, act_fmt=None):
  x = jax.random.normal(jax.random.key(0), (72, 256)) * jnp.linspace(0.05, 6.0, 256)
  w = jax.random.normal(jax.random.key(1), (256, 256))
  return quantize_one(w, x, method, fmt, act_fmt, alpha_grid=1)


@pytest.mark.parametrize("method,fmt,act_fmt,switches,rows,want", [
    # XLA act, the register GEMM in two launches (the columns before the GELU, the GELU ones)
    ("svdquant", "int4_2l", "int8", {}, 72, [MOSAIC, MOSAIC]),
    ("svdquant", "int4_2l", "int8", {"_split_gelu": False}, 72, [MOSAIC]),
    ("svdquant", "int4_2l", "int4_2l", {}, 72, [MOSAIC, MOSAIC]),
    ("svdquant", "int4_2l", "int8", {"_act_choice": "pallas"}, 72,
     [TRITON, TRITON, MOSAIC, MOSAIC]),
    ("svdquant", "int4_2l", "int8", {"_register_expansion": False}, 72, [TRITON, MOSAIC]),
    ("w8a8", "int4", None, {}, 72, [MOSAIC]),                           # int8 weights
    ("svdquant", "int4", None, {}, 72, [TRITON, TRITON]),               # exact INT4, Triton
    ("svdquant", "int4", None, {"_gemm_choice": "hopper"}, 72, [TRITON, MOSAIC]),
    ("svdquant", "nvfp4", None, {}, 72, [TRITON, TRITON]),
    ("w4a16", "int4_2l", None, {}, 1, [TRITON]),                        # the modulation GEMV
    ("w4a16", "int4_2l", None, {}, 2, [TRITON]),                        # its tensor-core path
    ("w4a16", "int4_2l", None, {}, 28, [TRITON]),                       # a loop's modulations
    ("w4a16", "int4_2l", None, {}, 100, [TRITON]),                      # two row blocks
], ids=["w4a8", "w4a8_one_launch", "w4a4_2l", "w4a8_pallas_act", "w4a8_expansion_pass",
        "w8a8", "int4", "int4_hopper", "nvfp4", "gemv", "gemv_mma", "gemv_mma_28",
        "gemv_mma_100"])
def test_layer_lowers_on_the_kernels(monkeypatch, method, fmt, act_fmt, switches, rows, want):
  """``qlinear.apply`` on the 'pallas' backend, as the models call it (bf16 inputs; the
  epilogue GELU where a row-scaled GEMM takes it), with the kernel switches given."""
  layer = _layer(method, fmt, act_fmt)
  for name, value in switches.items():
    monkeypatch.setattr(w4a4, name, value)
  x = jax.random.normal(jax.random.key(2), (rows, 256), jnp.bfloat16)
  gelu_from = 128 if layer.act_format is not None else None
  with qlinear.backend("pallas"):
    calls = _custom_calls(lambda l, x: qlinear.apply(l, x, gelu_from=gelu_from), layer, x)
  assert calls == want, calls


@pytest.mark.parametrize("rows", [1, 28])
def test_gemv_with_conversions_lowers(rows):
  """The modulation GEMV with its codes made f32 by conversions (``bit_unpack=False``, the
  switch; the default's bit operations lower in the layer cases above), on the CUDA cores
  (one row) and the tensor cores."""
  layer = _layer("w4a16", "int4_2l")
  x = jnp.zeros((rows, 256), jnp.bfloat16)
  calls = _custom_calls(lambda x, c, m, u: w4a16_gemv.gemv(x, c, m, u, bit_unpack=False),
                        x, layer.qweight, layer.wscale, layer.wcscale)
  assert calls == [TRITON], calls


def test_gemv_one_row_on_2d_tiles_lowers():
  """The one-row GEMV on the 2-D tiles (``set_grouped(False)``; the 4-D tiles, the default,
  lower in the layer case 'gemv' above)."""
  layer = _layer("w4a16", "int4_2l")
  calls = _custom_calls(lambda x, c, m, u: w4a16_gemv.gemv(x, c, m, u, grouped=False),
                        jnp.zeros((1, 256), jnp.bfloat16), layer.qweight, layer.wscale,
                        layer.wcscale)
  assert calls == [TRITON], calls


@pytest.mark.parametrize("applied", [False, True])
def test_layer_reads_input_parts_on_the_kernels(monkeypatch, applied):
  """FLUX's wide-K inputs, ``(attn, Gelu(mlp))`` (the GELU still to compute, or computed by
  the layer before), read where they lie by the Pallas activation kernels."""
  layer = _layer("svdquant", "int4_2l", "int8")
  monkeypatch.setattr(w4a4, "_act_choice", "pallas")
  x = jax.random.normal(jax.random.key(2), (72, 256), jnp.bfloat16)
  with qlinear.backend("pallas"):
    calls = _custom_calls(lambda l, a, b: qlinear.apply(
        l, (a, qlinear.Gelu(b, 0, applied))), layer, x[:, :128], x[:, 128:])
  assert calls == [TRITON] * 4 + [MOSAIC], calls   # row maxima and codes, per part
