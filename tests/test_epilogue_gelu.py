"""The GEMM epilogue's GELU in bf16x2 PTX (``int8_hopper.GELU_BF16X2``) against its
definition, ``qlinear.gelu_tanh``, on every bf16 input, with the PTX text itself run by a
small emulator of its instructions (the CPU cannot run PTX; the GPU check is
``scripts/bench_rowscaled.py --parts``). The emulator rounds each bf16x2 result once from the
exact f64 value, as the instructions are specified; its tanh is numpy's f32 one, where the
GPU's is tanh.approx.f32 (their bf16-rounded values agree on every bf16 input: the GPU check).
"""

import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from svdq_jax import qlinear
from svdq_jax.pallas_kernels import int8_hopper

BF16 = ml_dtypes.bfloat16


def _halves(w):
  """uint32 words -> (low, high) bf16 values as f64."""
  lo = (w & 0xFFFF).astype(np.uint16).view(BF16).astype(np.float64)
  hi = (w >> 16).astype(np.uint16).view(BF16).astype(np.float64)
  return lo, hi


def _pack(lo, hi):
  """f64 (low, high) -> uint32 words of their bf16 values (rounded once, to nearest even)."""
  bits = lambda v: np.asarray(v, np.float64).astype(BF16).view(np.uint16).astype(np.uint32)
  return bits(lo) | (bits(hi) << 16)


def _f32(w):
  return w.astype(np.uint32).view(np.float32)


def run_ptx(text: str, arg: np.ndarray) -> np.ndarray:
  """Runs the instructions of ``text`` (one per line, operands $0 out and $1 in, .b32 / .f32
  registers as uint32 bits) on uint32 words ``arg``; returns $0."""
  regs = {"$1": arg.astype(np.uint32)}
  val = lambda op: (regs[op] if op in regs
                    else np.full(arg.shape, int(op, 0), np.uint32))   # an immediate
  for line in text.splitlines():
    line = line.strip().rstrip(";")
    if not line or line in "{}" or line.startswith(".reg"):
      continue
    instr, ops = line.split(None, 1)
    d, *src = [o.strip() for o in ops.split(",")]
    a = [val(s) for s in src]
    with np.errstate(all="ignore"):
      if instr in ("mul.rn.bf16x2", "add.rn.bf16x2"):
        (al, ah), (bl, bh) = _halves(a[0]), _halves(a[1])
        f = np.multiply if instr.startswith("mul") else np.add
        out = _pack(f(al, bl), f(ah, bh))
      elif instr == "mov.b32":
        out = a[0]
      elif instr == "shl.b32":
        out = a[0] << a[1]
      elif instr == "and.b32":
        out = a[0] & a[1]
      elif instr == "tanh.approx.f32":
        out = np.tanh(_f32(a[0])).view(np.uint32)
      elif instr == "cvt.rn.bf16x2.f32":   # the first source to the high half
        out = _pack(_f32(a[1]).astype(np.float64), _f32(a[0]).astype(np.float64))
      else:
        raise AssertionError(f"the emulator does not know {instr!r}")
    regs[d] = out.astype(np.uint32)
  return regs["$0"]


def test_ptx_gelu_is_gelu_tanh_on_every_bf16():
  """Every bf16 input in pairs through GELU_BF16X2 = ``qlinear.gelu_tanh`` (NaN = NaN), but
  where the CPU's definition flushes subnormals to zero (XLA's CPU arithmetic does; the
  GPU's, like the instructions, keeps them): inputs below 2^-125, whose GELU (~x / 2) or x
  itself is subnormal."""
  bits = np.arange(1 << 16, dtype=np.uint32)
  words = bits[0::2] | (bits[1::2] << 16)
  out = run_ptx(int8_hopper.GELU_BF16X2, words)
  got = np.stack([out & 0xFFFF, out >> 16], axis=1).reshape(-1).astype(np.uint16).view(BF16)
  x = bits.astype(np.uint16).view(BF16)
  want = np.asarray(qlinear.gelu_tanh(jnp.asarray(x)))
  got, want = got.astype(np.float32), want.astype(np.float32)
  differ = ~((got == want) | (np.isnan(got) & np.isnan(want)))
  tiny = np.abs(x.astype(np.float32)) < 2.0 ** -125
  assert not (differ & ~tiny).any(), x[differ & ~tiny][:8]
  assert 0 < tiny.sum() < 1024   # the exclusion is the subnormal corner only
  # sanity: the emulator is not vacuous (a constant off by one bf16 ulp changes results)
  wrong = int8_hopper.GELU_BF16X2.replace("0x3D373D37", "0x3D383D38")
  assert (run_ptx(wrong, words) != out).any()


def test_ptx_gelu_constants_are_the_definitions():
  """The bf16x2 immediates are gelu_tanh's constants, rounded to bf16, in both halves."""
  consts = set(re.findall(r"0x[0-9A-F]{8}", int8_hopper.GELU_BF16X2)) - {"0xFFFF0000"}
  bits = lambda v: int(np.asarray(v, np.float32).astype(BF16).view(np.uint16))
  want = {f"0x{bits(v):04X}{bits(v):04X}" for v in (0.044715, np.sqrt(2 / np.pi), 1.0, 0.5)}
  assert consts == want
