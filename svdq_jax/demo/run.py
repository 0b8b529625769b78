"""The demo: the built-in model at 16 bits and quantized by SVDQuant and the baselines, the
same prompts and seeds through each, images and quality numbers side by side.

Pipeline: load the bf16 model -> calibrate its transformer on built-in calibration captions
(noised training-distribution images at the sampler's timesteps) -> for each method,
quantize the transformer (``models.flux.quant_config``: attention/MLP get the method,
modulation W4A16, embedders 16-bit) and sample -> PSNR/SSIM of every image against the
16-bit image of the same prompt and seed, and the relative error of the transformer's
prediction against the 16-bit one on held-out inputs (``velocity_error``: one forward pass,
so not subject to the sampling's amplification of ulp-level differences, which moves the
PSNRs by up to 2 dB between CPUs).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import svdq_jax
from svdq_jax.calibrate import LayerStats
from svdq_jax.config import residual_uses_gptq
from svdq_jax.demo import model as demo_model
from svdq_jax.demo import shapes
from svdq_jax.demo.methods import METHODS
from svdq_jax.models import flux, sampling
from svdq_jax.tree import tree_bytes


PROMPTS = (
    "a red circle above a blue square on a gray background",
    "a yellow triangle on a black background",
    "a green square left of a white circle on a blue background",
    "an orange circle right of a purple triangle on a white background",
    "a blue triangle below a red circle on a yellow background",
    "a white square on a gray background",
    "a black circle left of a green triangle on a white background",
    "a purple square above an orange square on a gray background",
)


@dataclasses.dataclass
class Result:
  """One method's row: quality against the 16-bit images, cost, and its images."""

  key: str
  label: str
  psnr_db: float
  ssim: float
  weight_bytes: int          # the transformer's parameters (all of them)
  quantize_seconds: float
  sample_seconds: float
  images: np.ndarray = dataclasses.field(repr=False)   # u8 [B, 32, 32, 3]
  reference: int = 0         # index of the row PSNR/SSIM (and diff.png) compare against
  velocity_error: float = 0.0   # ||v - v_ref|| / ||v_ref||, ``velocity_error``


def to_uint8(x: jax.Array) -> np.ndarray:
  """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
  x = np.asarray(jnp.clip((x.astype(jnp.float32) + 1) * 127.5, 0, 255) + 0.5)
  return x.astype(np.uint8).transpose(0, 2, 3, 1)


def quality(images: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
  """Mean PSNR (dB) and SSIM of uint8 images [B, H, W, 3] against the reference images.
  Identical images count as 100 dB (PSNR is unbounded there)."""
  a, b = (jnp.asarray(x, jnp.float32) / 255.0 for x in (images, reference))
  psnr = jnp.minimum(dm_pix.psnr(a, b), 100.0)
  return float(psnr.mean()), float(dm_pix.ssim(a, b).mean())


def calibration_batches(num_batches: int, batch: int, steps: int, seed: int = 1234):
  """Calibration inputs of the transformer: captions of random scenes (not the demo's
  prompts), and their images noised to timesteps of the sampling schedule, cycling through
  the schedule. Yields (ids, x_t packed [B, 256, 12], t [B])."""
  rng = np.random.default_rng(seed)
  sigmas = sampling.schedule(steps, shapes.IMAGE_TOKENS)[:-1]
  for i in range(num_batches):
    scenes = shapes.random_scenes(rng, batch)
    ids = shapes.tokenize(shapes.captions(scenes))
    x0 = sampling.pack_latents(shapes.render(scenes))
    t = jnp.asarray(sigmas[(i * batch + np.arange(batch)) % len(sigmas)])
    noise = jax.random.normal(jax.random.key(seed + i), x0.shape)
    yield ids, t[:, None, None] * noise + (1 - t[:, None, None]) * x0, t


# held-out inputs of the prediction error: 2 batches of 16, other captions and noise than
# calibration's (seed 1234)
EVAL_BATCHES, EVAL_BATCH, EVAL_SEED = 2, 16, 4321


@functools.partial(jax.jit, static_argnames=("graph", "settings"))
def _predict(graph, state, inputs, settings):
  """The transformer's velocity f32 [B, 256, 12] on (x_t, img_ids, txt, txt_ids, t, y);
  settings: the attention implementation and kernel switches read while tracing (a static
  key, so that changing them retraces)."""
  del settings
  return nnx.merge(graph, state)(*inputs).astype(jnp.float32)


def velocities(graph, state, inputs) -> list[jax.Array]:
  """The transformer ``nnx.merge(graph, state)``'s predictions on each of ``inputs`` (from
  ``eval_inputs``), with the current attention implementation and kernel switches."""
  from svdq_jax import qlinear
  settings = (flux.attention_settings(), qlinear.trace_settings())
  return [_predict(graph, state, x, settings) for x in inputs]


def velocity_error(got: list[jax.Array], want: list[jax.Array]) -> float:
  """||got - want|| / ||want|| over all batches (f32)."""
  num = sum(float(jnp.sum(jnp.square(g - w))) for g, w in zip(got, want))
  return (num / sum(float(jnp.sum(jnp.square(w))) for w in want)) ** 0.5


def eval_inputs(model, steps: int) -> list[tuple]:
  """Held-out transformer inputs (EVAL_BATCHES of EVAL_BATCH, ``calibration_batches`` with
  EVAL_SEED), text encoded once: tuples of the transformer's positional arguments, bf16."""
  img_ids = sampling.image_ids(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
  out = []
  for ids, xt, t in calibration_batches(EVAL_BATCHES, EVAL_BATCH, steps, seed=EVAL_SEED):
    txt, y = model.text(jnp.asarray(ids))
    out.append((xt.astype(jnp.bfloat16), img_ids, txt.astype(jnp.bfloat16),
                jnp.zeros((txt.shape[1], 3)), t.astype(jnp.bfloat16), y.astype(jnp.bfloat16)))
  return out


def outlier_table(calib: dict[str, LayerStats]) -> list[tuple[str, float, float]]:
  """(layer, max/median channel absmax, max |x|) for each layer whose activations the W4A4
  methods quantize (attention and MLP linears): how heavy-tailed its input channels are."""
  w4a4 = flux.quant_config("svdquant")
  rows = []
  for path, s in sorted(calib.items()):
    if w4a4.rule_for(path).method != "svdquant":
      continue
    med = float(np.median(s.absmax))
    rows.append((path, float(s.absmax.max()) / max(med, 1e-12), float(s.absmax.max())))
  return rows


def run(prompts=PROMPTS, seeds=(0,), steps: int = 20, methods=tuple(METHODS), rank: int = 16,
        calib_batches: int = 8, calib_batch: int = 16, weights: str | None = None,
        search: dict | None = None, progress: bool = True, lora: str | None = None,
        lora_strength: float = 1.0):
  """Runs the demo. Returns (results [Result, first 'bf16'], outlier rows, row labels).

  With ``lora`` (a LoRA file, e.g. ``demo.lora.LORA``), two more rows: "16-bit + LoRA"
  (compared with the 16-bit images: how far the style moves them) and "SVDQuant INT4 + LoRA"
  (the LoRA joined to the quantized model's low-rank branch, compared with 16-bit + LoRA);
  the latter needs 'svdquant-int4' among the methods.

  Images are ordered prompt-major: row i is prompt i // len(seeds), seed i % len(seeds).
  The default rank 16 is 1/12 of this model's hidden size (FLUX.1: rank 32 of 3072); the
  branch then costs about as much memory, relative to the 4-bit weights, as on FLUX.1.
  ``search`` overrides QuantConfig search settings (alpha_grid, lowrank_iters, ...).
  """
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
  if not prompts or not seeds:
    raise ValueError("need at least one prompt and one seed")
  shapes.tokenize(list(prompts))   # reject unknown words before any work
  methods = ["bf16"] + [m for m in methods if m != "bf16"]
  model = demo_model.load(weights or demo_model.WEIGHTS)
  rows = [(p, s) for p in prompts for s in seeds]
  txt, y = model.encode([p for p, _ in rows])
  txt, y = txt.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
  txt_ids = jnp.zeros((txt.shape[1], 3))
  noise = jnp.concatenate([jax.random.normal(jax.random.key(s), (1, 3, shapes.IMAGE_SIZE,
                                                                 shapes.IMAGE_SIZE))
                           for _, s in rows])
  sigmas = sampling.schedule(steps, shapes.IMAGE_TOKENS)
  graph, state = nnx.split(model.flux)

  calib = None
  if any(METHODS[m].method not in (None, "rtn") for m in methods):
    img_ids = sampling.image_ids(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)

    @jax.jit
    def forward(batch):
      ids, xt, t = batch
      t_txt, t_y = model.text(ids)
      return model.flux(xt.astype(jnp.bfloat16), img_ids, t_txt.astype(jnp.bfloat16),
                        jnp.zeros((ids.shape[1], 3)), t.astype(jnp.bfloat16),
                        t_y.astype(jnp.bfloat16))

    calib = svdq_jax.calibrate(forward, calibration_batches(calib_batches, calib_batch, steps),
                               model=model.flux, progress=progress,
                               hessian=any(residual_uses_gptq(METHODS[m].residual)
                                           for m in methods))

  held_out = eval_inputs(model, steps)
  reference_v = velocities(graph, state, held_out)
  results: list[Result] = []
  states = {}
  quantized = {}   # columns that differ only in attention share their weights
  for key in methods:
    m = METHODS[key]
    start = time.perf_counter()
    if m.method is None:
      qstate = state
    elif m.quantization in quantized:
      qstate = quantized[m.quantization]
    else:
      config = flux.quant_config(m.method, m.fmt, rank=rank, act_fmt=m.act_fmt,
                                 **{"residual": m.residual, **(search or {})})
      qstate = svdq_jax.quantize(state, calib, config, progress=progress)
      jax.block_until_ready(qstate)
    quantized[m.quantization] = qstate
    quantize_seconds = time.perf_counter() - start
    states[key] = qstate
    start = time.perf_counter()
    with flux.attention_as(m.attention or flux.attention_implementation()):
      out = sampling.sample(nnx.merge(graph, qstate), noise, txt, txt_ids, y, sigmas)
      images = to_uint8(out)
      sample_seconds = time.perf_counter() - start
      v_err = velocity_error(velocities(graph, qstate, held_out), reference_v)
    ref = results[0].images if results else images
    psnr, ssim = quality(images, ref)
    results.append(Result(key, m.label, psnr, ssim, tree_bytes(qstate), quantize_seconds,
                          sample_seconds, images, velocity_error=v_err))
    if progress and m.method is not None:
      print(f"{m.label}: PSNR {psnr:.2f} dB, SSIM {ssim:.4f}, velocity error {v_err:.2%}",
            flush=True)
  if lora is not None:
    from svdq_jax.lora import apply_loras, load_lora
    if "svdquant-int4" not in states:
      raise ValueError("the LoRA rows need the 'svdquant-int4' method")
    adapter = load_lora(lora, model.flux.cfg)
    v_ref = reference_v
    for key, label in (("bf16", "16-bit + LoRA"),
                       ("svdquant-int4", "SVDQuant INT4 + LoRA")):
      lstate = apply_loras(states[key], [adapter], [lora_strength])
      v = velocities(graph, lstate, held_out)
      v_err, v_ref = velocity_error(v, v_ref), v   # the second row: against the first
      start = time.perf_counter()
      out = sampling.sample(nnx.merge(graph, lstate), noise, txt, txt_ids, y, sigmas)
      images = to_uint8(out)
      ref = 0 if key == "bf16" else len(results) - 1
      psnr, ssim = quality(images, results[ref].images)
      results.append(Result(key + "+lora", label, psnr, ssim, tree_bytes(lstate), 0.0,
                            time.perf_counter() - start, images, ref, velocity_error=v_err))
      if progress:
        print(f"{label}: PSNR {psnr:.2f} dB, SSIM {ssim:.4f}, velocity error {v_err:.2%}",
              flush=True)
  outliers = outlier_table(calib) if calib else []
  return results, outliers, [f"{p} (seed {s})" for p, s in rows]
