"""The built-in example: one FLUX-sized linear layer fed activations with outliers.

Diffusion-transformer activations have a few input channels 20-100x larger than the
median channel, persistent across tokens; that is what breaks naive 4-bit activations and
what smoothing + the low-rank branch are for. ``outlier_activations`` draws such inputs;
``layer_error_table`` quantizes one ``Linear`` (K = N = 3072 by default) with every method
through the public API (calibrate -> quantize -> apply) and measures the output error on
held-out tokens.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from svdq_jax.calibrate import calibrate
from svdq_jax.config import Rule, QuantConfig
from svdq_jax.layers import Linear
from svdq_jax.tree import quantize


def outlier_activations(key: jax.Array, tokens: int, k: int, *, outlier_channels: int = 16,
                        outlier_range=(20.0, 100.0), seed_channels: int = 0) -> jax.Array:
  """f32 [tokens, k]: Gaussian tokens with per-channel scales; ``outlier_channels``
  channels are 20-100x the median channel scale.

  Channel scales depend only on ``seed_channels`` (a property of the layer), so
  calibration and evaluation batches drawn with different keys share them.
  """
  ck = jax.random.key(seed_channels)
  k1, k2, k3 = jax.random.split(ck, 3)
  scales = jnp.exp(0.5 * jax.random.normal(k1, (k,)))       # lognormal, median 1
  idx = jax.random.choice(k2, k, (outlier_channels,), replace=False)
  lo, hi = outlier_range
  scales = scales.at[idx].set(jax.random.uniform(k3, (outlier_channels,), minval=lo, maxval=hi))
  return jax.random.normal(key, (tokens, k)) * scales


class ExampleNet(nnx.Module):
  """One linear layer, through the quantization-aware dispatch."""

  def __init__(self, k: int, n: int, rngs: nnx.Rngs):
    self.proj = Linear(k, n, rngs=rngs)

  def __call__(self, x):
    return self.proj(x)


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  rel_error: float
  sqnr_db: float
  weight_bytes: int
  seconds: float
  alpha: float | None = None
  iterations: int = 0


def default_methods() -> dict[str, Rule]:
  """The comparison rows: label -> rule."""
  rows = {
      "RTN W4A4 (INT4)": Rule(".*", "rtn", "int4"),
      "SmoothQuant W4A4 (INT4)": Rule(".*", "smoothquant", "int4"),
  }
  for fmt in ("int4", "nvfp4"):
    for r in (16, 32, 64):
      rows[f"SVDQuant W4A4 {fmt.upper()} r{r}"] = Rule(".*", "svdquant", fmt, rank=r)
  # the Hopper-native formats (scales out of the K loop), at the default rank
  rows["SVDQuant W4A8 (int4_2l / int8) r32"] = Rule(".*", "svdquant", "int4_2l", rank=32,
                                                   act_fmt="int8")
  rows["SVDQuant two-level W4A4 (int4_2l) r32"] = Rule(".*", "svdquant", "int4_2l", rank=32)
  rows["W4A16 (INT4, RTN)"] = Rule(".*", "w4a16_rtn", "int4")
  rows["W4A16 (INT4, AWQ-style scales)"] = Rule(".*", "w4a16", "int4")
  rows["W8A8 (SmoothQuant)"] = Rule(".*", "w8a8")
  return rows


def error_metrics(y_ref: jax.Array, y: jax.Array) -> tuple[float, float]:
  """(relative Frobenius error ||Y - Y_hat|| / ||Y||, SQNR in dB)."""
  y_ref = jnp.asarray(y_ref, jnp.float32)
  noise = jnp.sum(jnp.square(y_ref - jnp.asarray(y, jnp.float32)))
  signal = jnp.sum(jnp.square(y_ref))
  return float(jnp.sqrt(noise / signal)), float(10 * jnp.log10(signal / noise))


def layer_error_table(k: int = 3072, n: int = 3072, *, calib_tokens: int = 1024,
                      eval_tokens: int = 1024, batch_tokens: int = 256,
                      max_samples: int = 512, methods: dict[str, Rule] | None = None,
                      seed: int = 0, progress: bool = True) -> list[Row]:
  """Quantizes ExampleNet(k, n) with each method and measures output error on held-out
  outlier activations (bf16 weights -> the 16-bit row is the reference)."""
  for name, value in (("k", k), ("n", n), ("calib_tokens", calib_tokens),
                      ("eval_tokens", eval_tokens), ("batch_tokens", batch_tokens)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  methods = default_methods() if methods is None else methods
  batch_tokens = min(batch_tokens, calib_tokens)
  model = ExampleNet(k, n, rngs=nnx.Rngs(seed))
  graph, params = nnx.split(model)
  fwd = nnx.jit(lambda m, x: m(x), graph_updates=False)
  key = jax.random.key(seed + 1)
  batches = [outlier_activations(jax.random.fold_in(key, i), batch_tokens, k, seed_channels=seed)
             for i in range(calib_tokens // batch_tokens)]
  calib = calibrate(lambda x: fwd(model, x), batches, model=model, max_samples=max_samples,
                    progress=progress)
  x_eval = outlier_activations(jax.random.fold_in(key, 10_000), eval_tokens, k,
                               seed_channels=seed)
  y_ref = fwd(model, x_eval)
  bf16_bytes = k * n * 2
  rows = [Row("BF16 (reference)", 0.0, float("inf"), bf16_bytes, 0.0)]
  for name, rule in methods.items():
    t0 = time.perf_counter()
    report = {}
    qparams = quantize(params, calib, QuantConfig(rules=(rule,)), report=report,
                       progress=False)
    qmodel = nnx.merge(graph, qparams)
    seconds = time.perf_counter() - t0
    y = fwd(qmodel, x_eval)
    rel, sqnr = error_metrics(y_ref, y)
    rep = report["proj"]
    rows.append(Row(name, rel, sqnr, qmodel.proj.kernel.get_value().nbytes, seconds,
                    rep.alpha, rep.iterations))
  return rows


def format_table(rows: list[Row]) -> str:
  """Markdown table of the rows, with how many dB each row is above the best baseline."""
  base = {r.name: r.sqnr_db for r in rows}
  ref_sq = max(base.get("SmoothQuant W4A4 (INT4)", -np.inf), base.get("RTN W4A4 (INT4)", -np.inf))
  lines = ["| method | rel. Frobenius error | SQNR (dB) | vs best W4A4 baseline | "
           "weight bytes | alpha | low-rank iterations | quantize time (s) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    finite = np.isfinite(r.sqnr_db) and np.isfinite(ref_sq)
    gain = f"{r.sqnr_db - ref_sq:+.2f} dB" if finite else ""
    alpha = "" if r.alpha is None else f"{r.alpha:.2f}"
    lines.append(f"| {r.name} | {r.rel_error:.4f} | {r.sqnr_db:.2f} | {gain} | "
                 f"{r.weight_bytes:,} | {alpha} | {r.iterations or ''} | {r.seconds:.1f} |")
  return "\n".join(lines)
