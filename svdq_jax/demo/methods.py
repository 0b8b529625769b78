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


METHODS = {
    "bf16": Method("16-bit (bf16)", None),
    "svdquant-int4": Method("SVDQuant INT4", "svdquant", "int4"),
    "svdquant-nvfp4": Method("SVDQuant NVFP4", "svdquant", "nvfp4"),
    "svdquant-w4a8": Method("SVDQuant W4A8 (int4_2l / int8)", "svdquant", "int4_2l", "int8"),
    "svdquant-2l": Method("SVDQuant two-level W4A4 (int4_2l)", "svdquant", "int4_2l"),
    "svdquant-int4-gptq": Method("SVDQuant INT4 + GPTQ", "svdquant", "int4", residual="gptq"),
    "svdquant-w4a8-gptq": Method("SVDQuant W4A8 + GPTQ", "svdquant", "int4_2l", "int8",
                                 residual="gptq"),
    "smoothquant": Method("SmoothQuant W4A4", "smoothquant", "int4"),
    "rtn": Method("RTN W4A4", "rtn", "int4"),
    "w4a16": Method("W4A16 (AWQ-style)", "w4a16", "int4"),
}
