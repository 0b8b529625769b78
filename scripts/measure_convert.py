"""Measures `svdq-jax convert` (and loading) on a synthetic multi-GB FLUX.1 checkpoint.

Writes a BFL-named bf16 checkpoint with FLUX.1-dev's real tensor shapes for the embedders,
the final layer and ``--double`` + ``--single`` blocks (``--shards`` files with an index, one
in memory at a time), then converts it in a fresh process and reports wall time and that
process's peak RSS; with ``--load``, also ``load_flux`` from the orbax folder and from the
safetensors in fresh processes (onto the default jax device).

    .venv/bin/python scripts/measure_convert.py --double 2 --single 4 --work /tmp/convert_bench
    .venv/bin/python scripts/measure_convert.py --double 19 --single 38 --shards 6   # full size
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from svdq_jax.convert.synthetic import flux_shapes, write_checkpoint

# Peak RSS is the child's VmHWM: getrusage's ru_maxrss survives execve on Linux, so a child
# forked from this (multi-GB) writer would report the writer's RSS at fork time instead.
CHILD = """
import sys, time, jax
t0 = time.perf_counter()
{body}
jax.block_until_ready(jax.tree_util.tree_leaves(out))
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(time.perf_counter() - t0, int(hwm) * 1024)
"""
CONVERT = ("from svdq_jax.convert import convert\n"
           "out = convert(sys.argv[1], sys.argv[2], progress=False) and []")
LOAD = ("from flax import nnx\nfrom svdq_jax.convert import load_flux\n"
        "out = nnx.state(load_flux(sys.argv[1]))")


def child(body: str, *args) -> tuple[float, int]:
  """(seconds, peak RSS bytes) of ``body`` run in a fresh Python process."""
  proc = subprocess.run([sys.executable, "-c", CHILD.format(body=body), *args],
                        capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(proc.stderr)
  seconds, peak = proc.stdout.split()[-2:]
  return float(seconds), int(peak)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--double", type=int, default=2)
  ap.add_argument("--single", type=int, default=4)
  ap.add_argument("--shards", type=int, default=1)
  ap.add_argument("--work", default="/tmp/convert_bench")
  ap.add_argument("--load", action="store_true", help="also time load_flux (orbax, safetensors)")
  ap.add_argument("--keep", action="store_true", help="keep the files in --work")
  ap.add_argument("--sync", action="store_true",
                  help="flush the written source to disk (os.sync) before converting")
  ap.add_argument("--reuse", action="store_true",
                  help="keep a source already in --work (same --double/--single/--shards)")
  args = ap.parse_args()
  shapes = flux_shapes(args.double, args.single)
  src = os.path.join(args.work, "src" if args.shards > 1 else "flux.safetensors")
  if not (args.reuse and os.path.exists(src)):
    shutil.rmtree(args.work, ignore_errors=True)
  shutil.rmtree(os.path.join(args.work, "out"), ignore_errors=True)
  os.makedirs(args.work, exist_ok=True)
  t0 = time.perf_counter()
  total = (2 * sum(__import__("math").prod(s) for s in shapes.values()) if os.path.exists(src)
           else write_checkpoint(src, shapes, shards=args.shards))
  if args.sync:
    os.sync()
  write_s = time.perf_counter() - t0
  # each stage's numbers as soon as it ends: a run cut short (a time limit) keeps them
  print(json.dumps(dict(stage="source", checkpoint_bytes=total, write_source_s=round(write_s, 1))),
        flush=True)
  dst = os.path.join(args.work, "out")
  wall, peak = child(CONVERT, src, dst)
  print(json.dumps(dict(stage="convert", convert_wall_s=round(wall, 1),
                        convert_peak_rss_bytes=peak)), flush=True)
  out_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs)
  result = dict(blocks=f"{args.double} double + {args.single} single", tensors=len(shapes),
                shards=args.shards, checkpoint_bytes=total, write_source_s=round(write_s, 1),
                largest_tensor_bytes=max(2 * int(__import__("math").prod(s))
                                         for s in shapes.values()),
                convert_wall_s=round(wall, 1), convert_peak_rss_bytes=peak, orbax_bytes=out_bytes)
  if args.load:
    for name, path in (("orbax", dst), ("safetensors", src)):
      s, p = child(LOAD, path)
      result[f"load_{name}_s"], result[f"load_{name}_peak_rss_bytes"] = round(s, 1), p
      print(json.dumps(dict(stage=f"load_{name}", seconds=round(s, 1), peak_rss_bytes=p)),
            flush=True)
  print(json.dumps(result, indent=1))
  print(f"| {result['blocks']} | {total / 2**30:.2f} GiB | {args.shards} | {wall:.1f} s | "
        f"{peak / 2**30:.2f} GiB |")
  if not args.keep:
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
  main()
