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
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from svdq_jax.convert.checkpoint import SafetensorsSource
from svdq_jax.models.clip import CLIPTextConfig, CLIPTextModel
from svdq_jax.models.t5 import T5Config, T5EncoderModel
from svdq_jax.models.vae import AutoencoderKL, VAEConfig


def torch_name(path: tuple) -> str:
  """Parameter path of the NNX tree -> the reference's (diffusers / transformers) name."""
  *parents, leaf = (str(p) for p in path)
  return ".".join(parents + [{"kernel": "weight", "scale": "weight",
                               "embedding": "weight"}.get(leaf, leaf)])


def flax_shape(shape: tuple[int, ...], want: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  """The shape ``to_flax`` gives a torch tensor of ``shape`` for a parameter ``leaf``
  (``kernel``, ``embedding``, ...) of shape ``want``."""
  if leaf != "kernel":   # embeddings [vocab, d], norms and biases: as stored
    return shape
  if len(want) == 4 and len(shape) == 4:
    return (shape[2], shape[3], shape[1], shape[0])
  if len(want) == 2 and len(shape) == 4 and shape[2:] == (1, 1):
    shape = shape[:2]
  return shape[::-1] if len(want) == 2 and len(shape) == 2 else shape


def to_flax(value: np.ndarray, want: tuple[int, ...], leaf: str) -> np.ndarray:
  """A torch tensor in the layout of a parameter ``leaf`` of shape ``want`` (see the module
  doc); 1x1 convolutions stored for linears (BFL's VAE attention) are squeezed."""
  if leaf != "kernel":
    return value
  if len(want) == 4 and value.ndim == 4:
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if len(want) == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
    value = value[:, :, 0, 0]
  if len(want) == 2 and value.ndim == 2:
    return np.ascontiguousarray(value.T)
  return value


def params_from_torch(like: dict, source, name_of: Callable[[str], str] = lambda n: n,
                      put: Callable[[np.ndarray], object] = lambda x: x,
                      what: str = "checkpoint", ignore: frozenset = frozenset()) -> dict:
  """The pure parameter dict shaped like ``like`` (``nnx.to_pure_dict`` of an abstract
  model), read tensor by tensor from ``source`` (``SafetensorsSource``-like: ``keys``,
  ``shape``, ``get``); ``name_of`` maps the reference name (``torch_name``) to the
  checkpoint's naming; ``ignore``: names a checkpoint may hold that the model does not use
  (tied copies). Raises ValueError listing missing, unexpected and misshapen tensors before
  reading any tensor."""
  leaves = jax.tree_util.tree_flatten_with_path(like)[0]
  names = {}
  for path, leaf in leaves:
    parts = tuple(getattr(k, "key", k) for k in path)
    names[name_of(torch_name(parts))] = (path, leaf, str(parts[-1]))
  keys = set(source.keys())
  missing, unexpected = sorted(set(names) - keys), sorted(keys - set(names) - ignore)
  bad = []
  for name in sorted(set(names) & keys):
    _, leaf, kind = names[name]
    want, got = tuple(leaf.shape), tuple(source.shape(name))
    if flax_shape(got, want, kind) != want:
      bad.append(f"{name}: checkpoint {got}, model {want}")
  if missing or unexpected or bad:
    raise ValueError(f"{what} does not match the model: missing {len(missing)} tensors "
                     f"{missing[:20]}, unexpected {len(unexpected)} tensors {unexpected[:20]}, "
                     f"misshapen {len(bad)} (model shapes in flax layout): {bad[:20]}")
  flat = {}
  for name, (path, leaf, kind) in names.items():
    flat[path] = put(to_flax(source.get(name), tuple(leaf.shape), kind))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like),
                                      [flat[p] for p, _ in leaves])


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


def load_vae(path, *, cfg: VAEConfig | None = None, device=None) -> AutoencoderKL:
  """FLUX's AutoencoderKL from a diffusers ``vae/`` folder (safetensors + config.json), a
  pipeline folder holding one, or BFL's ``ae.safetensors`` (FLUX's config unless ``cfg``).
  Tensors go to ``device`` (default: the first jax device) one at a time."""
  path = pathlib.Path(path)
  if path.is_dir() and (path / "vae").is_dir():
    path = path / "vae"
  device = device or jax.devices()[0]
  source = SafetensorsSource(path)
  cfg = cfg or vae_config(path if path.is_dir() else None)
  naming = vae_naming(source.keys())
  n = len(cfg.block_out_channels)
  name_of = (lambda s: s) if naming == "diffusers" else (lambda s: bfl_vae_name(s, n))
  graph, state = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(cfg, nnx.Rngs(0))))
  tree = params_from_torch(nnx.to_pure_dict(state), source, name_of,
                           put=lambda x: jax.device_put(x, device),
                           what=f"{path} ({naming} VAE)")
  nnx.replace_by_pure_dict(state, tree)
  return nnx.merge(graph, state)


# ---------------------------------------------------------------------------- text encoders

def _hf_config(folder: pathlib.Path | None, fields, what: str) -> dict:
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


def _load_hf(path, model_cls, cfg_cls, cfg, subfolder: str, what: str, device, ignore=(),
             aliases=None, optional_prefix: str = ""):
  path = pathlib.Path(path)
  if path.is_dir() and (path / subfolder).is_dir():
    path = path / subfolder
  device = device or jax.devices()[0]
  source = SafetensorsSource(path)
  if cfg is None:
    cfg = cfg_cls(**_hf_config(path if path.is_dir() else None,
                               dataclasses.fields(cfg_cls), what))
  graph, state = nnx.split(nnx.eval_shape(lambda: model_cls(cfg, nnx.Rngs(0))))
  keys = set(source.keys())
  strip = optional_prefix and not any(k.startswith(optional_prefix) for k in keys)

  def name_of(n):
    n = n.removeprefix(optional_prefix) if strip else n
    # a name the checkpoint lacks may be stored under an alias (a tied copy)
    return n if n in keys else (aliases or {}).get(n, n)

  tree = params_from_torch(nnx.to_pure_dict(state), source, name_of,
                           put=lambda x: jax.device_put(x, device),
                           what=f"{path} ({what})", ignore=frozenset(ignore) - {
                               name_of(n) for n in (aliases or {})})
  nnx.replace_by_pure_dict(state, tree)
  return nnx.merge(graph, state)


def load_clip(path, *, cfg: CLIPTextConfig | None = None, device=None) -> CLIPTextModel:
  """CLIP's text model from a transformers ``CLIPTextModel`` folder (safetensors +
  config.json), or a FLUX pipeline folder's ``text_encoder/`` (ViT-L/14's config when there is
  no config.json, unless ``cfg``)."""
  # transformers 4 (FLUX's files) stores text_model.*; transformers 5 drops the prefix
  return _load_hf(path, CLIPTextModel, CLIPTextConfig, cfg, "text_encoder", "CLIP text model",
                  device, ignore=("text_model.embeddings.position_ids",
                                  "embeddings.position_ids"), optional_prefix="text_model.")


def load_t5(path, *, cfg: T5Config | None = None, device=None) -> T5EncoderModel:
  """T5's encoder from a transformers ``T5EncoderModel`` folder (safetensors, possibly
  sharded, + config.json), or a FLUX pipeline folder's ``text_encoder_2/`` (T5-XXL's config
  when there is no config.json, unless ``cfg``)."""
  return _load_hf(path, T5EncoderModel, T5Config, cfg, "text_encoder_2", "T5 encoder", device,
                  ignore=("encoder.embed_tokens.weight",),
                  aliases={"shared.weight": "encoder.embed_tokens.weight"})
