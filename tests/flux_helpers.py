"""Helpers shared by the FLUX tests: golden files from scripts/make_flux_golden.py, small W4A8
models."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

import svdq_jax
from svdq_jax.config import QuantConfig, Rule
from svdq_jax.convert import flux_params_from_torch
from svdq_jax.models.flux import EMBEDDERS, MODULATION, Flux, FluxConfig

GOLDEN = pathlib.Path(__file__).parent / "golden"


def config_from_diffusers(c: dict) -> FluxConfig:
  return FluxConfig(in_channels=c["in_channels"], out_channels=c["in_channels"],
                    vec_in_dim=c["pooled_projection_dim"],
                    context_in_dim=c["joint_attention_dim"],
                    hidden_size=c["num_attention_heads"] * c["attention_head_dim"],
                    num_heads=c["num_attention_heads"], depth=c["num_layers"],
                    depth_single_blocks=c["num_single_layers"],
                    axes_dim=tuple(c["axes_dims_rope"]), guidance_embed=c["guidance_embeds"])


def w4a8_model(model, batches, rank: int):
  """FLUX ``model`` with its attention and MLP linears W4A8 (int4_2l weights, int8
  activations, rank ``rank``; embedders and modulation left as they are), calibrated on
  ``batches`` (tuples of the model's call arguments), one alpha, one low-rank iteration."""
  calib = svdq_jax.calibrate(lambda a: model(*a), batches, model=model, progress=False)
  graph, state = nnx.split(model)
  config = QuantConfig(rules=(Rule(EMBEDDERS, "skip"), Rule(MODULATION, "skip"),
                              Rule(".*", "svdquant", "int4_2l", rank=rank, act_fmt="int8")),
                       alpha_grid=1, lowrank_iters=1)
  return nnx.merge(graph, svdq_jax.quantize(state, calib, config, progress=False))


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
