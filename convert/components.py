"""PyTorch checkpoints of FLUX's pipeline components (VAE; text encoders) into NNX trees.

The NNX modules use the reference implementations' module names, so a parameter's torch name
follows from its path (``encoder/down_blocks/0/resnets/1/conv1/kernel`` ->
``encoder.down_blocks.0.resnets.1.conv1.weight``) and only the layout changes: torch Linear
weights [out, in] -> kernels [in, out], Conv2d [out, in, kh, kw] -> [kh, kw, in, out], norm
``weight`` -> ``scale``. Tensors are read one at a time and every shape is checked against
the model's, naming the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from svdq_jax.convert.checkpoint import (SafetensorsSource, atomic_directory, is_saved_model,
                                        merge_trees, restore_model, save_model, tree_groups)
from svdq_jax.models.bert import BertConfig, BertModel
from svdq_jax.models.clip import CLIPTextConfig, CLIPTextModel
from svdq_jax.models.t5 import T5Config, T5EncoderModel
from svdq_jax.models.vae import AutoencoderKL, VAEConfig


def torch_name(path: tuple) -> str:
  """Parameter path of the NNX tree -> the reference's (diffusers / transformers) name."""
  *parents, leaf = (str(p) for p in path)
  return ".".join(parents + [{"kernel": "weight", "scale": "weight",
                               "embedding": "weight"}.get(leaf, leaf)])


def _layout(shape: tuple[int, ...], want: tuple[int, ...], leaf: str):
  """(squeeze the 1x1 of a conv stored for a linear?, axis permutation or None) that takes a
  torch tensor of ``shape`` to the layout of a parameter ``leaf`` (``kernel``, ``embedding``,
  ...) of shape ``want``: embeddings [vocab, d], norms and biases stay as stored."""
  if leaf != "kernel":
    return False, None
  if len(want) == 4 and len(shape) == 4:
    return False, (2, 3, 1, 0)
  squeeze = len(want) == 2 and len(shape) == 4 and tuple(shape[2:]) == (1, 1)
  return squeeze, (1, 0) if len(want) == 2 and (squeeze or len(shape) == 2) else None


def flax_shape(shape: tuple[int, ...], want: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  """The shape ``to_flax`` gives a torch tensor of ``shape``."""
  squeeze, perm = _layout(shape, want, leaf)
  shape = tuple(shape[:2]) if squeeze else tuple(shape)
  return shape if perm is None else tuple(shape[i] for i in perm)


def to_flax(value: np.ndarray, want: tuple[int, ...], leaf: str) -> np.ndarray:
  """A torch tensor in the layout of a parameter ``leaf`` of shape ``want`` (see the module
  doc); 1x1 convolutions stored for linears (BFL's VAE attention) are squeezed."""
  squeeze, perm = _layout(value.shape, want, leaf)
  value = value[:, :, 0, 0] if squeeze else value
  return value if perm is None else np.ascontiguousarray(value.transpose(perm))


def _check_names(like: dict, source, name_of, what: str, ignore: frozenset) -> None:
  """Raises ValueError listing missing, unexpected and misshapen tensors (before any read)."""
  names = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(like)[0]:
    parts = tuple(getattr(k, "key", k) for k in path)
    names[name_of(torch_name(parts))] = (tuple(leaf.shape), str(parts[-1]))
  keys = set(source.keys())
  missing, unexpected = sorted(set(names) - keys), sorted(keys - set(names) - ignore)
  bad = [f"{n}: checkpoint {tuple(source.shape(n))}, model {names[n][0]}"
         for n in sorted(set(names) & keys)
         if flax_shape(tuple(source.shape(n)), *names[n]) != names[n][0]]
  if missing or unexpected or bad:
    raise ValueError(f"{what} does not match the model: missing {len(missing)} tensors "
                     f"{missing[:20]}, unexpected {len(unexpected)} tensors {unexpected[:20]}, "
                     f"misshapen {len(bad)} (model shapes in flax layout): {bad[:20]}")


def param_groups_from_torch(like: dict, source, name_of: Callable[[str], str] = lambda n: n,
                            put: Callable[[np.ndarray], object] = lambda x: x,
                            what: str = "checkpoint", ignore: frozenset = frozenset()
                            ) -> Iterator[tuple[str, dict]]:
  """Yields ``(group, tree)`` per checkpoint group of ``like`` (``tree_groups``: one per
  block), each read tensor by tensor from ``source`` (``SafetensorsSource``-like: ``keys``,
  ``shape``, ``get``), so a consumer that saves or places each group holds one block.

  ``like``: ``nnx.to_pure_dict`` of the abstract model; ``name_of`` maps the reference name
  (``torch_name``) to the checkpoint's naming; ``ignore``: names a checkpoint may hold that
  the model does not use (tied copies). The names and shapes are checked before the first
  read (ValueError listing every missing, unexpected and misshapen tensor)."""
  _check_names(like, source, name_of, what, ignore)
  for group, sub in tree_groups(like):
    def read(path, leaf):
      parts = tuple(getattr(k, "key", k) for k in path)
      return put(to_flax(source.get(name_of(torch_name(parts))), tuple(leaf.shape),
                         str(parts[-1])))
    yield group, jax.tree_util.tree_map_with_path(read, sub)


def params_from_torch(like: dict, source, name_of: Callable[[str], str] = lambda n: n,
                      put: Callable[[np.ndarray], object] = lambda x: x,
                      what: str = "checkpoint", ignore: frozenset = frozenset()) -> dict:
  """The whole pure parameter dict of ``param_groups_from_torch`` (same arguments)."""
  return merge_trees(t for _, t in param_groups_from_torch(like, source, name_of, put, what,
                                                            ignore))


@dataclasses.dataclass
class _Plan:
  """How one component's torch checkpoint maps onto its NNX model."""
  source: SafetensorsSource
  model_cls: type
  cfg: object
  name_of: Callable[[str], str]
  ignore: frozenset
  what: str


def _component_path(path, subfolder: str) -> pathlib.Path:
  """A pipeline folder's ``subfolder``, or ``path`` itself."""
  path = pathlib.Path(path)
  return path / subfolder if path.is_dir() and (path / subfolder).is_dir() else path


def _load(plan: _Plan, device) -> nnx.Module:
  device = device or jax.devices()[0]
  graph, state = nnx.split(nnx.eval_shape(lambda: plan.model_cls(plan.cfg, nnx.Rngs(0))))
  tree = params_from_torch(nnx.to_pure_dict(state), plan.source, plan.name_of,
                           lambda x: jax.device_put(x, device), plan.what, plan.ignore)
  nnx.replace_by_pure_dict(state, tree)
  return nnx.merge(graph, state)


# ---------------------------------------------------------------------------------- the VAE

_BFL_VAE = [("down_blocks.", "down."), ("mid_block.resnets.0", "mid.block_1"),
            ("mid_block.resnets.1", "mid.block_2"), ("mid_block.attentions.0", "mid.attn_1"),
            ("resnets.", "block."), ("downsamplers.0", "downsample"),
            ("upsamplers.0", "upsample"), ("conv_shortcut", "nin_shortcut"),
            ("conv_norm_out", "norm_out"), ("group_norm", "norm"), ("to_q", "q"),
            ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def bfl_vae_name(name: str, n_blocks: int) -> str:
  """diffusers AutoencoderKL name -> BFL ``ae.safetensors`` (LDM) name: ``down``/``up``
  blocks with the decoder's ``up`` numbered from the lowest resolution, ``mid.block_1`` /
  ``attn_1`` / ``block_2``, ``nin_shortcut``, attention ``q k v proj_out``."""
  for a, b in _BFL_VAE:
    name = name.replace(a, b)
  if name.startswith("decoder.up_blocks."):
    _, _, i, rest = name.split(".", 3)
    name = f"decoder.up.{n_blocks - 1 - int(i)}.{rest}"
  return name


def vae_naming(keys) -> str:
  keys = set(keys)
  if any(k.startswith("encoder.down_blocks.") or k.startswith("decoder.up_blocks.")
         for k in keys):
    return "diffusers"
  if any(k.startswith("encoder.down.") or k.startswith("decoder.up.") for k in keys):
    return "bfl"
  raise ValueError("not a FLUX VAE checkpoint: expected 'encoder.down_blocks.*' (diffusers) "
                   f"or 'encoder.down.*' (BFL ae.safetensors) tensors; got e.g. "
                   f"{sorted(keys)[:5]}")


def vae_config(folder: pathlib.Path | None) -> VAEConfig:
  """The VAEConfig of a diffusers ``vae/config.json`` (FLUX's when there is none)."""
  cfg_file = folder / "config.json" if folder is not None else None
  if cfg_file is None or not cfg_file.exists():
    return VAEConfig()
  raw = json.loads(cfg_file.read_text())
  cfg = VAEConfig(in_channels=raw.get("in_channels", 3),
                  latent_channels=raw.get("latent_channels", 16),
                  block_out_channels=tuple(raw.get("block_out_channels", (128, 256, 512, 512))),
                  layers_per_block=raw.get("layers_per_block", 2),
                  norm_num_groups=raw.get("norm_num_groups", 32),
                  scaling_factor=raw.get("scaling_factor", 0.3611),
                  shift_factor=raw.get("shift_factor") or 0.0)
  if raw.get("use_quant_conv") or raw.get("use_post_quant_conv"):
    raise ValueError(f"{cfg_file}: quant convs are not part of FLUX's VAE (use_quant_conv)")
  return cfg


def _vae_plan(path: pathlib.Path, cfg: VAEConfig | None = None) -> _Plan:
  source = SafetensorsSource(path)
  cfg = cfg or vae_config(path if path.is_dir() else None)
  naming = vae_naming(source.keys())
  n = len(cfg.block_out_channels)
  name_of = (lambda s: s) if naming == "diffusers" else (lambda s: bfl_vae_name(s, n))
  return _Plan(source, AutoencoderKL, cfg, name_of, frozenset(), f"{path} ({naming} VAE)")


def load_vae(path, *, cfg: VAEConfig | None = None, device=None) -> AutoencoderKL:
  """FLUX's AutoencoderKL from a diffusers ``vae/`` folder (safetensors + config.json), a
  pipeline folder holding one, BFL's ``ae.safetensors`` (FLUX's config unless ``cfg``), or a
  converted (``save_model``) folder. Tensors go to ``device`` (default: the first jax device)
  one at a time."""
  path = _component_path(path, "vae")
  if is_saved_model(path):
    return restore_model(path, AutoencoderKL, VAEConfig, device)
  return _load(_vae_plan(path, cfg), device)


# ---------------------------------------------------------------------------- text encoders

def _hf_config(folder: pathlib.Path | None, fields) -> dict:
  """The fields of a transformers config.json that our config dataclass has (defaults for
  the ones it lacks); {} without a file."""
  cfg_file = folder / "config.json" if folder is not None else None
  if cfg_file is None or not cfg_file.exists():
    return {}
  raw = json.loads(cfg_file.read_text())
  if raw.get("feed_forward_proj", "gated-gelu") != "gated-gelu":   # T5 v1.0 / other FFs
    raise ValueError(f"{cfg_file}: T5 v1.1 (feed_forward_proj 'gated-gelu') is supported, "
                     f"got {raw['feed_forward_proj']!r}")
  return {f.name: raw[f.name] for f in fields if f.name in raw}


def _hf_plan(path: pathlib.Path, model_cls, cfg_cls, cfg, what: str, ignore=(),
             aliases=None, optional_prefix: str = "") -> _Plan:
  source = SafetensorsSource(path)
  if cfg is None:
    cfg = cfg_cls(**_hf_config(path if path.is_dir() else None, dataclasses.fields(cfg_cls)))
  keys = set(source.keys())
  strip = optional_prefix and not any(k.startswith(optional_prefix) for k in keys)

  def name_of(n):
    n = n.removeprefix(optional_prefix) if strip else n
    # a name the checkpoint lacks may be stored under an alias (a tied copy)
    return n if n in keys else (aliases or {}).get(n, n)

  return _Plan(source, model_cls, cfg, name_of,
               frozenset(ignore) - {name_of(n) for n in (aliases or {})}, f"{path} ({what})")


def _clip_plan(path, cfg=None) -> _Plan:
  # transformers 4 (FLUX's files) stores text_model.*; transformers 5 drops the prefix
  return _hf_plan(path, CLIPTextModel, CLIPTextConfig, cfg, "CLIP text model",
                  ignore=("text_model.embeddings.position_ids", "embeddings.position_ids"),
                  optional_prefix="text_model.")


def _t5_plan(path, cfg=None) -> _Plan:
  return _hf_plan(path, T5EncoderModel, T5Config, cfg, "T5 encoder",
                  ignore=("encoder.embed_tokens.weight",),
                  aliases={"shared.weight": "encoder.embed_tokens.weight"})


def load_clip(path, *, cfg: CLIPTextConfig | None = None, device=None) -> CLIPTextModel:
  """CLIP's text model from a transformers ``CLIPTextModel`` folder (safetensors +
  config.json), a FLUX pipeline folder's ``text_encoder/`` (ViT-L/14's config when there is
  no config.json, unless ``cfg``), or a converted (``save_model``) folder."""
  path = _component_path(path, "text_encoder")
  if is_saved_model(path):
    return restore_model(path, CLIPTextModel, CLIPTextConfig, device)
  return _load(_clip_plan(path, cfg), device)


def load_t5(path, *, cfg: T5Config | None = None, device=None) -> T5EncoderModel:
  """T5's encoder from a transformers ``T5EncoderModel`` folder (safetensors, possibly
  sharded, + config.json), a FLUX pipeline folder's ``text_encoder_2/`` (T5-XXL's config
  when there is no config.json, unless ``cfg``), or a converted / quantized (``save_model``)
  folder."""
  path = _component_path(path, "text_encoder_2")
  if is_saved_model(path):
    return restore_model(path, T5EncoderModel, T5Config, device)
  return _load(_t5_plan(path, cfg), device)


def load_bert(path, *, cfg: BertConfig | None = None, device=None) -> BertModel:
  """BERT's encoder from a transformers ``BertModel`` folder (safetensors + config.json, e.g.
  sentence-transformers' all-MiniLM-L6-v2), without the pooler."""
  path = pathlib.Path(path)
  return _load(_hf_plan(path, BertModel, BertConfig, cfg, "BERT encoder",
                        ignore=("embeddings.position_ids", "pooler.dense.weight",
                                "pooler.dense.bias")), device)


# ------------------------------------------------------------------ whole pipeline folders

PLANS = {"text_encoder": _clip_plan, "text_encoder_2": _t5_plan, "vae": _vae_plan}


def convert_pipeline(src, dst, *, overwrite: bool = False, progress: bool = True) -> None:
  """A diffusers FLUX.1 pipeline folder into one converted folder of the same layout: each
  model component an orbax checkpoint (``save_model``, one block in host memory at a time),
  the tokenizers and ``model_index.json`` copied. ``FluxPipeline.load`` and the loaders read
  it. All or nothing (``atomic_directory``)."""
  from svdq_jax.convert.convert import convert
  from svdq_jax.models.pipeline import check_pipeline_folder
  src = check_pipeline_folder(src)
  cpu = jax.devices("cpu")[0]
  with atomic_directory(dst, overwrite) as tmp:
    convert(src / "transformer", tmp / "transformer", progress=progress)
    for name, make_plan in PLANS.items():
      plan = make_plan(src / name)
      abstract = nnx.eval_shape(lambda: plan.model_cls(plan.cfg, nnx.Rngs(0)))
      groups = param_groups_from_torch(nnx.to_pure_dict(nnx.state(abstract)), plan.source,
                                       plan.name_of, lambda x: jax.device_put(x, cpu),
                                       plan.what, plan.ignore)
      save_model(tmp / name, abstract, groups=groups)
    for name in ("tokenizer", "tokenizer_2"):
      shutil.copytree(src / name, tmp / name)
    shutil.copy(src / "model_index.json", tmp / "model_index.json")
