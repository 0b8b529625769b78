"""Synthetic FLUX checkpoints with real tensor names and shapes (for measurements and tests).

Random bf16 values; conversion and loading cost depend on names, shapes and bytes only.
"""

from __future__ import annotations

import json
import os
import pathlib

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file


def flux_shapes(double: int, single: int, hidden: int = 3072, mlp_ratio: int = 4,
                context: int = 4096, vec: int = 768, head_dim: int = 128
                ) -> dict[str, tuple[int, ...]]:
  """BFL tensor names -> torch shapes of a FLUX.1-dev-like transformer (FLUX.1-dev itself:
  ``flux_shapes(19, 38)``, 23,802,816,640 bytes in bf16)."""
  h, mlp = hidden, mlp_ratio * hidden
  s = {"img_in.weight": (h, 64), "img_in.bias": (h,), "txt_in.weight": (h, context),
       "txt_in.bias": (h,), "final_layer.adaLN_modulation.1.weight": (2 * h, h),
       "final_layer.adaLN_modulation.1.bias": (2 * h,), "final_layer.linear.weight": (64, h),
       "final_layer.linear.bias": (64,)}
  for e, k in (("time_in", 256), ("guidance_in", 256), ("vector_in", vec)):
    s |= {f"{e}.in_layer.weight": (h, k), f"{e}.in_layer.bias": (h,),
          f"{e}.out_layer.weight": (h, h), f"{e}.out_layer.bias": (h,)}
  for i in range(double):
    for st in ("img", "txt"):
      p = f"double_blocks.{i}.{st}"
      for name, (o, n) in {"_mod.lin": (6 * h, h), "_attn.qkv": (3 * h, h),
                           "_attn.proj": (h, h), "_mlp.0": (mlp, h), "_mlp.2": (h, mlp)}.items():
        s |= {f"{p}{name}.weight": (o, n), f"{p}{name}.bias": (o,)}
      s |= {f"{p}_attn.norm.query_norm.scale": (head_dim,),
            f"{p}_attn.norm.key_norm.scale": (head_dim,)}
  for i in range(single):
    p = f"single_blocks.{i}"
    for name, (o, n) in {"modulation.lin": (3 * h, h), "linear1": (3 * h + mlp, h),
                         "linear2": (h, h + mlp)}.items():
      s |= {f"{p}.{name}.weight": (o, n), f"{p}.{name}.bias": (o,)}
    s |= {f"{p}.norm.query_norm.scale": (head_dim,), f"{p}.norm.key_norm.scale": (head_dim,)}
  return s


def write_checkpoint(path: str | os.PathLike, shapes: dict[str, tuple[int, ...]],
                     shards: int = 1, seed: int = 0) -> int:
  """Writes random bf16 tensors (N(0, 0.02^2)) as one ``.safetensors`` file at ``path``
  (``shards`` == 1) or as ``shards`` files plus ``model.safetensors.index.json`` in the
  folder ``path``, one shard in memory at a time. Returns the tensor bytes written."""
  path = pathlib.Path(path)
  rng = np.random.default_rng(seed)
  names = list(shapes)
  nbytes = [2 * int(np.prod(shapes[n])) for n in names]
  per_shard = sum(nbytes) / shards
  parts, current, size = [], [], 0
  for n, b in zip(names, nbytes):  # contiguous runs of about equal bytes
    current.append(n)
    size += b
    if size >= per_shard * (len(parts) + 1) and len(parts) < shards - 1:
      parts.append(current)
      current = []
  parts.append(current)
  if shards > 1:
    path.mkdir(parents=True, exist_ok=True)
  weight_map = {}
  for i, part in enumerate(parts):
    tensors = {n: (rng.standard_normal(shapes[n], np.float32) * 0.02).astype(ml_dtypes.bfloat16)
               for n in part}
    if shards == 1:
      save_file(tensors, path)
    else:
      fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
      save_file(tensors, path / fname)
      weight_map |= {n: fname for n in part}
    del tensors
  if shards > 1:
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return sum(nbytes)
