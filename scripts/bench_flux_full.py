"""FLUX.1-dev at full size on one GPU: weight memory, quantization time, step time (issue 6).

Random bf16 weights with the real FLUX.1-dev configuration (speed and memory do not depend on
weight values). Stages:
  memory:   bytes of the transformer's parameters, bf16 vs SVDQuant INT4 r32 (W4A4 attention
            and MLP linears, W4A16 modulation linears, embedders and final layer 16-bit);
  quantize: wall time of calibrate (random inputs) + svdq_jax.quantize on the GPU;
  step:     per model in --models, one at a time (only one quantized copy resident): one
            jitted denoising step (batch 1) at each --resolutions, its XLA memory plan, a full
            --loop-steps jitted sampling loop at the first resolution (median of 3 calls
            after the compiling one), and with --profile the
            device time per kernel category of one step (and per step of the loop).

    python3 scripts/bench_flux_full.py --out $OUT [--blocks 19,38] [--stages memory,quantize,step]
        [--models bf16,w4a16,svdquant] [--resolutions 1024,512] [--profile]

With ``--qdir /tmp/qf`` the quantized model is written there, and a later call with the same
quantization arguments on the same (still warm) machine restores it instead of calibrating
and quantizing again.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gzip
import json
import math
import os
import pathlib
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import svdq_jax
from svdq_jax import qlinear
from svdq_jax.models import flux, sampling
from svdq_jax.models.flux import (ATTENTION_IMPLEMENTATIONS, FLUX_DEV, Flux, quant_config,
                                  set_attention_implementation)
from svdq_jax.convert import load_flux, save_model
from svdq_jax.convert.checkpoint import is_saved_model
from svdq_jax.lora import LoRA, apply_loras
from svdq_jax.pallas_kernels import int8_hopper, w4a16_gemv, w4a4, w4a8_hopper
from svdq_jax.qlinear import QuantizedLinear
from svdq_jax.timing import device_kernel_profile, median_seconds
from svdq_jax.tree import auto_hessian_bytes, find_kernels, tree_bytes

W4A16_FLUX = quant_config("w4a16_rtn", "int4")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_normal(key, shape, std):
  return (jax.random.normal(key, shape, jnp.float32) * std).astype(jnp.bfloat16)


def random_module(factory, seed=0):
  """``factory()``'s NNX module with N(0, 1/fan_in) bf16 kernels (convs too), N(0, 1)
  embeddings, zero biases, unit norm scales, built leaf by leaf on the device (no f32 copy of
  the model)."""
  graph, abstract = nnx.split(nnx.eval_shape(factory))
  key = jax.random.key(seed)
  counter = iter(range(10**6))

  def init(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    shape = tuple(s.shape)
    if name in ("kernel", "embedding"):
      fan_in = math.prod(shape[:-1]) if name == "kernel" else 1
      return _random_normal(jax.random.fold_in(key, next(counter)), shape, fan_in ** -0.5)
    if name == "scale":
      return jnp.ones(shape, jnp.bfloat16)
    return jnp.zeros(shape, jnp.bfloat16)

  state = jax.tree_util.tree_map_with_path(init, nnx.to_pure_dict(abstract))
  nnx.replace_by_pure_dict(abstract, state)
  return nnx.merge(graph, abstract)


def random_lora(state, rank: int, seed=0) -> LoRA:
  """A rank-``rank`` LoRA on every linear of ``state`` (float or quantized), N(0, 0.01)
  factors: what a LoRA costs does not depend on its values."""
  rng = np.random.default_rng(seed)
  factors = {}
  for path, kernel in find_kernels(state, quantized=True).items():
    k, n = ((kernel.in_features, kernel.out_features) if isinstance(kernel, QuantizedLinear)
            else kernel.shape)
    factors[path] = (rng.normal(0, 0.01, (k, rank)).astype(np.float32),
                     rng.normal(0, 0.01, (rank, n)).astype(np.float32))
  return LoRA(factors, name=f"random rank {rank}")


def random_model(cfg, seed=0) -> Flux:
  """A Flux model with random bf16 weights (``random_module``)."""
  return random_module(lambda: Flux(cfg, nnx.Rngs(0)), seed)


def inputs(cfg, resolution, batch=1, txt_len=512, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  noise = sampling.initial_noise(seed, batch, resolution, resolution)
  img = sampling.pack_latents(noise).astype(jnp.bfloat16)
  ids = sampling.image_ids(noise.shape[2], noise.shape[3])
  txt = jax.random.normal(ks[0], (batch, txt_len, cfg.context_in_dim), jnp.bfloat16)
  y = jax.random.normal(ks[1], (batch, cfg.vec_in_dim), jnp.bfloat16)
  return (img, ids, txt, jnp.zeros((txt_len, 3)), jnp.full((batch,), 0.7, jnp.bfloat16), y,
          jnp.full((batch,), 3.5, jnp.bfloat16))


# --flag: the svdquant model also timed with this kernel choice flipped from its default,
# '<name>_<flag>': (flag, switch, default, what the flipped choice does)
SWITCHES = (
    ("joined_inputs", w4a4.set_input_parts, True,
     "its layers' input parts joined by XLA before the activation kernel (as before "
     "2026-12-03)"),
    ("next_layer_gelu", w4a4.set_epilogue_gelu, True,
     "fc1's / linear1's GELU left to the next layer's activation kernel instead of the GEMM's "
     "epilogue (as before 2026-12-03)"),
    ("xla_gemv", w4a16_gemv.set_enabled, True,
     "its weight-only layers (the modulation) left to XLA's fusion instead of the Pallas GEMV "
     "(as before 2026-12-03)"),
    ("expansion_pass", w4a4.set_register_expansion, True,
     "its int4_2l weights expanded by a separate pass for the int8 GEMM instead of in the "
     "W4A8 kernel's registers"),
    ("wide_tiles_only", w4a8_hopper.set_narrow_tiles, True,
     "the W4A8 kernel's 256-token tiles for every layer (the text stream's too)"),
    ("pass_row_max", w4a4.set_epilogue_row_max, True,
     "fc2's / linear2's token maxima over the GELU columns found by their activation kernel's "
     "pass, not computed in fc1's / linear1's GEMM epilogue (as before 2026-12-05)"),
    ("two_warpgroups", w4a8_hopper.set_three_warpgroups, True,
     "the W4A8 kernel's two compute warpgroups everywhere (not three where N allows, as "
     "before 2026-12-04)"),
    ("three_warpgroups_gelu", w4a8_hopper.set_three_warpgroups_gelu, True,
     "the W4A8 kernel's two compute warpgroups for the GELU layers (fc1, linear1), as "
     "before 2026-12-04's nineteenth session"),
    ("int_convert_gemv", w4a16_gemv.set_bit_unpack, True,
     "the modulation GEMV's codes made f32 by int -> f32 conversions, not by bit operations "
     "(w4a16_gemv._signed_f32), as before 2026-12-06's thirty-fifth session"),
    ("rows_gemv", w4a16_gemv.set_grouped, True,
     "the modulation GEMV's one-row products on the 2-D CUDA-core path, not on 4-D tiles "
     "(w4a16_gemv._grouped_kernel), as before 2026-12-06's thirty-ninth session"),
    ("xla_residual", w4a4.set_epilogue_residual, True,
     "the gated residuals (x + gate * out after proj, fc2, linear2) summed by XLA after the "
     "W4A8 GEMM, not in its epilogue, as before 2026-12-06's thirty-fifth session"),
    ("one_launch_gelu", w4a4.set_split_gelu, True,
     "linear1's W4A8 GEMM as one launch whose tiles take either epilogue, not two (its "
     "columns before the GELU ones, then the GELU columns), as before 2026-12-06"),
    ("f32_gelu", w4a4.set_packed_gelu, True,
     "fc1's / linear1's epilogue GELU in f32 instructions, not bf16x2 ones "
     "(int8_hopper.GELU_BF16X2), as before 2026-12-06"),
    ("unfused_fp8_operands", flux.set_fused_fp8_operands, True,
     "cuDNN FP8 attention's operands from XLA's passes, not pallas_kernels.attention_fp8's "
     "one pass, as before 2026-12-04's twentieth session (acts only on cudnn_fp8 attention)"),
    ("descaled_fp8_output", flux.set_fp8_output_part, True,
     "the single blocks' cuDNN FP8 attention output descaled by XLA before linear2, not left "
     "in E4M3 for its activation kernel (qlinear.Scaled), as before 2026-12-04's twentieth "
     "session (acts only on cudnn_fp8 attention)"),
)

# the switches whose flipped choice computes the same values as the default, so that a
# nonzero step_max_abs_diff_vs_default is a bug (2026-12-05: the epilogue maxima's ragged
# last tile gave 0.148, found only by reading this number)
KEEP_VALUES = {"expansion_pass", "wide_tiles_only", "pass_row_max", "two_warpgroups",
               "three_warpgroups_gelu", "f32_gelu", "one_launch_gelu",
               "int_convert_gemv"}
# (not xla_residual: XLA rounds its sums as its fusions do and may feed them to the next
# LayerNorm unrounded; bench_rowscaled.py --residual counts both)
# a switch renamed in SWITCHES and not here would silently lose its check
assert not (unknown := KEEP_VALUES - {flag for flag, *_ in SWITCHES}), unknown


def _stacked_rope(x, pe):
  """``flux.apply_rope`` as it was before 2026-12-03: the rotated halves joined by jnp.stack
  (the same values op by op; XLA materialized the stack as a concatenate fusion)."""
  cos, sin = (p[None, :, None, :] for p in pe)
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  re, im = xf[..., 0], xf[..., 1]
  out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


@contextlib.contextmanager
def flux_patched(name: str, replacement):
  """Models traced inside use ``replacement`` for ``flux.<name>`` (--stacked-rope's
  ``_stacked_rope``; the loop's cache is dropped on the way in and
  out: its key does not hold the function)."""
  saved = getattr(flux, name)
  setattr(flux, name, replacement)
  sampling._euler.clear_cache()
  try:
    yield
  finally:
    setattr(flux, name, saved)
    sampling._euler.clear_cache()


KERNEL_CATEGORIES = (  # (category, regex on the device kernel name); first match wins
    ("activation quantization kernels", r"svdq_quantize_act|svdq_absmax|svdq_codes"),
    ("int4_2l weight expansion", r"svdq_expand"),
    ("W4A16 GEMV kernel (modulation)", r"svdq_w4a16_gemv"),
    ("FP8 attention operands kernel", r"fp8_qkv"),
    ("attention (INT8 q k^T kernel)", r"int8qk_flash"),
    ("quantized GEMM kernels (W4A4, W4A8, int8)", r"svdq_w4a4_gemm|mosaic_gpu"),  # Triton / Mosaic
    ("attention (cuDNN)", r"(?i)fmha|flash|cudnn"),
    ("GEMM (cuBLAS/XLA)", r"(?i)gemm|nvjet|cutlass|xmma|cublas|matmul|dot"),
    ("memory copies", r"(?i)memcpy|memset"),
    ("other fusions (norms, RoPE, modulation, softmax, dequantize, ...)", r".*"),
)
OTHER = KERNEL_CATEGORIES[-1][0]


def category(kernel: str) -> str:
  return next(c for c, rx in KERNEL_CATEGORIES if re.search(rx, kernel))


def kernel_profile(fn, *args, top: int = 12, hlo: str | None = None) -> dict:
  """{category: ms per call}, the kernel launches, the streams' idle ms between them, busy and
  span ms per call (``timing.device_kernel_profile``), plus the ``top`` most expensive kernels
  by name; with the compiled program's optimized ``hlo``, the last category's time by model
  line too."""
  times, timeline = device_kernel_profile(fn, *args, calls=3)
  kinds = {name: category(name) for name in times}
  cats: dict[str, float] = {}
  for name, sec in times.items():
    cats[kinds[name]] = cats.get(kinds[name], 0.0) + sec * 1e3
  prof = {"categories_ms": cats, "total_ms": sum(cats.values()), **timeline,
          "top_kernels_ms": {k[:120]: v * 1e3 for k, v in
                             sorted(times.items(), key=lambda kv: -kv[1])[:top]}}
  if hlo is not None:
    prof["other_by_source_ms"] = time_by_source(
        {k: v for k, v in times.items() if kinds[k] == OTHER}, hlo)
  return prof


def time_by_source(times: dict[str, float], hlo: str, top: int = 40) -> dict[str, float]:
  """Kernel seconds summed by the model line their fusion's root comes from ('file:line
  function', the innermost frame; '?' where the HLO names none), in ms, largest first."""
  sources = hlo_kernel_sources(hlo, list(times))
  totals: dict[str, float] = {}
  for k, sec in times.items():
    frame = re.search(r"[^\s;]+:\d+ [^\s;]+", sources.get(k, ""))
    key = frame.group(0) if frame else "?"
    totals[key] = totals.get(key, 0.0) + sec * 1e3
  return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:top])


def hlo_kernel_sources(hlo: str, kernels) -> dict:
  """{kernel: 'out shape = root op; op_name; file:line function <- caller ...'} for the
  fusion kernels named in a profile (kernel names are HLO names with '.' and '-' as '_'),
  read from the optimized HLO's metadata and its stack-frame tables."""
  tables = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
  # comps: a computation's root, or (a tuple root has no frame) its last instruction with one
  table, comps, comp, instr, framed = None, {}, None, {}, None
  for line in hlo.splitlines():
    if line in tables:
      table = line
      continue
    if table and (m := re.match(r'(\d+) (.*)', line)):
      tables[table][int(m.group(1))] = m.group(2)
      continue
    table = None
    if m := re.match(r'(?:ENTRY )?%([\w.\-]+) \(.*\{$', line):
      comp, framed = m.group(1), None
    elif (m := re.match(r'\s*(ROOT )?%([\w.\-]+) = (\S+) ', line)):
      instr[m.group(2)] = line
      framed = line if "stack_frame_id=" in line else framed
      if m.group(1):
        comps[comp] = framed or line
  field = lambda s, k: (m.group(1) if (m := re.search(k + r'=("[^"]*"|\d+)', s)) else None)

  def where(frame_id):
    out = []
    while frame_id and len(out) < 3:
      frame = tables["StackFrames"].get(frame_id, "")
      loc = tables["FileLocations"].get(int(field(frame, "file_location_id") or 0), "")
      fname = tables["FileNames"].get(int(field(loc, "file_name_id") or 0), "?").strip('"')
      func = tables["FunctionNames"].get(int(field(loc, "function_name_id") or 0), "?")
      out.append(f"{fname.split('/')[-1]}:{field(loc, 'line')} {func.strip(chr(34))}")
      parent = int(field(frame, "parent_frame_id") or 0)
      frame_id = None if parent == frame_id else parent
    return " <- ".join(out)

  result = {}
  by_kernel = {re.sub(r"[.\-]", "_", name): line for name, line in instr.items()}
  for k in kernels:
    line = by_kernel.get(k)
    if line is None:
      continue
    m = re.search(r"calls=%([\w.\-]+)", line)
    root = comps.get(m.group(1), line) if m else line
    op = re.match(r'\s*(?:ROOT )?%[\w.\-]+ = (\S+) (\w+)', root)
    frame = field(root, "stack_frame_id")
    result[k] = "; ".join(filter(None, [
        f"{line.split(' = ')[1].split(' ')[0]} = {op.group(2) if op else '?'}",
        (field(root, "op_name") or "").strip('"'), where(int(frame)) if frame else ""]))
  return result


def call_seconds(fn, calls: int = 3) -> list[float]:
  """Seconds of each of ``calls`` calls of ``fn`` in turn, each alone (``sample()`` returns
  once its latents are ready): one loop call's time moved up to 4% between calls
  (2026-12-04)."""
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def loop_cost(model, noise, x, res, steps, steps_s, short=2) -> dict:
  """A ``sample()`` call's cost split into a per-step and a fixed part (the host's work
  before the loop starts, what runs once before and after it) from the best of the
  ``steps``-step loop's timed calls ``steps_s`` and of as many calls at ``short`` steps
  (that loop compiles once more)."""
  sigmas = sampling.schedule(short, x[0].shape[1])
  call = lambda: sampling.sample(model, noise, x[2], x[3], x[5], sigmas, guidance=3.5)
  call()
  best_short, best = min(call_seconds(call, len(steps_s))) * 1e3, min(steps_s) * 1e3
  per_step = (best - best_short) / (steps - short)
  return {f"loop{res}_per_step_ms": per_step, f"loop{res}_fixed_ms": best_short - short * per_step}


def measure(name, graph, state, cfg, args, result, variant=False, against=None):
  """Step times, memory plan, sampling loop and (optionally) profile of one model; a
  ``variant`` of the svdquant model skips the --hoist-weights / --modulation-in-loop loops.
  Returns the step's output at the first resolution (f32 numpy); ``against``: the default
  model's, whose max |difference| is recorded (0 for a switch that keeps every value)."""
  step = jax.jit(lambda st, *a: nnx.merge(graph, st)(*a[:6], guidance=a[6]))
  r = result.setdefault("models", {}).setdefault(name, {})
  r["weight_bytes"] = tree_bytes(state)
  compiled_first = None
  for res in args.resolutions:
    x = inputs(cfg, res)
    t0 = time.perf_counter()
    compiled = step.lower(state, *x).compile()
    r[f"step{res}_compile_s"] = round(time.perf_counter() - t0, 1)
    if compiled_first is None:
      compiled_first = compiled
      out = np.asarray(compiled(state, *x), np.float32)
      if against is not None:
        r["step_max_abs_diff_vs_default"] = float(np.abs(out - against).max())
    mem = compiled.memory_analysis()
    r[f"step{res}_temp_bytes"] = int(mem.temp_size_in_bytes)
    # 10 back-to-back calls a round: a round's first call waits for its host work (the
    # weights' arrays flattened in Python) with no step running behind it; with 3 calls the
    # step times sat 5-7 ms above the profiled device span (2026-12-04: bf16 127.6 vs 121.7)
    r[f"step{res}_ms"] = median_seconds(compiled, state, *x, reps=10, rounds=3) * 1e3
    if args.prepared_step and name != "bf16":   # as the sampling loop runs each step
      prepared = jax.jit(lambda st: qlinear.prepare(st, expand=False))(state)
      # what the prepared operands hold beyond the model (PreparedLinear keeps the layer)
      r["prepared_extra_bytes"] = tree_bytes(prepared) - tree_bytes(state)
      compiled_prepared = step.lower(prepared, *x).compile()
      if compiled is compiled_first:   # against the step's output taken above
        r["step_prepared_max_abs_diff"] = float(np.abs(
            np.asarray(compiled_prepared(prepared, *x), np.float32) - out).max())
      r[f"step{res}_prepared_ms"] = median_seconds(
          compiled_prepared, prepared, *x, reps=10, rounds=3) * 1e3
      del prepared, compiled_prepared
    print(json.dumps({name: r}), flush=True)
  res = args.resolutions[0]
  if args.loop_steps:
    x = inputs(cfg, res)
    noise = sampling.initial_noise(0, 1, res, res).astype(jnp.bfloat16)
    sigmas = sampling.schedule(args.loop_steps, x[0].shape[1])
    model = nnx.merge(graph, state)
    # the loop as sampled by default, then with what --hoist-weights (quantized models) moves
    # out of it and --modulation-in-loop moves into it; with --profile each is profiled
    loops = [("", {})]
    if args.hoist_weights and "svdquant" in name and not variant:
      loops.append(("hoist_weights", dict(hoist_weights=True)))
    if args.modulation_in_loop and not variant:
      loops.append(("modulation_in_loop", dict(hoist_modulation=False)))
    latents = []
    for tag, kwargs in loops:
      loop = functools.partial(sampling.sample, model, noise, x[2], x[3], x[5], sigmas,
                               guidance=3.5, **kwargs)
      t0 = time.perf_counter()
      latents.append(loop())
      first = time.perf_counter() - t0
      times = [round(t, 3) for t in call_seconds(loop)]
      suffix = f"_{tag}" if tag else ""
      key = f"loop{res}_{args.loop_steps}steps{suffix}"
      r[f"{key}_s"], r[f"{key}_calls_s"] = statistics.median(times), times
      r[f"{key}_first_call_s"] = round(first, 1)
      print(json.dumps({name: {key: r[f"{key}_s"]}}), flush=True)
      if args.profile:   # per step inside the jitted loop: what XLA hoisted out of it is gone
        prof = kernel_profile(loop)
        r[f"loop{res}_profile_per_step{suffix}"] = {
            "categories_ms": {c: v / args.loop_steps
                              for c, v in prof["categories_ms"].items()},
            **{k: prof[k] / args.loop_steps
               for k in ("total_ms", "launches", "idle_ms", "busy_ms", "span_ms")}}
      if tag:   # the same computation but for what runs before the loop
        r[f"{tag}_max_abs_diff"] = float(jnp.abs(latents[-1] - latents[0]).max())
    del latents
    if args.loop_fixed:
      r.update(loop_cost(model, noise, x, res, args.loop_steps,
                         r[f"loop{res}_{args.loop_steps}steps_calls_s"]))
    stats = jax.devices()[0].memory_stats() or {}
    r["bytes_in_use_after_loop"] = stats.get("bytes_in_use")
    r["peak_bytes_in_use_so_far"] = stats.get("peak_bytes_in_use")
    print(json.dumps({name: r}), flush=True)
  if args.profile:
    hlo = compiled_first.as_text()
    prof = kernel_profile(compiled_first, state, *inputs(cfg, res),
                          top=1000 if args.dump_hlo else 12, hlo=hlo)
    # what the most expensive fusions compute, and the model line they come from
    prof["top_kernels_hlo"] = hlo_kernel_sources(hlo, list(prof["top_kernels_ms"])[:20])
    r[f"profile{res}"] = prof
    if args.dump_hlo:  # every fusion, to map the rest of the profile by hand; gzipped: the
      # full model's text (68 MB, 2026-12-05) is over what a lent machine's call returns
      with gzip.open(os.path.join(args.out, f"{name}_step{res}_hlo.txt.gz"), "wt") as f:
        f.write(hlo)
    print(json.dumps({name: r[f"profile{res}"]}), flush=True)
  return out


def quantized_state(graph, state, cfg, args, result):
  """The SVDQuant state of the random model (``--svdq-format``, ``--residual``), calibrated
  on random inputs; its times and sizes recorded in ``result`` (main records the arguments)."""
  wfmt, _, afmt = args.svdq_format.partition("/")
  config = quant_config("svdquant", wfmt, rank=32, act_fmt=afmt or None,
                        residual=args.residual)
  if args.fast_search:
    config = dataclasses.replace(config, alpha_grid=1, lowrank_iters=1)
  t0 = time.perf_counter()
  batches = [inputs(cfg, args.calib_resolution, txt_len=64, seed=i)
             for i in range(args.calib_batches)]
  model = nnx.merge(graph, state)
  forward = lambda a: model(*a[:6], guidance=a[6])
  report = {}
  # calibrated on the default attention whatever --attention times, as `svdq-jax quantize`
  # does (under cuDNN FP8 the eager calibration took 82 s instead of ~30, 2026-12-05)
  with flux.attention_as(None):
    if args.hessian_memory is None:
      calib = svdq_jax.calibrate(forward, batches, model=model, max_samples=256,
                                 hessian=config.uses_gptq)
      t1 = time.perf_counter()
      qstate = svdq_jax.quantize(state, calib, config, report=report)
      del calib
    else:   # calibration passes and quantization interleaved: one time for both
      budget = (auto_hessian_bytes(state) if args.hessian_memory == "auto"
                else int(args.hessian_memory * 1e9))
      qstate = nnx.state(svdq_jax.calibrate_and_quantize(
          forward, batches, model, config, hessian_bytes=budget, report=report))
      t1 = None
      result.update(hessian_memory_gb=args.hessian_memory, hessian_bytes=budget)
  del model
  jax.block_until_ready(qstate)
  t2 = time.perf_counter()
  stats = jax.devices()[0].memory_stats() or {}
  result.update(calibrate_s=None if t1 is None else round(t1 - t0, 1),
                quantize_s=round(t2 - (t0 if t1 is None else t1), 1),
                quantize_peak_bytes=stats.get("peak_bytes_in_use"),
                quantized_bytes=tree_bytes(qstate), layers_quantized=len(report),
                mean_rel_error=sum(r.error for r in report.values()) / len(report))
  return qstate


# beside a --qdir checkpoint: the arguments that made it (a later call must ask for the same)
QDIR_FILE = "bench_flux_full.json"


def _qdir_key(args) -> str:
  return json.dumps(dict(blocks=args.blocks, svdq_format=args.svdq_format,
                         residual=args.residual, fast_search=args.fast_search,
                         calib_batches=args.calib_batches,
                         calib_resolution=args.calib_resolution), sort_keys=True)


def restored_state(args, result):
  """The quantized state a former call with the same quantization arguments saved under
  --qdir (calibration and quantization skipped)."""
  saved = pathlib.Path(args.qdir) / QDIR_FILE
  made_with = saved.read_text() if saved.exists() else "unknown"
  if made_with != _qdir_key(args):
    raise SystemExit(f"--qdir {args.qdir} holds a model quantized with other arguments "
                     f"({made_with}); this call asks for {_qdir_key(args)}: give another "
                     f"folder")
  t0 = time.perf_counter()
  qstate = nnx.state(load_flux(args.qdir))
  jax.block_until_ready(qstate)
  result.update(quantized_from=args.qdir, restore_s=round(time.perf_counter() - t0, 1),
                quantized_bytes=tree_bytes(qstate))
  return qstate


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "out/flux_full"))
  ap.add_argument("--blocks", default="19,38", help="double,single blocks (FLUX.1: 19,38)")
  ap.add_argument("--stages", default="memory,quantize,step")
  ap.add_argument("--models", default="bf16,w4a16,svdquant",
                  help="models timed by the step stage, in this order, one resident at a time")
  ap.add_argument("--resolutions", default="1024,512",
                  type=lambda v: [int(r) for r in v.split(",")])
  ap.add_argument("--loop-steps", type=int, default=28, help="0: no sampling loop")
  ap.add_argument("--loop-fixed", action="store_true",
                  help="also split the loop's time into per-step and fixed ms (best of its 3 "
                       "calls and of 3 at 2 steps)")
  ap.add_argument("--hoist-weights", action="store_true",
                  help="also time the quantized models' loop with sample(hoist_weights=True)")
  ap.add_argument("--modulation-in-loop", action="store_true",
                  help="also time each model's loop with sample(hoist_modulation=False), the "
                       "modulations computed at every step (the default before 2026-12-04)")
  ap.add_argument("--profile", action="store_true", help="per-kernel device time of one step")
  ap.add_argument("--dump-hlo", action="store_true",
                  help="with --profile: every kernel's time, and the step's optimized HLO "
                       "(<model>_step<res>_hlo.txt.gz in --out)")
  ap.add_argument("--attention", default="cudnn",
                  choices=[a for a in ATTENTION_IMPLEMENTATIONS if a is not None],
                  help="cudnn (bf16 flash, default), xla, cudnn_fp8 (cuDNN FP8 flash), or a "
                       "reference: int8, int8qk, fp8")
  ap.add_argument("--calib-resolution", type=int, default=256)
  ap.add_argument("--calib-batches", type=int, default=2)
  ap.add_argument("--fast-search", action="store_true",
                  help="one alpha and one low-rank iteration per layer: the same tensors (so "
                       "the same memory and speed) in a fraction of the time; quantize_s is "
                       "then not the method's time")
  ap.add_argument("--residual", choices=["rtn", "gptq", "gptq_loop"], default="rtn",
                  help="gptq: Hessians summed on the GPU during calibration (~67 GB at full "
                       "size), GPTQ on every residual")
  ap.add_argument("--hessian-memory", type=lambda v: v if v == "auto" else float(v),
                  default=None, metavar="GB",
                  help="with --residual gptq: at most this many GB of Hessians at a time "
                       "(svdq_jax.calibrate_and_quantize; one calibration pass per group), or "
                       "'auto' (its hessian_bytes='auto'; to try it as on an 80 GB GPU, set "
                       "XLA_PYTHON_CLIENT_MEM_FRACTION=0.55 on an H200); records the peak "
                       "device memory after quantization")
  ap.add_argument("--lora-ranks", default="",
                  help="also time the svdquant model with a random LoRA of each rank on every "
                       "linear (e.g. 32,64; issue 18)")
  ap.add_argument("--act-kernels", default="",
                  help="also time the svdquant model with each of these activation paths of "
                       "the row-scaled layers (w4a4.ACT_KERNELS, e.g. pallas,wide_k; the "
                       "library default is wide_k): '<name>_act_<kernel>'")
  ap.add_argument("--svdq-attention", default="",
                  help="also time the svdquant model with each of these attention "
                       "implementations (e.g. int8qk: INT8 q k^T, on Hopper the Pallas "
                       "kernel): '<name>_att_<impl>'")
  ap.add_argument("--no-split-store", dest="split_store", action="store_false",
                  help="int8_hopper.SPLIT_STORE off: wide low-rank branches (LoRAs) give up "
                       "pipeline depth instead of storing the output in halves")
  ap.add_argument("--prepared-step", action="store_true",
                  help="quantized models: the step also timed on qlinear.prepare(state, "
                       "expand=False), the weight-side operands computed once as the sampling "
                       "loop does ('step<res>_prepared_ms')")
  for flag, _, _, what in SWITCHES:
    ap.add_argument(f"--{flag.replace('_', '-')}", action="store_true",
                    help=f"the svdquant model also timed with {what}: '<name>_{flag}'")
  ap.add_argument("--flipped", default="",
                  help="comma-separated switches (the flags above, e.g. three_warpgroups_gelu) "
                       "flipped from their default for the whole run: every model and "
                       "variant is timed with them (the result records them)")
  ap.add_argument("--stacked-rope", action="store_true",
                  help="each model also timed with the RoPE written as before (jnp.stack of "
                       "the rotated halves), '<name>_stacked_rope'")
  ap.add_argument("--qdir", default="",
                  help="the quantized model's checkpoint folder: restored when it holds one "
                       "made with the same quantization arguments (calibration and "
                       "quantization skipped: ~70 s of a lent GPU's time at full size), else "
                       "written after quantizing, for the next call on the same warm machine")
  ap.add_argument("--summary", default="",
                  help="summary.json whose flux_dev_step this run rewrites (bf16 + svdquant)")
  ap.add_argument("--svdq-format", default="int4",
                  help="weights[/activations] of the svdquant model: int4, nvfp4, "
                       "int4_2l/int8 (W4A8), int4_2l/int4_2l")
  args = ap.parse_args()
  for att in (v for v in args.svdq_attention.split(",") if v):
    if att not in ATTENTION_IMPLEMENTATIONS:
      ap.error(f"--svdq-attention {att!r}: not one of {ATTENTION_IMPLEMENTATIONS}")
  if args.loop_fixed and args.loop_steps <= 2:
    ap.error(f"--loop-fixed compares the loop with a 2-step one: needs --loop-steps > 2, "
             f"got {args.loop_steps}")
  flipped = {v.replace("-", "_") for v in args.flipped.split(",") if v}
  if unknown := flipped - {flag for flag, *_ in SWITCHES}:
    ap.error(f"--flipped {sorted(unknown)}: not among {[flag for flag, *_ in SWITCHES]}")
  base = {flag: default != (flag in flipped) for flag, _, default, _ in SWITCHES}
  for flag, switch, _, _ in SWITCHES:
    switch(base[flag])
  stages = set(args.stages.split(","))
  models = args.models.split(",") if "step" in stages else []
  depth, single = (int(v) for v in args.blocks.split(","))
  cfg = FLUX_DEV.__class__(**{**FLUX_DEV.__dict__, "depth": depth,
                              "depth_single_blocks": single})
  set_attention_implementation(args.attention)
  int8_hopper.SPLIT_STORE = args.split_store
  os.makedirs(args.out, exist_ok=True)
  result = dict(device=jax.devices()[0].device_kind, blocks=[depth, single],
                attention=args.attention, split_store=args.split_store,
                flipped=sorted(flipped),
                loop_steps=args.loop_steps)

  t0 = time.perf_counter()
  model = random_model(cfg)
  jax.block_until_ready(nnx.state(model))
  result["init_s"] = round(time.perf_counter() - t0, 1)
  graph, state = nnx.split(model)
  del model
  result["bf16_bytes"] = tree_bytes(state)
  print(json.dumps(result), flush=True)

  if "bf16" in models:
    measure("bf16", graph, state, cfg, args, result)
    if args.stacked_rope:
      with flux_patched("apply_rope", _stacked_rope):
        measure("bf16_stacked_rope", graph, state, cfg, args, result)
  if "w4a16" in models:
    wstate = svdq_jax.quantize(state, None, W4A16_FLUX, progress=False)
    measure("w4a16", graph, wstate, cfg, args, result)
    del wstate

  if stages & {"quantize", "memory"} or "svdquant" in models:
    result.update(svdq_format=args.svdq_format, residual=args.residual,
                  fast_search=args.fast_search)
    if args.qdir and is_saved_model(args.qdir):
      qstate = restored_state(args, result)
    else:
      qstate = quantized_state(graph, state, cfg, args, result)
      if args.qdir:
        save_model(args.qdir, nnx.merge(graph, qstate), extra={QDIR_FILE: _qdir_key(args)})
    print(json.dumps(result), flush=True)
    del state   # only the quantized model stays resident
    if "svdquant" in models:
      name = "svdquant_" + args.svdq_format.replace("/", "_")
      out = measure(name, graph, qstate, cfg, args, result)
      default_act = w4a4.act_kernel()
      for act in (v for v in args.act_kernels.split(",") if v):  # the sampling loop retraces
        w4a4.set_act_kernel(act)
        measure(f"{name}_act_{act}", graph, qstate, cfg, args, result, variant=True)
        w4a4.set_act_kernel(default_act)
      if args.stacked_rope:
        with flux_patched("apply_rope", _stacked_rope):
          measure(f"{name}_stacked_rope", graph, qstate, cfg, args, result, variant=True)
      for flag, switch, _, _ in SWITCHES:   # a kernel choice flipped, then restored
        if getattr(args, flag):
          switch(not base[flag])
          measure(f"{name}_{flag}", graph, qstate, cfg, args, result, variant=True,
                  against=out)
          switch(base[flag])
          diff = result["models"][f"{name}_{flag}"]["step_max_abs_diff_vs_default"]
          if flag in KEEP_VALUES and diff != 0:
            print(f"WARNING: --{flag.replace('_', '-')} must compute the default's values, "
                  f"its step differs by {diff}: a bug in one of the two paths", flush=True)
      for att in (v for v in args.svdq_attention.split(",") if v):
        set_attention_implementation(att)
        measure(f"{name}_att_{att}", graph, qstate, cfg, args, result, variant=True)
        set_attention_implementation(args.attention)
      for r in (int(v) for v in args.lora_ranks.split(",") if v):
        lstate = apply_loras(qstate, [random_lora(qstate, r)], [1.0])
        result.setdefault("models", {}).setdefault(f"{name}_lora{r}", {})["lora_rank"] = r
        measure(f"{name}_lora{r}", graph, lstate, cfg, args, result)
        del lstate

  with open(os.path.join(args.out, "flux_full.json"), "w") as f:
    json.dump(result, f, indent=1)
  if args.summary:
    write_summary(args.summary, result, args.svdq_format, args.resolutions[0])
  print(json.dumps(result, indent=1))


def write_summary(path: str, result: dict, svdq_format: str, res: int) -> None:
  """Updates the "flux_dev_step" part of docs/benchmarks/summary.json from this run (needs
  the bf16 and svdquant models timed in it): its own keys (times, ratios, format, date, the
  loops' scalars) are replaced; the rest (the records of other runs and the defaults' notes,
  written by hand) is kept."""
  models = result.get("models", {})
  bf16 = models.get("bf16", {}).get(f"step{res}_ms")
  quant = models.get("svdquant_" + svdq_format.replace("/", "_"), {})
  if bf16 is None or f"step{res}_ms" not in quant:
    print("summary not written: the run lacks the bf16 or the svdquant step time")
    return
  wfmt, _, afmt = svdq_format.partition("/")
  summary = json.load(open(path)) if os.path.exists(path) else {}
  owned = {"resolution", "format", "bf16_ms", "quantized_ms", "speedup", "weight_bytes",
           "device", "date", "quantize_s", "quantize_fast_search"}
  kept = {k: v for k, v in summary.get("flux_dev_step", {}).items()
          if k not in owned and (isinstance(v, dict) or not k.startswith("loop"))}
  summary["flux_dev_step"] = dict(
      resolution=res, format=f"{wfmt}/{afmt or wfmt}", bf16_ms=bf16,
      quantized_ms=quant[f"step{res}_ms"], speedup=bf16 / quant[f"step{res}_ms"],
      weight_bytes=quant["weight_bytes"], device=result["device"],
      date=time.strftime("%Y-%m-%d"))
  loop = f"loop{res}_{steps}steps_s" if (steps := result.get("loop_steps")) else None
  if loop and loop in quant and loop in models["bf16"]:
    summary["flux_dev_step"].update({
        f"loop{steps}_bf16_s": models["bf16"][loop], f"loop{steps}_quantized_s": quant[loop],
        f"loop{steps}_speedup": models["bf16"][loop] / quant[loop]})
    for tag in ("hoist_weights", "modulation_in_loop"):
      variant = loop.replace("steps_s", f"steps_{tag}_s")
      # against bf16's loop of the same variant where it has one (not for hoist_weights)
      bf16 = models["bf16"].get(variant, models["bf16"][loop])
      if variant in quant:
        summary["flux_dev_step"].update({
            f"loop{steps}_quantized_{tag}_s": quant[variant],
            f"loop{steps}_{tag}_speedup": bf16 / quant[variant]})
      if variant in models["bf16"]:
        summary["flux_dev_step"][f"loop{steps}_bf16_{tag}_s"] = models["bf16"][variant]
  if "quantize_s" in result:   # one alpha and one low-rank iteration with --fast-search
    summary["flux_dev_step"].update(quantize_s=result["quantize_s"],
                                    quantize_fast_search=result["fast_search"])
  summary["flux_dev_step"].update(kept)
  with open(path, "w") as f:
    json.dump(summary, f, indent=1)


if __name__ == "__main__":
  main()
