"""Helpers shared by the FLUX tests: golden files from scripts/make_flux_golden.py."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from svdq_jax.convert import flux_params_from_torch
from svdq_jax.models.flux import Flux, FluxConfig

GOLDEN = pathlib.Path(__file__).parent / "golden"


def config_from_diffusers(c: dict) -> FluxConfig:
  return FluxConfig(in_channels=c["in_channels"], out_channels=c["in_channels"],
                    vec_in_dim=c["pooled_projection_dim"],
                    context_in_dim=c["joint_attention_dim"],
                    hidden_size=c["num_attention_heads"] * c["attention_head_dim"],
                    num_heads=c["num_attention_heads"], depth=c["num_layers"],
                    depth_single_blocks=c["num_single_layers"],
                    axes_dim=tuple(c["axes_dims_rope"]), guidance_embed=c["guidance_embeds"])


def load_model(name):
  io = np.load(GOLDEN / f"{name}_io.npz")
  cfg = config_from_diffusers(json.loads(str(io["config"])))
  tensors = load_file(GOLDEN / f"{name}.safetensors")
  tree = flux_params_from_torch(tensors.__getitem__, tensors.keys(), cfg)
  graph, state = nnx.split(Flux(cfg, nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, tree)
  return nnx.merge(graph, state), io, tensors, cfg


def run(model, io):
  args = [jnp.asarray(io[k]) for k in ("img", "img_ids", "txt", "txt_ids", "timesteps", "y")]
  guidance = jnp.asarray(io["guidance"]) if "guidance" in io else None
  return nnx.jit(lambda m, *a: m(*a, guidance=guidance))(model, *args)


def _bfl_name(path: str) -> str:
  """Our module path -> the BFL checkpoint name, written out independently of convert/."""
  name = path.replace("/", ".").replace("mlp.fc1", "mlp.0").replace("mlp.fc2", "mlp.2")
  return name.replace("final_layer.adaLN_modulation", "final_layer.adaLN_modulation.1")


def bfl_checkpoint(state: dict) -> dict:
  """A BFL-named torch-layout state dict of a pure Flux parameter dict."""
  bfl = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    path = jax.tree_util.keystr(key_path, simple=True, separator="/")
    module, leaf_name = path.rsplit("/", 1)
    if leaf_name == "kernel":
      bfl[_bfl_name(module) + ".weight"] = np.ascontiguousarray(np.asarray(leaf).T)
    elif leaf_name == "bias":
      bfl[_bfl_name(module) + ".bias"] = np.asarray(leaf)
    else:
      bfl[_bfl_name(path)] = np.asarray(leaf)
  return bfl
