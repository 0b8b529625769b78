"""FLUX.1 in Flax: parity with diffusers.FluxTransformer2DModel on golden files, and the
checkpoint name mapping (written by scripts/make_flux_golden.py)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import svdq_jax
from svdq_jax.convert import detect_naming, flux_params_from_torch
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


@pytest.mark.parametrize("name", ["flux_dev_tiny", "flux_schnell_tiny"])
def test_parity_with_diffusers(name):
  model, io, _, _ = load_model(name)
  out = np.asarray(run(model, io))
  ref = io["out"]
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  assert rel < 1e-4, rel


def _bfl_name(path: str) -> str:
  """Our module path -> the BFL checkpoint name, written out independently of convert/."""
  name = path.replace("/", ".").replace("mlp.fc1", "mlp.0").replace("mlp.fc2", "mlp.2")
  return name.replace("final_layer.adaLN_modulation", "final_layer.adaLN_modulation.1")


def test_bfl_naming_gives_the_same_tree():
  model, _, _, cfg = load_model("flux_dev_tiny")
  state = nnx.to_pure_dict(nnx.state(model))
  bfl = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    path = "/".join(str(getattr(k, "key", k)) for k in key_path)
    module, leaf_name = path.rsplit("/", 1)
    if leaf_name == "kernel":
      bfl[_bfl_name(module) + ".weight"] = np.asarray(leaf).T  # torch layout [out, in]
    elif leaf_name == "bias":
      bfl[_bfl_name(module) + ".bias"] = np.asarray(leaf)
    else:
      bfl[_bfl_name(path)] = np.asarray(leaf)
  assert "double_blocks.1.txt_attn.qkv.weight" in bfl and "single_blocks.0.linear1.bias" in bfl
  assert detect_naming(bfl) == "bfl"
  tree = flux_params_from_torch(bfl.__getitem__, bfl.keys(), cfg)
  flat_a = jax.tree_util.tree_flatten_with_path(tree)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(state)[0])
  assert len(flat_a) == len(flat_b)
  for path, leaf in flat_a:
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_b[path]))


def test_checkpoint_errors_list_keys():
  _, _, tensors, cfg = load_model("flux_schnell_tiny")
  bad = dict(tensors)
  del bad["proj_out.weight"]
  bad["extra.weight"] = np.zeros(1)
  with pytest.raises(ValueError, match=r"missing 1 tensors \['proj_out.weight'\], unexpected 1 tensors \['extra.weight'\]"):
    flux_params_from_torch(bad.__getitem__, bad.keys(), cfg)
  with pytest.raises(ValueError, match="unknown FLUX checkpoint naming"):
    detect_naming(["foo.weight"])
  with pytest.raises(ValueError, match="embeds guidance"):
    model, io, _, _ = load_model("flux_dev_tiny")
    args = [jnp.asarray(io[k]) for k in ("img", "img_ids", "txt", "txt_ids", "timesteps", "y")]
    model(*args)


def test_quantized_flux_runs_jitted():
  model, io, _, _ = load_model("flux_dev_tiny")
  graph, state = nnx.split(model)
  config = svdq_jax.QuantConfig(rules=(
      svdq_jax.Rule(r"img_in|txt_in|(time_in|vector_in|guidance_in|final_layer)/.*", "skip"),
      svdq_jax.Rule(r".*_mod/lin|.*/modulation/lin", "w4a16_rtn"),
      svdq_jax.Rule(r".*", "rtn"),
  ))
  qstate = svdq_jax.quantize(state, None, config, progress=False)
  qmodel = nnx.merge(graph, qstate)
  assert isinstance(qmodel.double_blocks[0].img_attn.qkv.kernel.get_value(),
                    svdq_jax.QuantizedLinear)
  out = np.asarray(run(qmodel, io))
  ref = io["out"]
  assert out.shape == ref.shape and np.isfinite(out).all()
  rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert 0 < rel < 0.5, rel
