"""Name and layout mapping from PyTorch FLUX state dicts to the ``models.flux`` tree.

Two namings exist: BFL (``double_blocks.N.img_attn.qkv.weight``, fused qkv) and diffusers
``FluxTransformer2DModel`` (``transformer_blocks.N.attn.to_q.weight``, split q/k/v). Torch
Linear weights are [out, in]; Flax kernels are [in, out]. Fused layers concatenate their
diffusers parts along the output axis. diffusers' final AdaLayerNormContinuous emits
(scale, shift) where BFL emits (shift, scale): those halves are swapped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from svdq_jax.convert.checkpoint import merge_trees
from svdq_jax.models.flux import FluxConfig


def _linear(dst: str, *srcs: str, swap_halves: bool = False):
  """One Flax linear from one or more torch linears (concatenated along out)."""
  return dst, srcs, swap_halves


def _bfl_rules(cfg: FluxConfig):
  rules = [_linear("img_in", "img_in"), _linear("txt_in", "txt_in"),
           _linear("time_in/in_layer", "time_in.in_layer"),
           _linear("time_in/out_layer", "time_in.out_layer"),
           _linear("vector_in/in_layer", "vector_in.in_layer"),
           _linear("vector_in/out_layer", "vector_in.out_layer"),
           _linear("final_layer/adaLN_modulation", "final_layer.adaLN_modulation.1"),
           _linear("final_layer/linear", "final_layer.linear")]
  if cfg.guidance_embed:
    rules += [_linear("guidance_in/in_layer", "guidance_in.in_layer"),
              _linear("guidance_in/out_layer", "guidance_in.out_layer")]
  norms = []
  for i in range(cfg.depth):
    for s in ("img", "txt"):
      p, d = f"double_blocks.{i}.{s}", f"double_blocks/{i}/{s}"
      rules += [_linear(f"{d}_mod/lin", f"{p}_mod.lin"),
                _linear(f"{d}_attn/qkv", f"{p}_attn.qkv"),
                _linear(f"{d}_attn/proj", f"{p}_attn.proj"),
                _linear(f"{d}_mlp/fc1", f"{p}_mlp.0"), _linear(f"{d}_mlp/fc2", f"{p}_mlp.2")]
      norms += [(f"{d}_attn/norm/{n}_norm/scale", f"{p}_attn.norm.{n}_norm.scale")
                for n in ("query", "key")]
  for i in range(cfg.depth_single_blocks):
    p, d = f"single_blocks.{i}", f"single_blocks/{i}"
    rules += [_linear(f"{d}/modulation/lin", f"{p}.modulation.lin"),
              _linear(f"{d}/linear1", f"{p}.linear1"), _linear(f"{d}/linear2", f"{p}.linear2")]
    norms += [(f"{d}/norm/{n}_norm/scale", f"{p}.norm.{n}_norm.scale") for n in ("query", "key")]
  return rules, norms


def _diffusers_rules(cfg: FluxConfig):
  t = "time_text_embed"
  rules = [_linear("img_in", "x_embedder"), _linear("txt_in", "context_embedder"),
           _linear("time_in/in_layer", f"{t}.timestep_embedder.linear_1"),
           _linear("time_in/out_layer", f"{t}.timestep_embedder.linear_2"),
           _linear("vector_in/in_layer", f"{t}.text_embedder.linear_1"),
           _linear("vector_in/out_layer", f"{t}.text_embedder.linear_2"),
           _linear("final_layer/adaLN_modulation", "norm_out.linear", swap_halves=True),
           _linear("final_layer/linear", "proj_out")]
  if cfg.guidance_embed:
    rules += [_linear("guidance_in/in_layer", f"{t}.guidance_embedder.linear_1"),
              _linear("guidance_in/out_layer", f"{t}.guidance_embedder.linear_2")]
  norms = []
  for i in range(cfg.depth):
    p, d = f"transformer_blocks.{i}", f"double_blocks/{i}"
    rules += [
        _linear(f"{d}/img_mod/lin", f"{p}.norm1.linear"),
        _linear(f"{d}/txt_mod/lin", f"{p}.norm1_context.linear"),
        _linear(f"{d}/img_attn/qkv", *(f"{p}.attn.to_{x}" for x in "qkv")),
        _linear(f"{d}/txt_attn/qkv", *(f"{p}.attn.add_{x}_proj" for x in "qkv")),
        _linear(f"{d}/img_attn/proj", f"{p}.attn.to_out.0"),
        _linear(f"{d}/txt_attn/proj", f"{p}.attn.to_add_out"),
        _linear(f"{d}/img_mlp/fc1", f"{p}.ff.net.0.proj"),
        _linear(f"{d}/img_mlp/fc2", f"{p}.ff.net.2"),
        _linear(f"{d}/txt_mlp/fc1", f"{p}.ff_context.net.0.proj"),
        _linear(f"{d}/txt_mlp/fc2", f"{p}.ff_context.net.2")]
    norms += [(f"{d}/img_attn/norm/query_norm/scale", f"{p}.attn.norm_q.weight"),
              (f"{d}/img_attn/norm/key_norm/scale", f"{p}.attn.norm_k.weight"),
              (f"{d}/txt_attn/norm/query_norm/scale", f"{p}.attn.norm_added_q.weight"),
              (f"{d}/txt_attn/norm/key_norm/scale", f"{p}.attn.norm_added_k.weight")]
  for i in range(cfg.depth_single_blocks):
    p, d = f"single_transformer_blocks.{i}", f"single_blocks/{i}"
    rules += [_linear(f"{d}/modulation/lin", f"{p}.norm.linear"),
              _linear(f"{d}/linear1", *(f"{p}.attn.to_{x}" for x in "qkv"), f"{p}.proj_mlp"),
              _linear(f"{d}/linear2", f"{p}.proj_out")]
    norms += [(f"{d}/norm/query_norm/scale", f"{p}.attn.norm_q.weight"),
              (f"{d}/norm/key_norm/scale", f"{p}.attn.norm_k.weight")]
  return rules, norms


NAMINGS: dict[str, Callable] = {"bfl": _bfl_rules, "diffusers": _diffusers_rules}


def detect_naming(keys) -> str:
  """'bfl' or 'diffusers' from a checkpoint's tensor names."""
  keys = set(keys)
  if any(k.startswith("double_blocks.") for k in keys):
    return "bfl"
  if any(k.startswith("transformer_blocks.") for k in keys):
    return "diffusers"
  raise ValueError("unknown FLUX checkpoint naming: expected 'double_blocks.*' (BFL) or "
                   f"'transformer_blocks.*' (diffusers) keys; got e.g. {sorted(keys)[:5]}")


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(int(p) if p.isdigit() else p, {})
  tree[leaf] = value


def group_of(path: str) -> str:
  """The checkpoint group a parameter path belongs to: 'double_blocks/3', 'single_blocks/0',
  or its top-level module ('img_in', 'final_layer', ...). Conversion, saving and loading go
  one group at a time, so host memory holds one block, never the model."""
  parts = path.split("/")
  return "/".join(parts[:2]) if parts[0] in ("double_blocks", "single_blocks") else parts[0]


def flux_param_groups(get: Callable[[str], np.ndarray], keys, cfg: FluxConfig,
                      naming: str | None = None,
                      put: Callable[[np.ndarray], object] = lambda x: x
                      ) -> Iterator[tuple[str, dict]]:
  """Yields ``(group, tree)`` per checkpoint group (``group_of``), each tree nested from the
  root (``{'double_blocks': {3: {...}}}``), converting only that group's tensors.

  Arguments as ``flux_params_from_torch``; the name check runs before the first group.
  """
  keys = set(keys)
  naming = naming or detect_naming(keys)
  rules, norms = NAMINGS[naming](cfg)
  wanted = {f"{s}.{p}" for _, srcs, _ in rules for s in srcs for p in ("weight", "bias")}
  wanted |= {src for _, src in norms}
  missing, unexpected = sorted(wanted - keys), sorted(keys - wanted)
  if missing or unexpected:
    raise ValueError(f"{naming} FLUX checkpoint does not match the config: "
                     f"missing {len(missing)} tensors {missing[:20]}, "
                     f"unexpected {len(unexpected)} tensors {unexpected[:20]}")
  groups: dict[str, tuple[list, list]] = {}
  for rule in rules:
    groups.setdefault(group_of(rule[0]), ([], []))[0].append(rule)
  for norm in norms:
    groups.setdefault(group_of(norm[0]), ([], []))[1].append(norm)
  for group, (group_rules, group_norms) in groups.items():
    tree: dict = {}
    for dst, srcs, swap in group_rules:
      w = np.concatenate([get(f"{s}.weight") for s in srcs], axis=0)   # torch [out, in]
      b = np.concatenate([get(f"{s}.bias") for s in srcs], axis=0)
      if swap:
        w, b = (np.concatenate(np.split(a, 2, axis=0)[::-1], axis=0) for a in (w, b))
      _set(tree, f"{dst}/kernel", put(np.ascontiguousarray(w.T)))
      _set(tree, f"{dst}/bias", put(b))
    for dst, src in group_norms:
      _set(tree, dst, put(get(src)))
    yield group, tree


def flux_params_from_torch(get: Callable[[str], np.ndarray], keys, cfg: FluxConfig,
                           naming: str | None = None,
                           put: Callable[[np.ndarray], object] = lambda x: x) -> dict:
  """Builds the nested parameter dict of ``models.flux.Flux`` from torch tensors.

  Args:
    get: tensor name -> array (lets callers stream tensors from disk one at a time).
    keys: every tensor name in the checkpoint.
    cfg: the model config the checkpoint must match.
    naming: 'bfl', 'diffusers', or None to detect it.
    put: applied to each finished parameter (e.g. ``jax.device_put``), so that the numpy
      temporaries of one layer are freed before the next is read.

  Returns:
    {'img_in': {'kernel': [K, N], 'bias': [N]}, 'double_blocks': {0: {...}}, ...}, dtypes
    kept as stored.

  Raises:
    ValueError: listing missing and unexpected tensor names.
  """
  return merge_trees(t for _, t in flux_param_groups(get, keys, cfg, naming, put))


_SHAPE_KEYS = {  # what to read each config field from, per naming
    "bfl": dict(embed="img_in.weight", txt="txt_in.weight", vec="vector_in.in_layer.weight",
                out="final_layer.linear.weight", guidance="guidance_in.in_layer.weight",
                double="double_blocks.", single="single_blocks.",
                qnorm_double="double_blocks.0.img_attn.norm.query_norm.scale",
                qnorm_single="single_blocks.0.norm.query_norm.scale",
                linear2="single_blocks.0.linear2.weight"),
    "diffusers": dict(embed="x_embedder.weight", txt="context_embedder.weight",
                      vec="time_text_embed.text_embedder.linear_1.weight",
                      out="proj_out.weight",
                      guidance="time_text_embed.guidance_embedder.linear_1.weight",
                      double="transformer_blocks.", single="single_transformer_blocks.",
                      qnorm_double="transformer_blocks.0.attn.norm_q.weight",
                      qnorm_single="single_transformer_blocks.0.attn.norm_q.weight",
                      linear2="single_transformer_blocks.0.proj_out.weight"),
}


def infer_config(keys, shape: Callable[[str], tuple], naming: str | None = None,
                 axes_dim: tuple[int, ...] | None = None) -> FluxConfig:
  """The FluxConfig a checkpoint holds, from its tensor names and shapes.

  ``axes_dim`` (RoPE split of the head dim) is not stored in checkpoints: FLUX.1's
  (16, 56, 56) is assumed for head dim 128; other head dims must pass it.
  """
  keys = set(keys)
  naming = naming or detect_naming(keys)
  k = _SHAPE_KEYS[naming]
  need = [k["embed"], k["txt"], k["vec"], k["out"]]
  absent = [n for n in need if n not in keys]
  if absent:
    raise ValueError(f"{naming} FLUX checkpoint lacks {absent}: cannot infer its config")

  def count(prefix):
    return len({n[len(prefix):].split(".")[0] for n in keys if n.startswith(prefix)})

  depth, single = count(k["double"]), count(k["single"])
  hidden, in_ch = shape(k["embed"])
  head_dim = shape(k["qnorm_double"] if depth else k["qnorm_single"])[0]
  mlp_dim = (shape(k["linear2"])[1] - hidden) if single else 4 * hidden
  if axes_dim is None:
    if head_dim != 128:
      raise ValueError(f"head dim {head_dim}: pass axes_dim (FLUX.1's (16, 56, 56) needs 128)")
    axes_dim = (16, 56, 56)
  return FluxConfig(in_channels=in_ch, out_channels=shape(k["out"])[0],
                    vec_in_dim=shape(k["vec"])[1], context_in_dim=shape(k["txt"])[1],
                    hidden_size=hidden, mlp_ratio=mlp_dim / hidden, num_heads=hidden // head_dim,
                    depth=depth, depth_single_blocks=single, axes_dim=tuple(axes_dim),
                    guidance_embed=k["guidance"] in keys)
