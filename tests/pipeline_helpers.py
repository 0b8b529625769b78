"""A tiny random FLUX.1 pipeline folder in diffusers' layout, written as the reference
libraries would (torch names and layouts spelled out here, independently of convert/)."""

import json
import pathlib
import shutil

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from flux_helpers import bfl_checkpoint
from svdq_jax.models.clip import CLIPTextConfig, CLIPTextModel
from svdq_jax.models.flux import Flux, FluxConfig
from svdq_jax.models.t5 import T5Config, T5EncoderModel

GOLDEN = pathlib.Path(__file__).parent / "golden"


def torch_state(module: nnx.Module, rename=lambda n: n) -> dict:
  """An NNX module's parameters as a torch state dict: kernels [in, out] -> weight
  [out, in], conv kernels HWIO -> OIHW, norm scales -> weight, embeddings as they are."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(module)))[0]:
    *parents, name = (str(getattr(p, "key", p)) for p in path)
    v = np.asarray(leaf, np.float32)
    if name == "kernel":
      v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
    torch_leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(name, name)
    out[rename(".".join(parents + [torch_leaf]))] = np.ascontiguousarray(v)
  return out


def _randomized(module: nnx.Module, seed: int) -> nnx.Module:
  """Every parameter random: kernels ~ N(0, 0.3^2 / fan_in), norm scales 1 + N(0, 0.1^2),
  biases and embeddings N(0, 0.1^2)."""
  graph, state = nnx.split(module)
  flat, tree = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
  keys = jax.random.split(jax.random.key(seed), len(flat))
  leaves = []
  for k, (path, leaf) in zip(keys, flat):
    noise = jax.random.normal(k, leaf.shape)
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "kernel":
      leaves.append(noise * 0.3 / np.prod(leaf.shape[:-1]) ** 0.5)
    else:
      leaves.append(1.0 + 0.1 * noise if name == "scale" else 0.1 * noise)
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(tree, leaves))
  return nnx.merge(graph, state)


def write_pipeline(root: pathlib.Path, guidance: bool = True) -> pathlib.Path:
  """tokenizer/ + tokenizer_2/ from the golden tokenizers, random CLIP (vocab 4514, width 32)
  and T5 (vocab 320, width 64) encoders, the golden tiny VAE (4 latent channels, 4 pixels
  per latent), a random 1+1-block transformer (BFL names)."""
  root.mkdir(parents=True)
  (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
  shutil.copytree(GOLDEN / "clip_tokenizer", root / "tokenizer")
  shutil.copytree(GOLDEN / "t5_tokenizer", root / "tokenizer_2")
  clip_cfg = CLIPTextConfig(vocab_size=4514, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=1, num_attention_heads=2)
  # T5 widths multiples of 64: its linears quantize (W4A16, groups of 64) in the tests
  t5_cfg = T5Config(vocab_size=320, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
  flux_cfg = FluxConfig(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
                        hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1,
                        axes_dim=(8, 12, 12), guidance_embed=guidance)
  parts = {"text_encoder": (CLIPTextModel(clip_cfg, nnx.Rngs(1)), clip_cfg),
           "text_encoder_2": (T5EncoderModel(t5_cfg, nnx.Rngs(2)), t5_cfg)}
  for folder, (model, cfg) in parts.items():
    (root / folder).mkdir()
    save_file(torch_state(_randomized(model, len(folder))), root / folder / "model.safetensors")
    raw = {"feed_forward_proj": "gated-gelu"} if folder == "text_encoder_2" else {}
    (root / folder / "config.json").write_text(json.dumps(raw | cfg.__dict__))
  (root / "vae").mkdir()
  shutil.copy(GOLDEN / "vae_tiny.safetensors", root / "vae" / "diffusion_pytorch_model.safetensors")
  (root / "vae" / "config.json").write_text(str(np.load(GOLDEN / "vae_tiny_io.npz")["config"]))
  (root / "transformer").mkdir()
  flux = _randomized(Flux(flux_cfg, nnx.Rngs(3)), 3)
  save_file(bfl_checkpoint(nnx.to_pure_dict(nnx.state(flux))),
            root / "transformer" / "diffusion_pytorch_model.safetensors")
  (root / "transformer" / "config.json").write_text(json.dumps({"axes_dims_rope": [8, 12, 12]}))
  return root
