"""svdq-jax: SVDQuant 4-bit (W4A4 + 16-bit low-rank branch) quantization for JAX / Flax."""

from svdq_jax.calibrate import LayerStats, calibrate
from svdq_jax.config import QuantConfig, Rule, preset
from svdq_jax.qlinear import QuantizedLinear, apply
from svdq_jax.tree import calibrate_and_quantize, find_kernels, quantize

__all__ = ["LayerStats", "QuantConfig", "QuantizedLinear", "Rule", "apply", "calibrate",
           "calibrate_and_quantize", "find_kernels", "preset", "quantize"]
