"""The ``svdq-jax`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


HOIST_HELP = ("on Hopper, expand the quantized 4-bit weights to int8 once per sampling call "
              "instead of once per step: ~4%% faster, N*K bytes per layer more memory while "
              "sampling (FLUX.1-dev W4A8: +8.6 GB)")
HOIST_MODULATION_HELP = ("compute every step's modulations (linears of the timestep and "
                         "pooled-text embedding only) before the sampling loop, as one batch: "
                         "their weights read once per call instead of once per step "
                         "(default; --no-hoist-modulation: at every step)")
ATTENTION_HELP = ("attention: cudnn/xla (bf16), int8qk (INT8 q k^T; on Hopper a Pallas kernel), "
                  "int8 (+ FP8 P V), fp8, cudnn_fp8 (cuDNN's FP8 kernel: the fastest on Hopper, "
                  "FLUX.1-dev's 28-step loop 1.51-1.53x of bf16 with W4A8 vs 1.37-1.39x, H200; "
                  "~2 dB of the demo's PSNR, less with --residual gptq) (default: cudnn on "
                  "NVIDIA GPUs)")


def _example(args) -> int:
  from svdq_jax import example

  try:
    rows = example.layer_error_table(args.k, args.n, calib_tokens=args.calib_tokens,
                                     eval_tokens=args.eval_tokens,
                                     max_samples=args.max_samples, seed=args.seed,
                                     progress=not args.quiet)
  except ValueError as e:
    print(f"svdq-jax example: error: {e}", file=sys.stderr)
    return 2
  table = example.format_table(rows)
  print(table)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    setting = (f"K={args.k}, N={args.n}, calibration tokens {args.calib_tokens} (sample "
               f"{args.max_samples}), evaluation tokens {args.eval_tokens}, seed {args.seed}")
    with open(os.path.join(args.out, "layer_error.md"), "w") as f:
      f.write(f"# Output error of one linear layer\n\n{setting}\n\n{table}\n")
    with open(os.path.join(args.out, "layer_error.json"), "w") as f:
      json.dump({"setting": vars(args) | {"func": None},
                 "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1, default=str)
    print(f"wrote {args.out}/layer_error.md and layer_error.json")
  return 0


def _convert(args) -> int:
  import pathlib

  from svdq_jax.convert import convert
  from svdq_jax.convert.components import convert_pipeline

  axes = tuple(int(a) for a in args.axes_dim.split(",")) if args.axes_dim else None
  try:
    if (pathlib.Path(args.src) / "model_index.json").exists():   # a whole pipeline folder
      convert_pipeline(args.src, args.dst, overwrite=args.overwrite, progress=not args.quiet)
      print(f"wrote {args.dst}: the FLUX.1 pipeline (transformer, CLIP, T5, VAE as orbax "
            f"checkpoints; tokenizers)")
      return 0
    cfg = convert(args.src, args.dst, naming=args.naming, axes_dim=axes,
                  overwrite=args.overwrite, progress=not args.quiet)
  except (ValueError, FileExistsError, FileNotFoundError) as e:
    print(f"svdq-jax convert: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.dst}: FLUX depth {cfg.depth}+{cfg.depth_single_blocks}, hidden "
        f"{cfg.hidden_size}, guidance {'yes' if cfg.guidance_embed else 'no'}")
  return 0


def _sample(args) -> int:
  import jax.numpy as jnp
  import numpy as np

  from svdq_jax.convert import load_flux
  from svdq_jax.models import sampling

  bad = [f"--{name} must be >= 1, got {value}" for name, value in
         (("steps", args.steps), ("height", args.height), ("width", args.width))
         if value is not None and value < 1]
  if bad:   # before the checkpoint is read
    print(f"svdq-jax sample: error: {'; '.join(bad)}", file=sys.stderr)
    return 2
  try:
    model = load_flux(args.checkpoint)
    cond = np.load(args.text)
    txt, y = jnp.asarray(cond["t5"]), jnp.asarray(cond["clip_pooled"])
  except (FileNotFoundError, KeyError, ValueError) as e:
    print(f"svdq-jax sample: error: {e}", file=sys.stderr)
    return 2
  if txt.ndim != 3 or y.ndim != 2 or txt.shape[0] != y.shape[0]:
    print(f"svdq-jax sample: error: expected t5 [B, L, D] and clip_pooled [B, D], got "
          f"{txt.shape} and {y.shape}", file=sys.stderr)
    return 2
  cfg = model.cfg
  noise = sampling.initial_noise(args.seed, txt.shape[0], args.height, args.width)
  steps = (28 if cfg.guidance_embed else 4) if args.steps is None else args.steps
  sigmas = sampling.schedule(steps, (noise.shape[2] // 2) * (noise.shape[3] // 2),
                             shift=cfg.guidance_embed)
  latents = sampling.sample(model, noise, txt, jnp.zeros((txt.shape[1], 3)), y, sigmas,
                            guidance=args.guidance if cfg.guidance_embed else None,
                            progress=not args.quiet, hoist_weights=args.hoist_weights,
                            hoist_modulation=args.hoist_modulation)
  np.save(args.out, np.asarray(latents))
  print(f"wrote {args.out}: latents {latents.shape} (transformer space; decode with the "
        f"FLUX VAE after z / {sampling.AE_SCALE} + {sampling.AE_SHIFT})")
  return 0


def _prompts(args) -> list[str]:
  """The prompt argument, or the non-empty lines of --batch-file."""
  if args.batch_file:
    with open(args.batch_file, encoding="utf-8") as f:
      prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
      raise ValueError(f"{args.batch_file} holds no prompts")
    return prompts
  if args.prompt is None:
    raise ValueError("give a prompt or --batch-file")
  return [args.prompt]


def _lora_arg(arg: str) -> tuple[str, float]:
  """'FILE' or 'FILE:STRENGTH'."""
  path, sep, strength = arg.rpartition(":")
  if not sep or not strength.replace(".", "", 1).replace("-", "", 1).isdigit():
    return arg, 1.0
  return path, float(strength)


def _generate(args) -> int:
  import pathlib
  import tempfile

  from flax import nnx

  from tqdm.auto import tqdm

  from svdq_jax.models.pipeline import FluxPipeline, save_png

  try:
    from svdq_jax.convert import load_flux, load_t5
    prompts = _prompts(args)
    transformer = t5 = None
    if args.quantized:
      transformer = load_flux(args.quantized)
      qt5 = pathlib.Path(args.quantized) / "text_encoder_2"   # quantize --t5 w4a16
      t5 = load_t5(qt5) if qt5.is_dir() else None
    pipe = FluxPipeline.load(args.pipeline, transformer=transformer, t5=t5,
                             t5_max_length=args.t5_max_length)
    if args.lora:
      from svdq_jax.lora import apply_loras, load_lora
      files, strengths = zip(*(_lora_arg(a) for a in args.lora))
      loras = [load_lora(f, pipe.transformer.cfg) for f in files]
      graph, state = nnx.split(pipe.transformer)
      pipe = dataclasses.replace(pipe, transformer=nnx.merge(
          graph, apply_loras(state, loras, strengths)))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = range(0, len(prompts), args.batch_size)
    for start in tqdm(batches, desc="images", disable=args.quiet or len(batches) == 1):
      images = pipe(prompts[start:start + args.batch_size], steps=args.steps,
                    guidance=args.guidance, seed=args.seed, height=args.height,
                    width=args.width, progress=not args.quiet,
                    hoist_weights=args.hoist_weights,
                    hoist_modulation=args.hoist_modulation)
      for i, image in enumerate(images, start):
        # written under a temporary name and renamed: no half-written PNG under its name
        with tempfile.NamedTemporaryFile(dir=out, prefix=".tmp-", delete=False) as tmp:
          try:
            save_png(image, tmp.name)
            os.replace(tmp.name, out / f"{i:04d}.png")
          except BaseException:
            os.unlink(tmp.name)
            raise
  except (ValueError, FileNotFoundError) as e:
    print(f"svdq-jax generate: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {len(prompts)} image(s) to {args.out}")
  return 0


def _quantize(args) -> int:
  import pathlib

  import jax

  import svdq_jax
  from svdq_jax import QuantConfig, Rule
  from svdq_jax.convert import save_model
  from svdq_jax.convert.checkpoint import atomic_directory
  from svdq_jax.models.flux import quant_config
  from svdq_jax.models.pipeline import FluxPipeline, calibration_prompts

  try:
    dst = pathlib.Path(args.qdir)
    if dst.exists() and not args.overwrite:   # refused before the minutes of quantization
      raise FileExistsError(f"destination exists: {dst} (use --overwrite)")
    prompts = _prompts(args) if args.batch_file else calibration_prompts()
    search = dict(alpha_grid=1, lowrank_iters=1) if args.fast_search else {}
    config = quant_config(args.method, args.fmt, rank=args.rank, act_fmt=args.act_fmt,
                          residual=args.residual, **search)
    # the formats as chosen (--fmt unset: flux.default_formats), for quantize.json
    args.fmt, args.act_fmt = config.rules[-1].fmt, config.rules[-1].act_fmt
    if args.hessian_memory is not None and args.hessian_memory <= 0:
      raise ValueError(f"--hessian-memory must be > 0 GB, got {args.hessian_memory}")
    if args.devices < 0 or args.devices > len(jax.devices()):
      raise ValueError(f"--devices {args.devices}: this machine has {len(jax.devices())}")
    devices = jax.devices()[:args.devices or None]
    pipe = FluxPipeline.load(args.pipeline, t5_max_length=args.t5_max_length)
    report = {}
    qmodel = pipe.quantize(config, prompts, steps=args.calib_steps, seed=args.seed,
                           height=args.calib_size, width=args.calib_size,
                           batch_size=args.batch_size, max_samples=args.max_samples,
                           progress=not args.quiet, report=report, devices=devices,
                           hessian_bytes="auto" if args.hessian_memory is None
                           else int(args.hessian_memory * 1e9))
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    errors = [r.error for r in report.values()]
    summary = dict(settings=settings, layers_quantized=len(report), calibration_prompts=len(
        prompts), mean_rel_error=sum(errors) / max(len(errors), 1))
    # QDIR: transformer/ (+ text_encoder_2/), as in a pipeline folder; all or nothing
    with atomic_directory(dst, args.overwrite) as tmp:
      save_model(tmp / "transformer", qmodel)
      if args.t5 == "w4a16":
        # T5-XXL is 9.5 GB in bf16: its linears as 4-bit weights (data-free, 16-bit compute)
        t5_config = QuantConfig(rules=(Rule(".*", "w4a16_rtn", "int4"),))
        save_model(tmp / "text_encoder_2",
                   svdq_jax.quantize(pipe.t5, None, t5_config, progress=False))
      (tmp / "quantize.json").write_text(json.dumps(summary, indent=1))
  except (ValueError, FileExistsError, FileNotFoundError) as e:
    print(f"svdq-jax quantize: error: {e}", file=sys.stderr)
    return 2
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e) or args.residual == "rtn":
      raise
    held = (f"{args.hessian_memory} GB at a time" if args.hessian_memory is not None else
            "all at once, or half the free memory at a time where they did not fit")
    print(f"svdq-jax quantize: error: out of device memory with GPTQ's Hessians held {held}"
          f" (FLUX.1-dev: 67 GB in all): give --hessian-memory a smaller budget, e.g. 30 on "
          f"an 80 GB GPU ({str(e).splitlines()[0][:200]})", file=sys.stderr)
    return 2
  print(f"wrote {args.qdir}: {len(report)} layers quantized ({args.method} {args.fmt}"
        f"{'/' + args.act_fmt if args.act_fmt else ''}, rank {args.rank}), calibrated on "
        f"{len(prompts)} prompts x {args.calib_steps} steps")
  return 0


def _demo(args) -> int:
  from svdq_jax.demo import lora as demo_lora
  from svdq_jax.demo import report, run

  prompts = list(args.prompt) if args.prompt else list(run.PROMPTS)
  methods = args.methods.split(",")
  search = {"alpha_grid": args.alpha_grid} if args.alpha_grid else None
  lora = args.lora
  if lora is None and not args.no_lora and args.weights is None and "svdquant-int4" in methods:
    lora = demo_lora.LORA   # the built-in model's built-in style LoRA
  try:
    results, outliers, rows = run.run(prompts, args.seeds, args.steps, methods, args.rank,
                                      weights=args.weights, search=search,
                                      progress=not args.quiet, lora=lora)
  except (ValueError, FileNotFoundError) as e:
    print(f"svdq-jax demo: error: {e}", file=sys.stderr)
    return 2
  setting = {"prompts": len(prompts), "seeds": list(args.seeds), "steps": args.steps,
             "rank": args.rank, "methods": methods, "alpha_grid": args.alpha_grid or 20,
             "lora": lora and os.path.basename(lora)}
  print(report.table(results))
  print(report.outlier_summary(outliers))
  paths = report.write(args.out, results, outliers, rows, setting)
  print("wrote " + ", ".join(paths))
  return 0


def _default_compile_cache() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "svdq_jax", "jax")


def _use_compile_cache(path: str) -> None:
  """Keeps compiled programs on disk (jax's persistent cache) so a second run of a command
  skips most of its compiling (CPU, `svdq-jax example --k 512 --n 512`: 27.1 s, then 11.3 s);
  a directory set through JAX_COMPILATION_CACHE_DIR wins. Programs that compiled in 0.1 s or
  more are kept (with jax's default, 1 s, none of the CPU's were: no second run was faster)."""
  import jax

  if path == "off" or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="svdq-jax", description=__doc__)
  parser.add_argument("--compile-cache", default=_default_compile_cache(), metavar="DIR",
                      help="where compiled programs are kept between runs ('off': nowhere; "
                           "default %(default)s)")
  sub = parser.add_subparsers(dest="command", required=True)
  ex = sub.add_parser("example", help="quantize the built-in example layer with every method "
                      "and print the output-error table")
  ex.add_argument("--k", type=int, default=3072, help="input features (default 3072)")
  ex.add_argument("--n", type=int, default=3072, help="output features (default 3072)")
  ex.add_argument("--calib-tokens", type=int, default=1024)
  ex.add_argument("--eval-tokens", type=int, default=1024)
  ex.add_argument("--max-samples", type=int, default=512,
                  help="calibration tokens kept for the output-error searches")
  ex.add_argument("--seed", type=int, default=0)
  ex.add_argument("--out", default="out/example", help="folder for the table files ('' for none)")
  ex.add_argument("--quiet", action="store_true", help="no progress bars")
  ex.set_defaults(func=_example)
  cv = sub.add_parser("convert", help="convert a PyTorch FLUX transformer checkpoint "
                      "(.safetensors, sharded .index.json, or a folder; BFL or diffusers "
                      "naming) into an orbax checkpoint; or a whole FLUX.1 pipeline folder "
                      "(model_index.json) into one of the same layout")
  cv.add_argument("src")
  cv.add_argument("dst")
  cv.add_argument("--naming", choices=["bfl", "diffusers"], default=None,
                  help="tensor naming (default: detected)")
  cv.add_argument("--axes-dim", default=None,
                  help="RoPE axes split of the head dim, e.g. 16,56,56 (FLUX.1, the default "
                       "for head dim 128)")
  cv.add_argument("--overwrite", action="store_true", help="replace an existing DST")
  cv.add_argument("--quiet", action="store_true", help="no progress bar")
  cv.set_defaults(func=_convert)
  sm = sub.add_parser("sample", help="sample latents from a converted FLUX checkpoint with "
                      "precomputed text embeddings (jitted Euler loop)")
  sm.add_argument("checkpoint", help="folder written by `svdq-jax convert`")
  sm.add_argument("text", help=".npz with t5 [B, L, 4096] and clip_pooled [B, 768]")
  sm.add_argument("--out", default="latents.npy")
  sm.add_argument("--height", type=int, default=1024)
  sm.add_argument("--width", type=int, default=1024)
  sm.add_argument("--steps", type=int, default=None, help="default 28 (dev) / 4 (schnell)")
  sm.add_argument("--guidance", type=float, default=3.5, help="dev only")
  sm.add_argument("--seed", type=int, default=0)
  sm.add_argument("--attention", default=None,
                  help=ATTENTION_HELP)
  sm.add_argument("--hoist-weights", action="store_true", help=HOIST_HELP)
  sm.add_argument("--hoist-modulation", action=argparse.BooleanOptionalAction, default=True,
                  help=HOIST_MODULATION_HELP)
  sm.add_argument("--quiet", action="store_true")
  sm.set_defaults(func=_sample)
  from svdq_jax.demo.methods import METHODS
  dm = sub.add_parser("demo", help="quantize the built-in text-to-image model (a small FLUX) "
                      "with SVDQuant and the baselines, sample the same prompts with each, and "
                      "write an image grid and a PSNR/SSIM table")
  dm.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
  dm.add_argument("--prompt", action="append", default=None,
                  help="a prompt (repeatable; default: 8 built-in prompts); words from: "
                       "colours, circle/square/triangle, above/below/left of/right of, 'on a "
                       "<colour> background'")
  dm.add_argument("--seeds", type=int, nargs="+", default=[0])
  dm.add_argument("--steps", type=int, default=20, help="Euler steps (default 20)")
  dm.add_argument("--methods", default=",".join(METHODS),
                  help=f"comma-separated, from {','.join(METHODS)} (default: all)")
  dm.add_argument("--rank", type=int, default=16, help="SVDQuant low-rank branch rank")
  dm.add_argument("--alpha-grid", type=int, default=None,
                  help="smoothing strengths searched per layer (default 20)")
  dm.add_argument("--weights", default=None, help="model file (default: the built-in one)")
  dm.add_argument("--lora", default=None,
                  help="LoRA file for the '16-bit + LoRA' and 'SVDQuant INT4 + LoRA' columns "
                       "(default: the built-in sepia LoRA, with the built-in weights)")
  dm.add_argument("--no-lora", action="store_true", help="no LoRA columns")
  dm.add_argument("--quiet", action="store_true", help="no progress bars")
  dm.set_defaults(func=_demo)
  gn = sub.add_parser("generate", help="text to image with a FLUX.1 pipeline folder "
                      "(diffusers layout): PNGs with the prompt and settings in their metadata")
  gn.add_argument("pipeline", help="FLUX.1 pipeline folder (model_index.json, transformer/, "
                  "text_encoder/, text_encoder_2/, vae/, tokenizer/, tokenizer_2/)")
  gn.add_argument("prompt", nargs="?", default=None)
  gn.add_argument("--batch-file", default=None, help="one prompt per line (instead of PROMPT)")
  gn.add_argument("--out", required=True, help="folder for 0000.png, 0001.png, ...")
  gn.add_argument("--steps", type=int, default=None, help="default: 28 dev, 4 schnell")
  gn.add_argument("--guidance", type=float, default=3.5, help="dev only (default 3.5)")
  gn.add_argument("--seed", type=int, default=0)
  gn.add_argument("--height", type=int, default=1024)
  gn.add_argument("--width", type=int, default=1024)
  gn.add_argument("--batch-size", type=int, default=1, help="prompts per sampling call")
  gn.add_argument("--t5-max-length", type=int, default=None,
                  help="T5 tokens (default: 512 dev, 256 schnell)")
  gn.add_argument("--quantized", default=None,
                  help="a transformer checkpoint written by `svdq-jax quantize` (replaces the "
                       "folder's transformer)")
  gn.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                  help="a LoRA (diffusers/PEFT, kohya or BFL naming) at a strength (default 1); "
                       "repeatable")
  gn.add_argument("--attention", default=None,
                  help=ATTENTION_HELP)
  gn.add_argument("--hoist-weights", action="store_true", help=HOIST_HELP)
  gn.add_argument("--hoist-modulation", action=argparse.BooleanOptionalAction, default=True,
                  help=HOIST_MODULATION_HELP)
  gn.add_argument("--quiet", action="store_true", help="no progress bars")
  gn.set_defaults(func=_generate)
  qz = sub.add_parser("quantize", help="quantize a FLUX.1 pipeline's transformer, calibrated "
                      "on denoising trajectories of a prompt set; writes a checkpoint for "
                      "`generate --quantized`")
  qz.add_argument("pipeline", help="FLUX.1 pipeline folder (diffusers layout)")
  qz.add_argument("qdir", help="output folder (orbax checkpoint + config + structure)")
  qz.add_argument("--method", default="svdquant", help="svdquant (default), smoothquant, rtn, "
                  "w4a16_rtn, ... (svdq_jax.config)")
  qz.add_argument("--fmt", default=None,
                  help="weight format: int4, nvfp4, int4_2l (default: int4_2l with int8 "
                       "activations, W4A8, when this machine's default device is a Hopper GPU, "
                       "where it is the fast one; int4 elsewhere)")
  qz.add_argument("--act-fmt", default=None,
                  help="activation format (default: the weight format, or int8 with the "
                       "Hopper default); int8 with int4_2l weights is W4A8")
  qz.add_argument("--rank", type=int, default=32, help="low-rank branch rank (default 32)")
  qz.add_argument("--batch-file", default=None,
                  help="calibration prompts, one per line (default: the 32 built-in ones)")
  qz.add_argument("--calib-steps", type=int, default=8,
                  help="sampling steps per calibration trajectory (default 8: the whole "
                       "schedule, coarser; every step is one calibration batch)")
  qz.add_argument("--calib-size", type=int, default=512, help="calibration image side")
  qz.add_argument("--batch-size", type=int, default=4, help="prompts per trajectory batch")
  qz.add_argument("--max-samples", type=int, default=256, help="tokens kept per layer")
  qz.add_argument("--seed", type=int, default=0)
  qz.add_argument("--fast-search", action="store_true",
                  help="one smoothing strength and one low-rank iteration per layer")
  qz.add_argument("--residual", choices=["rtn", "gptq", "gptq_loop"], default="rtn",
                  help="how the residual is rounded: rtn (default, the paper's) or gptq "
                       "(error feedback through each layer's input Hessian) once after the "
                       "low-rank refinement, or gptq_loop: in every refinement step "
                       "(docs/gptq.md)")
  qz.add_argument("--hessian-memory", type=float, default=None, metavar="GB",
                  help="with --residual gptq: hold the layers' Hessians (4 K^2 bytes each; "
                       "FLUX.1-dev: 67 GB in all) at most this many GB (1e9 bytes) at a "
                       "time, one more calibration pass per group (same result; e.g. 30 on "
                       "an 80 GB GPU). Default: all at once where the device's free memory "
                       "holds them, else half of it at a time")
  qz.add_argument("--devices", type=int, default=1,
                  help="spread the layers' searches over this many devices (0: all)")
  qz.add_argument("--t5-max-length", type=int, default=None)
  qz.add_argument("--t5", choices=["bf16", "w4a16"], default="bf16",
                  help="w4a16: also store T5's linears as 4-bit weights (data-free RTN) in "
                       "QDIR/text_encoder_2, which generate --quantized loads (T5-XXL: 9.5 GB "
                       "-> about 2.8 GB by its shapes)")
  qz.add_argument("--overwrite", action="store_true")
  qz.add_argument("--quiet", action="store_true", help="no progress bars")
  qz.set_defaults(func=_quantize)
  args = parser.parse_args(argv)
  _use_compile_cache(args.compile_cache)
  if getattr(args, "attention", None) is None:
    return args.func(args)
  import jax
  from svdq_jax.models import flux   # --attention: for this command only
  previous = flux.attention_implementation()
  try:
    if args.attention in ("cudnn", "cudnn_fp8") and jax.default_backend() != "gpu":
      # refused before the checkpoint is read, not when the sampler is traced
      raise ValueError(f"--attention {args.attention} is cuDNN's kernel, for NVIDIA GPUs; "
                       f"this machine runs jax on {jax.default_backend()!r} (its numerics "
                       "there: --attention xla / fp8)")
    flux.set_attention_implementation(args.attention)
  except ValueError as e:
    print(f"svdq-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
  try:
    return args.func(args)
  finally:
    flux.set_attention_implementation(previous)


if __name__ == "__main__":
  sys.exit(main())
