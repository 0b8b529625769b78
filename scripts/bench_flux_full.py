"""FLUX.1-dev at full size on one GPU: weight memory, quantization time, step time (issue 6).

Random bf16 weights with the real FLUX.1-dev configuration (speed and memory do not depend on
weight values). Stages:
  memory:   bytes of the transformer's parameters, bf16 vs SVDQuant INT4 r32 (W4A4 attention
            and MLP linears, W4A16 modulation linears, embedders and final layer 16-bit);
  quantize: wall time of calibrate (random inputs) + svdq_jax.quantize on the GPU;
  step:     one jitted denoising step, bf16 vs SVDQuant (Pallas kernels) at --resolution.

    python3 scripts/bench_flux_full.py --out $OUT [--blocks 19,38] [--stages memory,quantize,step]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

import svdq_jax
from svdq_jax.models import sampling
from svdq_jax.models.flux import FLUX_DEV, Flux, quant_config
from svdq_jax.timing import median_seconds

SVDQUANT_FLUX = quant_config("svdquant", "int4", rank=32)
W4A16_FLUX = quant_config("w4a16_rtn", "int4")


def random_model(cfg, seed=0) -> Flux:
  """Flux with N(0, 1/fan_in) bf16 kernels, zero biases, unit norm scales, built leaf by leaf
  on the device (no f32 copy of the model)."""
  graph, abstract = nnx.split(nnx.eval_shape(lambda: Flux(cfg, nnx.Rngs(0))))
  key = jax.random.key(seed)
  counter = iter(range(10**6))

  def init(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      return jax.jit(lambda k: (jax.random.normal(k, s.shape, jnp.float32)
                                / jnp.sqrt(s.shape[0])).astype(jnp.bfloat16))(
                                    jax.random.fold_in(key, next(counter)))
    if name == "scale":
      return jnp.ones(s.shape, jnp.bfloat16)
    return jnp.zeros(s.shape, jnp.bfloat16)

  state = jax.tree_util.tree_map_with_path(init, nnx.to_pure_dict(abstract))
  nnx.replace_by_pure_dict(abstract, state)
  return nnx.merge(graph, abstract)


def tree_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def inputs(cfg, resolution, batch=1, txt_len=512, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  noise = sampling.initial_noise(seed, batch, resolution, resolution)
  img = sampling.pack_latents(noise).astype(jnp.bfloat16)
  ids = sampling.image_ids(noise.shape[2], noise.shape[3])
  txt = jax.random.normal(ks[0], (batch, txt_len, cfg.context_in_dim), jnp.bfloat16)
  y = jax.random.normal(ks[1], (batch, cfg.vec_in_dim), jnp.bfloat16)
  return (img, ids, txt, jnp.zeros((txt_len, 3)), jnp.full((batch,), 0.7, jnp.bfloat16), y,
          jnp.full((batch,), 3.5, jnp.bfloat16))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "out/flux_full"))
  ap.add_argument("--blocks", default="19,38", help="double,single blocks (FLUX.1: 19,38)")
  ap.add_argument("--stages", default="memory,quantize,step")
  ap.add_argument("--resolution", type=int, default=1024)
  ap.add_argument("--calib-resolution", type=int, default=256)
  ap.add_argument("--calib-batches", type=int, default=2)
  ap.add_argument("--fast-search", action="store_true",
                  help="one alpha and one low-rank iteration per layer: the same tensors (so "
                       "the same memory) in a fraction of the time; quantize_s is then not the "
                       "method's time")
  args = ap.parse_args()
  stages = set(args.stages.split(","))
  depth, single = (int(v) for v in args.blocks.split(","))
  cfg = FLUX_DEV.__class__(**{**FLUX_DEV.__dict__, "depth": depth,
                              "depth_single_blocks": single})
  os.makedirs(args.out, exist_ok=True)
  result = dict(device=jax.devices()[0].device_kind, blocks=[depth, single])

  t0 = time.perf_counter()
  model = random_model(cfg)
  jax.block_until_ready(nnx.state(model))
  result["init_s"] = round(time.perf_counter() - t0, 1)
  graph, state = nnx.split(model)
  result["bf16_bytes"] = tree_bytes(state)
  print(json.dumps(result), flush=True)

  if stages & {"quantize", "memory", "step"}:
    t0 = time.perf_counter()
    batches = [inputs(cfg, args.calib_resolution, txt_len=64, seed=i)
               for i in range(args.calib_batches)]
    calib = svdq_jax.calibrate(lambda a: model(*a[:6], guidance=a[6]), batches, model=model,
                               max_samples=256)
    t1 = time.perf_counter()
    report = {}
    config = SVDQUANT_FLUX
    if args.fast_search:
      config = dataclasses.replace(config, alpha_grid=1, lowrank_iters=1)
    qstate = svdq_jax.quantize(state, calib, config, report=report)
    jax.block_until_ready(qstate)
    t2 = time.perf_counter()
    result.update(fast_search=args.fast_search,
                  calibrate_s=round(t1 - t0, 1), quantize_s=round(t2 - t1, 1),
                  quantized_bytes=tree_bytes(qstate), layers_quantized=len(report),
                  mean_rel_error=sum(r.error for r in report.values()) / len(report))
    print(json.dumps(result), flush=True)
    del calib

  if "step" in stages:
    qmodel = nnx.merge(graph, qstate)
    w4a16 = nnx.merge(graph, svdq_jax.quantize(state, None, W4A16_FLUX, progress=False))
    step = nnx.jit(lambda m, *a: m(*a[:6], guidance=a[6]))
    x = inputs(cfg, args.resolution)
    for name, m in (("bf16", model), ("svdquant_int4", qmodel), ("w4a16", w4a16)):
      t0 = time.perf_counter()
      jax.block_until_ready(step(m, *x))
      compile_s = time.perf_counter() - t0
      result[f"step_{name}_ms"] = median_seconds(step, m, *x, reps=3, rounds=3) * 1e3
      result[f"step_{name}_compile_s"] = round(compile_s, 1)
      print(json.dumps(result), flush=True)
    stats = jax.devices()[0].memory_stats() or {}
    result["peak_device_bytes"] = stats.get("peak_bytes_in_use")

  with open(os.path.join(args.out, "flux_full.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
