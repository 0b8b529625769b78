"""The demo's columns: method keys, labels and what they quantize with (no heavy imports, so
the command line can list them cheaply)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Method:
  label: str
  method: str | None     # None: the 16-bit model itself
  fmt: str = "int4"
  act_fmt: str | None = None  # None: activations in the weight format
  residual: str = "rtn"       # or 'gptq' (QuantConfig.residual)
  attention: str | None = None  # flux.set_attention_implementation while sampling

  @property
  def quantization(self) -> tuple:
    """What the weights depend on: columns that differ only in attention share them."""
    return self.method, self.fmt, self.act_fmt, self.residual


METHODS = {
    "bf16": Method("16-bit (bf16)", None),
    "svdquant-int4": Method("SVDQuant INT4", "svdquant", "int4"),
    "svdquant-nvfp4": Method("SVDQuant NVFP4", "svdquant", "nvfp4"),
    "svdquant-w4a8": Method("SVDQuant W4A8 (int4_2l / int8)", "svdquant", "int4_2l", "int8"),
    "svdquant-2l": Method("SVDQuant two-level W4A4 (int4_2l)", "svdquant", "int4_2l"),
    "svdquant-int4-gptq": Method("SVDQuant INT4 + GPTQ", "svdquant", "int4", residual="gptq"),
    "svdquant-w4a8-gptq": Method("SVDQuant W4A8 + GPTQ", "svdquant", "int4_2l", "int8",
                                 residual="gptq"),
    "svdquant-w4a8-gptq-loop": Method("SVDQuant W4A8 + GPTQ in the refinement loop", "svdquant",
                                      "int4_2l", "int8", residual="gptq_loop"),
    "bf16-att8": Method("16-bit + INT8/FP8 attention", None, attention="int8"),
    "svdquant-w4a8-att8": Method("SVDQuant W4A8 + INT8/FP8 attention", "svdquant", "int4_2l",
                                 "int8", attention="int8"),
    "svdquant-w4a8-attfp8": Method("SVDQuant W4A8 + FP8 attention (cuDNN's numerics)",
                                   "svdquant", "int4_2l", "int8", attention="fp8"),
    "svdquant-w4a8-att8qk": Method("SVDQuant W4A8 + INT8 q k^T attention", "svdquant",
                                   "int4_2l", "int8", attention="int8qk"),
    # FLUX.1-dev's 1.5x configuration on the H200 (cuDNN FP8 attention) with GPTQ residuals
    "svdquant-w4a8-gptq-attfp8": Method("SVDQuant W4A8 + GPTQ + FP8 attention", "svdquant",
                                        "int4_2l", "int8", residual="gptq", attention="fp8"),
    "smoothquant": Method("SmoothQuant W4A4", "smoothquant", "int4"),
    "rtn": Method("RTN W4A4", "rtn", "int4"),
    "w4a16": Method("W4A16 (AWQ-style)", "w4a16", "int4"),
}
