"""FLUX.1-dev over several GPUs of one host (issue 17): every measurement the issue asks for.

Random weights at FLUX.1-dev's size (speed does not depend on the values), bf16 and SVDQuant
(--svdq-format, quantized with --fast-search settings on random calibration inputs). Stages:
  quantize:  svdq_jax.quantize on one device, then spread over all of them (``devices=``);
             seconds each, and whether the two results are equal;
  data:      throughput: --batch images at --resolutions[0] through a --loop-steps sampling
             loop, one device vs data parallel over all (``sampling.sample(..., mesh=)``);
  sequence:  latency: one image per resolution, one device vs its tokens split over all
             devices (``parallel='sequence'``), seconds per step.
Each result line is printed as soon as it is measured; the table comes last.
A full run does not fit one 10-minute lent call: quantize (two quantizations) in one call,
data,sequence in the next (it quantizes once, spread over the devices).

    python3 scripts/bench_parallel.py --out $OUT --stages quantize
    python3 scripts/bench_parallel.py --out $OUT --stages data,sequence
    XLA_FLAGS=--xla_force_host_platform_device_count=2 .venv/bin/python \\
        scripts/bench_parallel.py --tiny --resolutions 64,128 --batch 4   # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

import svdq_jax
from svdq_jax.models import sampling
from svdq_jax.models.flux import FLUX_DEV, quant_config
from svdq_jax.timing import median_seconds

sys.path.insert(0, os.path.dirname(__file__))
from bench_flux_full import inputs, random_model  # noqa: E402

T0 = time.perf_counter()


def log(**values) -> None:
  print(json.dumps(dict(at_s=round(time.perf_counter() - T0, 1), **values)), flush=True)


def calibration(graph, state, cfg, args):
  model = nnx.merge(graph, state)
  return svdq_jax.calibrate(lambda a: model(*a[:6], guidance=a[6]),
                            [inputs(cfg, 256 if not args.tiny else 64, txt_len=64)],
                            model=model, max_samples=256, progress=False)


def quantized(state, calib, args, devices):
  """(SVDQuant state, seconds of ``svdq_jax.quantize``) with the layers on ``devices``."""
  wfmt, _, afmt = args.svdq_format.partition("/")
  config = dataclasses.replace(quant_config("svdquant", wfmt, rank=32, act_fmt=afmt or None),
                               alpha_grid=1, lowrank_iters=1)
  t0 = time.perf_counter()
  qstate = jax.block_until_ready(
      svdq_jax.quantize(state, calib, config, progress=False, devices=devices))
  return qstate, time.perf_counter() - t0


def warm_up(cfg, args, devices) -> None:
  """Compiles the quantization of every FLUX layer shape on every device (a one double +
  one single block model holds every shape), so the timed runs compare work, not the
  compilations a second device adds."""
  small = dataclasses.replace(cfg, depth=1, depth_single_blocks=1)
  graph, state = nnx.split(random_model(small))
  calib = calibration(graph, state, small, args)
  for d in devices:
    quantized(state, calib, args, [d])


def conditioning(cfg, batch: int, seed: int = 0):
  k = jax.random.split(jax.random.key(seed), 2)
  txt = jax.random.normal(k[0], (batch, 512, cfg.context_in_dim), jnp.bfloat16)
  y = jax.random.normal(k[1], (batch, cfg.vec_in_dim), jnp.bfloat16)
  return txt, jnp.zeros((512, 3)), y


def loop_seconds(model, batch, res, steps, mesh=None, parallel="data") -> float:
  noise = sampling.initial_noise(0, batch, res, res).astype(jnp.bfloat16)
  txt, txt_ids, y = conditioning(model.cfg, batch)
  sigmas = sampling.schedule(steps, (res // 16) ** 2)
  return median_seconds(lambda: sampling.sample(model, noise, txt, txt_ids, y, sigmas,
                                                guidance=3.5, mesh=mesh, parallel=parallel),
                        reps=1, rounds=3, warmup=2)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "out/bench_parallel"))
  ap.add_argument("--stages", default="quantize,data,sequence")
  ap.add_argument("--models", default="bf16,svdquant")
  ap.add_argument("--svdq-format", default="int4_2l/int8")
  ap.add_argument("--batch", type=int, default=8, help="images per data-parallel loop")
  ap.add_argument("--resolutions", default="1024,2048",
                  help="data parallel at the first; sequence parallel at each")
  ap.add_argument("--loop-steps", type=int, default=4)
  ap.add_argument("--tiny", action="store_true", help="a tiny random FLUX (CPU smoke run)")
  args = ap.parse_args()
  stages = set(args.stages.split(","))
  resolutions = [int(r) for r in args.resolutions.split(",")]
  cfg = FLUX_DEV if not args.tiny else dataclasses.replace(
      FLUX_DEV, vec_in_dim=32, context_in_dim=64, hidden_size=64, num_heads=2, depth=1,
      depth_single_blocks=1, axes_dim=(8, 12, 12))
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  os.makedirs(args.out, exist_ok=True)
  result = dict(device=devices[0].device_kind, devices=len(devices), date=time.strftime(
      "%Y-%m-%d"), svdq_format=args.svdq_format, batch=args.batch, loop_steps=args.loop_steps,
      rows=[])
  log(**{k: v for k, v in result.items() if k != "rows"})
  if len(devices) < 2:
    log(warning="one device: every 'all devices' number below is the one-device number")
  graph, state = nnx.split(random_model(cfg))
  log(stage="random bf16 model")

  def row(**r):
    result["rows"].append(r)
    log(**r)
    with open(os.path.join(args.out, "parallel.json"), "w") as f:   # after every row
      json.dump(result, f, indent=1)

  calib = None
  if "quantize" in stages or "svdquant" in args.models:
    calib = calibration(graph, state, cfg, args)
    log(stage="calibrated")
  if "quantize" in stages:
    warm_up(cfg, args, devices)
    log(stage="quantization compiled on every device")
    one, s1 = quantized(state, calib, args, devices[:1])
    log(stage="quantize on one device", seconds=round(s1, 1))
    spread, s2 = quantized(state, calib, args, devices)
    equal = all(bool(jnp.array_equal(a, b)) for a, b in
                zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(spread)))
    row(stage="quantize", model="svdquant " + args.svdq_format, seconds_1=round(s1, 1),
        seconds_n=round(s2, 1), speedup=round(s1 / s2, 2), equal_to_one_device=equal)
    del one, spread
  for name in args.models.split(",") if stages & {"data", "sequence"} else []:
    if name == "bf16":
      model = nnx.merge(graph, state)
    else:
      qstate, _ = quantized(state, calib, args, devices)
      model = nnx.merge(graph, qstate)
      name = "svdquant " + args.svdq_format
    if "data" in stages:
      res = resolutions[0]
      t1 = loop_seconds(model, args.batch, res, args.loop_steps)
      tn = loop_seconds(model, args.batch, res, args.loop_steps, mesh)
      per_image = lambda t: t / args.batch * 28 / args.loop_steps
      row(stage="data", model=name, resolution=res, batch=args.batch,
          images_per_s_1=round(1 / per_image(t1), 4), images_per_s_n=round(1 / per_image(tn), 4),
          speedup=round(t1 / tn, 2))
    if "sequence" in stages:
      for res in resolutions:
        t1 = loop_seconds(model, 1, res, args.loop_steps) / args.loop_steps
        tn = loop_seconds(model, 1, res, args.loop_steps, mesh, "sequence") / args.loop_steps
        row(stage="sequence", model=name, resolution=res, step_ms_1=round(t1 * 1e3, 1),
            step_ms_n=round(tn * 1e3, 1), ratio=round(tn / t1, 3))
    del model
  print("\n| stage | model | resolution | 1 device | all devices | ratio |")
  print("| --- | --- | ---: | ---: | ---: | ---: |")
  for r in result["rows"]:
    if r["stage"] == "quantize":
      print(f"| quantize (s; equal: {r['equal_to_one_device']}) | {r['model']} | | "
            f"{r['seconds_1']} | {r['seconds_n']} | {r['speedup']}x |")
    elif r["stage"] == "data":
      print(f"| data (images/s) | {r['model']} | {r['resolution']} | {r['images_per_s_1']} | "
            f"{r['images_per_s_n']} | {r['speedup']}x |")
    elif r["stage"] == "sequence":
      print(f"| sequence (ms/step) | {r['model']} | {r['resolution']} | {r['step_ms_1']} | "
            f"{r['step_ms_n']} | {r['ratio']} |")


if __name__ == "__main__":
  main()
