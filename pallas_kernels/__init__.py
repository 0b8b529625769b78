"""Pallas GPU kernels for the quantized linear (installed as ``svdq_jax.pallas_kernels``).

``w4a4``: the activation kernel (smooth, 4-bit quantize, pack, low-rank down projection in
one pass over X) and the block-scaled W4A4 GEMM on int8 tensor cores with the low-rank up
projection and bias in its epilogue. ``act_rowscaled`` (per-token activation quantization,
the int4_2l weight expansion), ``int8_hopper`` (the Mosaic GPU int8 GEMM of the Hopper-native
formats), ``w4a4_hopper`` (exact INT4 on Hopper), ``w4a16_gemv`` (weight-only int4_2l layers
on a few rows: FLUX's modulation), ``attention_int8``. Each has a pure-jnp reference with the
same semantics in ``svdq_jax.qlinear`` / ``svdq_jax.formats`` / ``svdq_jax.attention``.
"""

from svdq_jax.pallas_kernels.w4a4 import (SUPPORTED_ACT_FORMATS, quantize_act, w4a4_gemm,
                                          w4a4_linear)

__all__ = ["SUPPORTED_ACT_FORMATS", "quantize_act", "w4a4_gemm", "w4a4_linear"]
