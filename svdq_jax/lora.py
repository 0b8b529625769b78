"""LoRAs on a (quantized) FLUX.1 parameter tree, without re-quantizing.

A LoRA adds ``y += s * (x A^T) B^T`` to a linear layer. An SVDQuant layer computes
``Q(x_hat) Q(R) + x_hat L_down L_up + b`` with ``x_hat = x / lambda``, so the LoRA joins its
16-bit low-rank branch exactly: ``x A^T = x_hat (lambda * A^T)``, i.e. ``L_down <- [L_down,
lambda * A^T]`` and ``L_up <- [L_up; s B^T]``. Weight-only and W4A4 layers without a branch
get one; float kernels get ``W + s A^T B^T`` merged. Strengths live in the values, so
changing them (or setting one to 0) keeps every shape: a jitted sampling loop does not
recompile. The functions are pure: the tree passed in is the LoRA-free tree to go back to.

LoRA files (safetensors) in three namings, mapped onto the model's module paths:
  diffusers / PEFT: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` [r, K] and
    ``lora_B.weight`` [N, r]; separate q/k/v (and single blocks' ``proj_mlp``) land on the
    fused layer as a block-structured up factor;
  kohya (sd-scripts): ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``,
    ``.lora_up.weight``, ``.alpha`` (scale alpha / r);
  BFL: ``double_blocks.0.img_attn.qkv.lora_A.weight`` / ``lora_B.weight`` (optionally under
    ``diffusion_model.``).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from svdq_jax.qlinear import QuantizedLinear
from svdq_jax.tree import find_kernels, replace_kernels


@dataclasses.dataclass(frozen=True)
class LoRA:
  """One LoRA in the model's module paths: {path: (down f32 [K, r], up f32 [r, N])}, the
  layer's delta being ``down @ up`` at strength 1 (alpha / rank already applied)."""
  factors: dict
  name: str = ""

  @property
  def rank(self) -> int:
    return max(d.shape[1] for d, _ in self.factors.values())


def _rules(cfg, naming: str):
  from svdq_jax.convert.mapping import NAMINGS
  rules, _ = NAMINGS[naming](cfg)
  return rules


def _load_tensors(path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"LoRA file not found: {path}")
  try:
    tensors = load_file(str(path))
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable safetensors LoRA file ({e})") from None
  return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _pairs(tensors: dict, down: str, up: str) -> tuple[dict, list[str]]:
  """{module name: (A [r, K], B [N, r], alpha or None)} for ``<name>.<down>`` / ``<up>``
  pairs, and the names left over."""
  out, used = {}, set()
  for key in tensors:
    if key.endswith("." + down):
      name = key[:-len(down) - 1]
      if name + "." + up not in tensors:
        raise ValueError(f"LoRA tensor {key} has no matching {name}.{up}")
      alpha = tensors.get(name + ".alpha")
      out[name] = (tensors[key], tensors[name + "." + up],
                   None if alpha is None else float(np.asarray(alpha).reshape(())))
      used |= {key, name + "." + up, name + ".alpha"}
  return out, sorted(set(tensors) - used)


def detect_naming(keys) -> str:
  keys = list(keys)
  if any(k.startswith("lora_unet_") for k in keys):
    return "kohya"
  if any("transformer_blocks." in k for k in keys):
    return "diffusers"
  if any(k.removeprefix("diffusion_model.").startswith(("double_blocks.", "single_blocks."))
         for k in keys):
    return "bfl"
  raise ValueError("unknown LoRA naming: expected 'lora_unet_*' (kohya), "
                   "'transformer.transformer_blocks.*' (diffusers / PEFT) or "
                   f"'double_blocks.*' (BFL) tensors; got e.g. {keys[:5]}")


def load_lora(path, cfg, naming: str | None = None) -> LoRA:
  """A LoRA file (see the module doc for the namings) for a Flux model of config ``cfg``.

  Raises ValueError naming the tensors whose module the model does not have (or that are
  not LoRA factors), and any factor whose shape does not fit its layer."""
  tensors = _load_tensors(path)
  naming = naming or detect_naming(tensors)
  layers: dict = {}   # our path -> list of (row offset, part rows, A, B, scale)
  unknown = []
  if naming == "kohya":
    pairs, rest = _pairs(tensors, "lora_down.weight", "lora_up.weight")
    by_name = {"lora_unet_" + srcs[0].replace(".", "_"): (dst, swap)
               for dst, srcs, swap in _rules(cfg, "bfl")}
    for name, (a, b, alpha) in pairs.items():
      if name not in by_name:
        unknown.append(name)
        continue
      dst, swap = by_name[name]
      scale = 1.0 if alpha is None else alpha / a.shape[0]
      layers.setdefault(dst, []).append((0, None, a, b, scale, swap))
  else:
    pairs, rest = _pairs(tensors, "lora_A.weight", "lora_B.weight")
    prefix = "transformer." if naming == "diffusers" else "diffusion_model."
    rules = _rules(cfg, "diffusers" if naming == "diffusers" else "bfl")
    by_name = {}
    for dst, srcs, swap in rules:
      offset = 0
      for src in srcs:
        rows = cfg.mlp_dim if src.endswith("proj_mlp") else (
            cfg.hidden_size if len(srcs) > 1 else None)
        by_name[src] = (dst, offset, rows, swap)
        offset += rows or 0
    for name, (a, b, alpha) in pairs.items():
      key = name.removeprefix(prefix)
      if key not in by_name:
        unknown.append(name)
        continue
      dst, offset, rows, swap = by_name[key]
      scale = 1.0 if alpha is None else alpha / a.shape[0]
      layers.setdefault(dst, []).append((offset, rows, a, b, scale, swap))
  if unknown or rest:
    raise ValueError(f"{path}: {len(unknown)} LoRA modules the model does not have "
                     f"{sorted(unknown)[:20]}, {len(rest)} tensors that are not LoRA factors "
                     f"{rest[:20]} ({naming} naming)")
  return LoRA(_fuse(layers, path), name=pathlib.Path(path).stem)


def _fuse(layers: dict, path) -> dict:
  """Per layer: the parts' factors as one down [K, sum r] and up [sum r, N] (zero outside each
  part's rows of the fused output)."""
  out = {}
  for dst, parts in layers.items():
    k = {a.shape[1] for _, _, a, _, _, _ in parts}
    if len(k) != 1:
      raise ValueError(f"{path}: LoRA factors for {dst} disagree on the input size {k}")
    n = max((off + (rows or b.shape[0])) for off, rows, _, b, _, _ in parts)
    ups = []
    for off, rows, a, b, scale, swap in parts:
      if rows is not None and b.shape[0] != rows:
        raise ValueError(f"{path}: the LoRA up factor for part of {dst} has {b.shape[0]} "
                         f"rows, the layer's part has {rows}")
      if b.shape[1] != a.shape[0]:
        raise ValueError(f"{path}: LoRA factors of {dst} disagree on the rank "
                         f"({a.shape[0]} vs {b.shape[1]})")
      up = np.zeros((a.shape[0], n), np.float32)
      up[:, off:off + b.shape[0]] = scale * b.T
      if swap:   # diffusers' final norm emits (scale, shift) where the model has (shift, scale)
        up = np.concatenate(np.split(up, 2, axis=1)[::-1], axis=1)
      ups.append(up)
    out[dst] = (np.concatenate([a.T for _, _, a, _, _, _ in parts], axis=1),
                np.concatenate(ups, axis=0))
  return out


def apply_loras(params, loras, strengths=None):
  """``params`` (nested dict or ``nnx.State`` of a Flux model, float or quantized; the same
  type comes back) with the LoRAs added at ``strengths`` (default 1 each).

  Raises ValueError naming the LoRA layers the tree does not have, or whose shapes differ."""
  loras = list(loras)
  strengths = [1.0] * len(loras) if strengths is None else list(strengths)
  if len(strengths) != len(loras):
    raise ValueError(f"{len(loras)} LoRAs but {len(strengths)} strengths")
  want: dict = {}
  for lora, s in zip(loras, strengths):
    for path, (down, up) in lora.factors.items():
      want.setdefault(path, []).append((down, up, s))
  kernels = find_kernels(params, quantized=True)
  missing = sorted(set(want) - set(kernels))
  if missing:
    raise ValueError(f"the model has no linear layers {missing[:20]} that the LoRAs "
                     f"{[l.name for l in loras]} name")
  return replace_kernels(params, {p: _extend(kernels[p], parts, p) for p, parts in want.items()})


def _extend(kernel, parts, path):
  """One layer's kernel with its LoRA parts [(down [K, r], up [r, N], strength)]."""
  downs = np.concatenate([d for d, _, _ in parts], axis=1)
  if isinstance(kernel, QuantizedLinear):
    k, n = kernel.in_features, kernel.out_features
  else:
    k, n = kernel.shape
  if downs.shape[0] != k or any(u.shape[1] != n for _, u, _ in parts):
    raise ValueError(f"LoRA factors for {path} are [{downs.shape[0]}, r] x [r, "
                     f"{parts[0][1].shape[1]}]; the layer is {k} -> {n}")
  ups = jnp.concatenate([s * jnp.asarray(u) for _, u, s in parts], axis=0)
  downs = jnp.asarray(downs)
  if not isinstance(kernel, QuantizedLinear):   # float: merged
    delta = jnp.matmul(downs, ups, precision=jax.lax.Precision.HIGHEST)
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
  if kernel.smooth is not None:   # the branch sees x / lambda: x A^T = (x / lambda)(lambda A^T)
    downs = kernel.smooth.astype(jnp.float32)[:, None] * downs
  dtype = jnp.bfloat16 if kernel.lora_down is None else kernel.lora_down.dtype
  if kernel.lora_down is not None:
    downs = jnp.concatenate([kernel.lora_down.astype(jnp.float32), downs], axis=1)
    ups = jnp.concatenate([kernel.lora_up.astype(jnp.float32), ups], axis=0)
  return kernel.replace(lora_down=downs.astype(dtype), lora_up=ups.astype(dtype))
