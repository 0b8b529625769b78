"""Quantization configuration: which layers, by which method, in which format.

A ``QuantConfig`` is an ordered tuple of ``Rule``s. Each linear kernel in a parameter tree
has a module path such as ``"double_blocks/3/img_attn/qkv"`` ('/'-joined keys, without the
trailing ``kernel`` and without a leading ``params`` collection name). The first rule whose
``pattern`` matches the path (``re.fullmatch``) decides how the layer is quantized; layers no
rule matches stay as they are. A rule that matches no layer is an error.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Method:
  """What a quantization method does to one linear layer.

  Attributes:
    weight_format: format of the stored weight residual.
    act_format: format of the run-time activations; None keeps them 16-bit (weight-only).
    smooth: migrate activation outliers into the weights with a searched per-layer alpha
      (for weight-only formats this is an AWQ-style activation-aware scale search).
    lowrank: keep a 16-bit low-rank branch of the smoothed weight (rank from the rule).
  """

  weight_format: str
  act_format: str | None
  smooth: bool
  lowrank: bool

  @property
  def needs_calibration(self) -> bool:
    return self.smooth or self.lowrank


# Compile options of the programs quantization runs (transforms, gptq): each compiles once per
# weight shape and runs a few times, so XLA's GEMM autotuning does not pay there. With it, each
# new shape's first call took 20-25 s on an H200, without it 2.7-3.1 s (2026-12-03,
# docs/benchmarks/README.md); it was most of a FLUX.1-dev quantization's time. jax takes them
# on outermost jits only: a jitted function that another calls runs as ``f.__wrapped__`` there.
QUANTIZE_COMPILER_OPTIONS = {"xla_gpu_autotune_level": 0}

WEIGHT_FORMATS = ("int4", "nvfp4", "int4_2l")
ACT_FORMATS = ("int4", "uint4", "nvfp4", "int4_2l", "int8")


def method_spec(method: str, fmt: str, act_unsigned: bool, act_fmt: str | None = None
                ) -> Method:
  """Resolves a method name, a 4-bit weight format and an activation format into a
  ``Method``. ``act_fmt`` None keeps activations in the weight format (UINT4 for int4 with
  ``act_unsigned``); 'int8' with ``fmt='int4_2l'`` is W4A8, the Hopper fast path."""
  if fmt not in WEIGHT_FORMATS:
    raise ValueError(f"format must be one of {WEIGHT_FORMATS}, got {fmt!r}")
  if act_fmt is not None and act_fmt not in ACT_FORMATS:
    raise ValueError(f"activation format must be one of {ACT_FORMATS} or None, got {act_fmt!r}")
  if act_unsigned and (fmt != "int4" or act_fmt not in (None, "int4", "uint4")):
    raise ValueError("act_unsigned is only defined for int4 weights with int4 activations")
  act4 = act_fmt or ("uint4" if act_unsigned else fmt)
  table = {
      "svdquant": Method(fmt, act4, smooth=True, lowrank=True),
      "smoothquant": Method(fmt, act4, smooth=True, lowrank=False),
      "rtn": Method(fmt, act4, smooth=False, lowrank=False),
      "w4a16": Method(fmt, None, smooth=True, lowrank=False),      # AWQ-style scales
      "w4a16_rtn": Method(fmt, None, smooth=False, lowrank=False),  # data-free
      "w8a8": Method("int8", "int8", smooth=True, lowrank=False),
  }
  if method not in table:
    raise ValueError(f"unknown method {method!r}; known methods: {sorted(table) + ['skip']}")
  return table[method]


METHODS = ("svdquant", "smoothquant", "rtn", "w4a16", "w4a16_rtn", "w8a8", "skip")
RESIDUALS = ("rtn", "gptq", "gptq_loop")


def residual_uses_gptq(residual: str) -> bool:
  """Whether a residual quantizer (``RESIDUALS``) needs each layer's input Hessian
  (``calibrate(hessian=True)``)."""
  return residual != "rtn"


@dataclasses.dataclass(frozen=True)
class Rule:
  """How the layers whose module path fully matches ``pattern`` are quantized.

  Attributes:
    pattern: regular expression, matched with ``re.fullmatch`` against the module path.
    method: one of METHODS; 'skip' keeps the matched layers 16-bit.
    fmt: weight format of the 4-bit methods: 'int4' (groups of 64), 'nvfp4' (groups of 16)
      or 'int4_2l' (two-level: row scale x 4-bit multiplier per 64-group; ``formats``).
    act_fmt: activation format of the W4A4 methods; None (default) uses ``fmt`` itself.
      'int8' (per-token) with ``fmt='int4_2l'`` is W4A8, the fastest on Hopper; 'int4_2l'
      with it is two-level W4A4. Ignored by the weight-only methods and w8a8.
    rank: rank of the low-rank branch (svdquant only).
    act_unsigned: quantize activations as unsigned INT4 [0, 15] (non-negative inputs).
    alpha: fixed smoothing migration strength; None searches ``QuantConfig.alpha_grid``.
  """

  pattern: str
  method: str = "svdquant"
  fmt: str = "int4"
  rank: int = 32
  act_unsigned: bool = False
  alpha: float | None = None
  act_fmt: str | None = None

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"rule pattern {self.pattern!r} is not a valid regex: {e}") from None
    if self.method not in METHODS:
      raise ValueError(
          f"rule {self.pattern!r}: unknown method {self.method!r}; known methods: {METHODS}")
    if self.method != "skip":
      method_spec(self.method, self.fmt, self.act_unsigned, self.act_fmt)
    if self.rank < 0:
      raise ValueError(f"rule {self.pattern!r}: rank must be >= 0, got {self.rank}")
    if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"rule {self.pattern!r}: alpha must be in [0, 1], got {self.alpha}")

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.pattern, path) is not None

  @property
  def spec(self) -> Method:
    return method_spec(self.method, self.fmt, self.act_unsigned, self.act_fmt)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Rules plus the search settings shared by all layers.

  Attributes:
    rules: ordered rules; the first match wins.
    alpha_grid: number of alpha values searched, alpha = i / alpha_grid for i < alpha_grid.
    lowrank_iters: maximum refinement iterations of the low-rank branch.
    lowrank_patience: stop refining after this many iterations without a lower error.
    share_lowrank: decompose sibling low-rank layers that receive the same input (q, k, v
      of one attention) together, with one smoothing factor and one down projection.
    svd_oversample, svd_power_iters: randomized truncated-SVD accuracy settings.
    seed: seed of the randomized SVD.
    residual: how the 4-bit residual is quantized: 'rtn' (round to nearest, the paper's) or
      'gptq' (``svdq_jax.gptq``: error feedback through the inverse Hessian of the layer's
      smoothed calibration inputs; same format and kernels) once, on the residual of the
      low-rank refinement's best branch, or 'gptq_loop': GPTQ as the refinement's own
      quantization step, every iteration (docs/gptq.md compares them). GPTQ needs
      calibration data, so rules with the data-free methods ('rtn', 'w4a16_rtn') are an
      error with it.
    gptq_damp: GPTQ's diagonal damping, relative to the Hessian's mean diagonal.
  """

  rules: tuple[Rule, ...]
  alpha_grid: int = 20
  lowrank_iters: int = 100
  lowrank_patience: int = 1
  share_lowrank: bool = True
  svd_oversample: int = 16
  svd_power_iters: int = 4
  seed: int = 0
  residual: str = "rtn"
  gptq_damp: float = 0.01

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))
    if not self.rules:
      raise ValueError("QuantConfig needs at least one rule")
    if self.alpha_grid < 1 or self.lowrank_iters < 1 or self.lowrank_patience < 1:
      raise ValueError("alpha_grid, lowrank_iters and lowrank_patience must be >= 1")
    if self.residual not in RESIDUALS:
      raise ValueError(f"residual must be one of {RESIDUALS}, got {self.residual!r}")
    if not self.gptq_damp > 0:
      raise ValueError(f"gptq_damp must be > 0, got {self.gptq_damp}")
    if self.uses_gptq:
      free = [r.pattern for r in self.rules if r.method != "skip" and not r.spec.needs_calibration]
      if free:
        raise ValueError(f"residual={self.residual!r} needs calibration data, but rules {free} use a "
                         "data-free method ('rtn', 'w4a16_rtn'); use 'smoothquant' / 'w4a16' "
                         "or residual='rtn'")

  @property
  def uses_gptq(self) -> bool:
    """Whether quantization needs each layer's input Hessian (``calibrate(hessian=True)``)."""
    return residual_uses_gptq(self.residual)

  def rule_for(self, path: str) -> Rule | None:
    return next((r for r in self.rules if r.matches(path)), None)


def preset(method: str, fmt: str = "int4", rank: int = 32, pattern: str = ".*",
           act_fmt: str | None = None, **kwargs) -> QuantConfig:
  """A one-rule config: ``preset('svdquant', 'nvfp4', rank=16)``, ``preset('w8a8')``,
  ``preset('svdquant', 'int4_2l', act_fmt='int8')`` (W4A8)..."""
  return QuantConfig(rules=(Rule(pattern, method=method, fmt=fmt, rank=rank,
                                 act_fmt=act_fmt),), **kwargs)
