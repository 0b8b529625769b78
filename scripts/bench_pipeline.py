"""The whole FLUX.1-dev pipeline on one GPU (issue 15): seconds per image and peak memory.

Random bf16 weights at the real sizes (FLUX.1-dev transformer, T5-XXL, CLIP-L, FLUX's VAE;
speed and memory do not depend on the values), the tokenizers from tests/golden (ids within
both vocabularies). Each variant in a fresh process (so the device's peak bytes in use,
``memory_stats``, are that pipeline's): text encoding, the jitted 28-step sampling loop and the
VAE decode of one 1024x1024 image, timed separately (median of 3 calls after 2 warm-ups).
Variants:
  bf16:           every component bf16;
  svdquant:       the transformer SVDQuant (--svdq-format; quantized once beforehand in its
                  own process with one alpha / one low-rank iteration on random calibration
                  inputs, saved and loaded as `svdq-jax quantize` / `generate --quantized`
                  do), T5 bf16;
  svdquant_t5w4:  the same with T5's linears W4A16 (data-free RTN);
  <svdquant variant>_fp8: that pipeline with cuDNN's FP8 attention (``--attention
                  cudnn_fp8``; off a GPU its reference numerics, 'fp8', for a smoke run).

    python3 scripts/bench_pipeline.py --out $OUT [--variants bf16,svdquant,svdquant_t5w4]
        [--svdq-format int4_2l/int8] [--steps 28] [--size 1024]
        # svdquant_t5w4_fp8 as a variant: the fast configuration end to end
    .venv/bin/python scripts/bench_pipeline.py --tiny --size 64 --steps 2   # CPU smoke run

Every stage prints a JSON line as it ends (children's output is echoed as it comes): a run cut
short by a time limit shows how far it got. At full size the quantize stage alone took about
6 minutes on an H200 (2026-12-02) and the three variants together more than the 10 minutes
one lent call may run, so there: ``--stage quantize --qdir /tmp/q`` in one call, then at once
(the machine is given back after 30 s idle, and /tmp/q with it) ``--qdir /tmp/q`` in the next.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
from flax import nnx

import svdq_jax
from svdq_jax import QuantConfig, Rule
from svdq_jax.models.clip import FLUX_CLIP, CLIPTextModel
from svdq_jax.models.flux import FLUX_DEV, Flux, quant_config
from svdq_jax.models.pipeline import FluxPipeline, _decode
from svdq_jax.models.t5 import T5_XXL, T5EncoderModel
from svdq_jax.models.tokenizers import clip_tokenizer, t5_tokenizer
from svdq_jax.models.vae import FLUX_VAE, AutoencoderKL
from svdq_jax.models import sampling
from svdq_jax.timing import median_seconds
from svdq_jax.tree import tree_bytes

sys.path.insert(0, os.path.dirname(__file__))
from bench_flux_full import inputs, random_module  # noqa: E402

GOLDEN = pathlib.Path(__file__).parent.parent / "tests" / "golden"
PROMPT = "a cozy reading nook with a cat sleeping on a pile of books, warm light"


def configs(tiny: bool):
  if not tiny:
    return FLUX_DEV, T5_XXL, FLUX_CLIP, FLUX_VAE
  t5 = dataclasses.replace(T5_XXL, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
  clip = dataclasses.replace(FLUX_CLIP, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2)
  flux = dataclasses.replace(FLUX_DEV, vec_in_dim=32, context_in_dim=64, hidden_size=64,
                             num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(8, 12, 12))
  vae = dataclasses.replace(FLUX_VAE, block_out_channels=(32, 32, 32, 32), norm_num_groups=8)
  return flux, t5, clip, vae


T0 = time.perf_counter()


def log(stage: str, **values) -> None:
  """One progress line: what just finished, seconds since the process started."""
  print(json.dumps(dict(stage=stage, at_s=round(time.perf_counter() - T0, 1), **values)),
        flush=True)


def timed(fn) -> float:
  """Median seconds of 3 calls after two warm-up calls (the first compiles; a second call
  compiled again while nnx.jit handed the module's state back, committed to the device)."""
  return round(median_seconds(fn, reps=1, rounds=3, warmup=2), 3)


def measure(pipe: FluxPipeline, args) -> dict:
  r = dict(weight_bytes={n: tree_bytes(nnx.state(getattr(pipe, n)))
                         for n in ("transformer", "t5", "clip", "vae")})
  txt, y = pipe.encode_text([PROMPT])
  r["text_encoding_s"] = timed(lambda: pipe.encode_text([PROMPT]))
  log("text encoding", seconds=r["text_encoding_s"])
  _, a, _ = pipe._prepare([PROMPT], args.steps, 3.5, 0, args.size, args.size)
  loop = lambda: sampling.sample(pipe.transformer, *a[:5], guidance=a[5])
  r["sampling_s"] = timed(loop)
  log("sampling", seconds=r["sampling_s"])
  latents = loop()
  r["vae_decode_s"] = timed(lambda: _decode(pipe.vae, latents.transpose(0, 2, 3, 1)))
  r["image_s"] = round(r["text_encoding_s"] + r["sampling_s"] + r["vae_decode_s"], 3)
  stats = jax.devices()[0].memory_stats() or {}
  r["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
  r["bytes_in_use"] = stats.get("bytes_in_use")
  return r


def quantize_stage(args, fcfg, tcfg) -> None:
  """Random transformer -> SVDQuant (--fast-search on random calibration inputs) and random
  T5 -> W4A16, saved under --qdir (as `svdq-jax quantize` would)."""
  from svdq_jax.convert import save_model
  transformer = random_module(lambda: Flux(fcfg, nnx.Rngs(0)))
  log("random transformer")
  wfmt, _, afmt = args.svdq_format.partition("/")
  config = dataclasses.replace(quant_config("svdquant", wfmt, rank=32, act_fmt=afmt or None),
                               alpha_grid=1, lowrank_iters=1)
  calib = svdq_jax.calibrate(lambda b: transformer(*b[:6], guidance=b[6]),
                             [inputs(fcfg, 256, txt_len=64)], model=transformer, progress=False)
  log("calibrate")
  qmodel = svdq_jax.quantize(transformer, calib, config, progress=True)
  log("quantize transformer")
  save_model(pathlib.Path(args.qdir) / "transformer", qmodel)
  log("save transformer")
  del transformer, calib, qmodel
  t5 = random_module(lambda: T5EncoderModel(tcfg, nnx.Rngs(0)), seed=1)
  save_model(pathlib.Path(args.qdir) / "text_encoder_2", svdq_jax.quantize(
      t5, None, QuantConfig(rules=(Rule(".*", "w4a16_rtn", "int4"),)), progress=False))
  log("T5 W4A16 quantized and saved")


def measure_stage(args, fcfg, tcfg, ccfg, vcfg) -> dict:
  """One variant in this (fresh) process: peak memory is the pipeline's alone."""
  from svdq_jax.convert import load_flux, load_t5
  from svdq_jax.models import flux
  q = pathlib.Path(args.qdir) if args.qdir else None
  variant = args.variant.removesuffix("_fp8")
  if variant != args.variant:   # this process only
    flux.set_attention_implementation("cudnn_fp8" if jax.default_backend() == "gpu" else "fp8")
  transformer = (load_flux(q / "transformer") if variant.startswith("svdquant")
                 else random_module(lambda: Flux(fcfg, nnx.Rngs(0))))
  t5 = (load_t5(q / "text_encoder_2") if variant.endswith("t5w4")
        else random_module(lambda: T5EncoderModel(tcfg, nnx.Rngs(0)), seed=1))
  log("transformer and T5 ready", variant=args.variant,
      attention=flux.attention_implementation())
  pipe = FluxPipeline(
      transformer=transformer, t5=t5,
      clip=random_module(lambda: CLIPTextModel(ccfg, nnx.Rngs(0)), seed=2),
      vae=random_module(lambda: AutoencoderKL(vcfg, nnx.Rngs(0)), seed=3),
      clip_tokenizer=clip_tokenizer(GOLDEN / "clip_tokenizer"),
      t5_tokenizer=t5_tokenizer(GOLDEN / "t5_tokenizer"))
  return dict(measure(pipe, args), attention=flux.attention_implementation())


def stream(cmd: list[str]) -> dict | None:
  """Runs ``cmd``, echoing its output as it comes (a run cut short by a time limit still
  shows how far it got); returns the JSON of its ``RESULT`` line."""
  found = None
  with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
    for line in p.stdout:
      print(line, end="", flush=True)
      if line.startswith("RESULT "):
        found = json.loads(line[len("RESULT "):])
  return found


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "out/bench_pipeline"))
  ap.add_argument("--variants", default="bf16,svdquant,svdquant_t5w4")
  ap.add_argument("--svdq-format", default="int4_2l/int8")
  ap.add_argument("--steps", type=int, default=28)
  ap.add_argument("--size", type=int, default=1024)
  ap.add_argument("--tiny", action="store_true", help="tiny random configs (CPU smoke run)")
  ap.add_argument("--stage", choices=["all", "quantize", "measure"], default="all")
  ap.add_argument("--variant", default=None, help="(--stage measure) the variant")
  ap.add_argument("--qdir", default=None, help="quantized checkpoints (default: OUT/q)")
  args = ap.parse_args()
  fcfg, tcfg, ccfg, vcfg = configs(args.tiny)
  if args.stage == "quantize":
    return quantize_stage(args, fcfg, tcfg)
  if args.stage == "measure":
    print("RESULT " + json.dumps(measure_stage(args, fcfg, tcfg, ccfg, vcfg)), flush=True)
    return
  os.makedirs(args.out, exist_ok=True)
  qdir = args.qdir or os.path.join(args.out, "q")
  result = dict(device=jax.devices()[0].device_kind, steps=args.steps, size=args.size,
                svdq_format=args.svdq_format, date=time.strftime("%Y-%m-%d"), variants={})
  base = [sys.executable, __file__, "--steps", str(args.steps), "--size", str(args.size),
          "--svdq-format", args.svdq_format, "--qdir", qdir] + (["--tiny"] if args.tiny else [])
  variants = args.variants.split(",")
  if any(v.startswith("svdquant") for v in variants) and not os.path.exists(qdir):
    t0 = time.perf_counter()
    if subprocess.run(base + ["--stage", "quantize"]).returncode:
      raise SystemExit("the quantize stage failed (its output is above)")
    result["quantize_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(dict(stage="quantize", seconds=result["quantize_s"])), flush=True)
  for variant in variants:   # a fresh process each: peak memory is that pipeline's
    found = stream(base + ["--stage", "measure", "--variant", variant])
    result["variants"][variant] = found or {"error": "no RESULT line (see the log above)"}
    print(json.dumps({variant: result["variants"][variant]}), flush=True)
    with open(os.path.join(args.out, "pipeline.json"), "w") as f:   # after every variant
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
