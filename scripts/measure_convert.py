"""Measures `svdq-jax convert` on a synthetic multi-GB FLUX.1 checkpoint (issue 3).

Writes a BFL-named bf16 checkpoint with FLUX.1-dev's real tensor shapes for the embedders,
the final layer and a prefix of the blocks, then converts it in a fresh process and reports
wall time and that process's peak RSS.

    .venv/bin/python scripts/measure_convert.py --double 2 --single 4 --work /tmp/convert_bench
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

H, MLP, CTX, VEC = 3072, 12288, 4096, 768


def flux_shapes(double: int, single: int) -> dict[str, tuple[int, ...]]:
  """BFL names -> torch shapes of FLUX.1-dev, with `double` + `single` blocks."""
  s = {"img_in.weight": (H, 64), "img_in.bias": (H,), "txt_in.weight": (H, CTX),
       "txt_in.bias": (H,), "final_layer.adaLN_modulation.1.weight": (2 * H, H),
       "final_layer.adaLN_modulation.1.bias": (2 * H,), "final_layer.linear.weight": (64, H),
       "final_layer.linear.bias": (64,)}
  for e, k in (("time_in", 256), ("guidance_in", 256), ("vector_in", VEC)):
    s |= {f"{e}.in_layer.weight": (H, k), f"{e}.in_layer.bias": (H,),
          f"{e}.out_layer.weight": (H, H), f"{e}.out_layer.bias": (H,)}
  for i in range(double):
    for st in ("img", "txt"):
      p = f"double_blocks.{i}.{st}"
      for name, (o, n) in {"_mod.lin": (6 * H, H), "_attn.qkv": (3 * H, H),
                           "_attn.proj": (H, H), "_mlp.0": (MLP, H), "_mlp.2": (H, MLP)}.items():
        s |= {f"{p}{name}.weight": (o, n), f"{p}{name}.bias": (o,)}
      s |= {f"{p}_attn.norm.query_norm.scale": (128,), f"{p}_attn.norm.key_norm.scale": (128,)}
  for i in range(single):
    p = f"single_blocks.{i}"
    for name, (o, n) in {"modulation.lin": (3 * H, H), "linear1": (3 * H + MLP, H),
                         "linear2": (H, H + MLP)}.items():
      s |= {f"{p}.{name}.weight": (o, n), f"{p}.{name}.bias": (o,)}
    s |= {f"{p}.norm.query_norm.scale": (128,), f"{p}.norm.key_norm.scale": (128,)}
  return s


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--double", type=int, default=2)
  ap.add_argument("--single", type=int, default=4)
  ap.add_argument("--work", default="/tmp/convert_bench")
  args = ap.parse_args()
  shutil.rmtree(args.work, ignore_errors=True)
  os.makedirs(args.work)
  src = os.path.join(args.work, "flux_prefix.safetensors")
  rng = np.random.default_rng(0)
  tensors = {k: (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
             for k, shape in flux_shapes(args.double, args.single).items()}
  largest = max(t.nbytes for t in tensors.values())
  save_file(tensors, src)
  total = sum(t.nbytes for t in tensors.values())
  del tensors
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "svdq_jax.cli", "convert", src,
                         os.path.join(args.work, "out"), "--quiet"], capture_output=True,
                        text=True)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise SystemExit(proc.stderr)
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
  out_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                  os.walk(os.path.join(args.work, "out")) for f in fs)
  result = dict(blocks=f"{args.double} double + {args.single} single", tensors=len(
      flux_shapes(args.double, args.single)), checkpoint_bytes=total,
      largest_tensor_bytes=largest, convert_wall_s=round(wall, 1), peak_rss_bytes=peak,
      orbax_bytes=out_bytes)
  print(proc.stdout.strip())
  print(json.dumps(result, indent=1))
  print(f"| {result['blocks']} | {total / 2**30:.2f} GiB | {largest / 2**20:.0f} MiB | "
        f"{wall:.1f} s | {peak / 2**30:.2f} GiB |")


if __name__ == "__main__":
  main()
