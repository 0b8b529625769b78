"""FLUX.1 in Flax: parity with diffusers.FluxTransformer2DModel on golden files, and the
checkpoint name mapping (written by scripts/make_flux_golden.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import svdq_jax
from svdq_jax.convert import detect_naming, flux_params_from_torch

from flux_helpers import bfl_checkpoint, load_model, run


@pytest.mark.parametrize("name", ["flux_dev_tiny", "flux_schnell_tiny"])
def test_parity_with_diffusers(name):
  model, io, _, _ = load_model(name)
  out = np.asarray(run(model, io))
  ref = io["out"]
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  assert rel < 1e-4, rel


def test_bfl_naming_gives_the_same_tree():
  model, _, _, cfg = load_model("flux_dev_tiny")
  state = nnx.to_pure_dict(nnx.state(model))
  bfl = bfl_checkpoint(state)
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


def test_quant_config_follows_the_method_layout():
  from svdq_jax.models.flux import quant_config
  cfg = quant_config("svdquant", "nvfp4", rank=16)
  assert cfg.rule_for("img_in").method == "skip"
  assert cfg.rule_for("final_layer/linear").method == "skip"
  mod = cfg.rule_for("double_blocks/3/img_mod/lin")
  assert (mod.method, mod.fmt) == ("w4a16", "nvfp4")
  assert cfg.rule_for("single_blocks/0/modulation/lin").method == "w4a16"
  qkv = cfg.rule_for("double_blocks/3/img_attn/qkv")
  assert (qkv.method, qkv.fmt, qkv.rank) == ("svdquant", "nvfp4", 16)
  assert quant_config("w4a16_rtn").rule_for("double_blocks/0/txt_mod/lin").method == "w4a16_rtn"


def test_default_formats_are_w4a8_on_hopper(monkeypatch):
  """No format given: W4A8 (int4_2l / int8) where the default device is a Hopper GPU, the
  paper's INT4 elsewhere; weight-only methods keep INT4 weights; an explicit format wins."""
  from svdq_jax.models import flux
  from svdq_jax.pallas_kernels import w4a4_hopper

  def qkv(cfg):
    rule = cfg.rule_for("double_blocks/0/img_attn/qkv")
    return rule.fmt, rule.act_fmt

  assert qkv(flux.quant_config("svdquant")) == ("int4", None)   # CPU
  monkeypatch.setattr(w4a4_hopper, "on_hopper", lambda: True)
  assert flux.default_formats("svdquant") == ("int4_2l", "int8")
  assert flux.default_formats("w4a16_rtn") == ("int4", None)
  cfg = flux.quant_config("svdquant")
  assert qkv(cfg) == ("int4_2l", "int8")
  assert cfg.rule_for("double_blocks/0/img_mod/lin").fmt == "int4_2l"   # W4A16 modulation
  assert qkv(flux.quant_config("svdquant", act_fmt="int4_2l")) == ("int4_2l", "int4_2l")
  assert qkv(flux.quant_config("svdquant", "nvfp4")) == ("nvfp4", None)


def test_attention_implementation_switch():
  from svdq_jax.models import flux
  q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 8, 2, 16))
  pe = flux.rope(jnp.zeros((8, 3)), (4, 6, 6), 10_000)
  default = flux.attention(q, k, v, pe)
  try:
    flux.set_attention_implementation("xla")
    np.testing.assert_array_equal(flux.attention(q, k, v, pe), default)
    with pytest.raises(ValueError, match="flash"):
      flux.set_attention_implementation("flash")
  finally:
    flux.set_attention_implementation(None)
  with flux.attention_as("int8"):   # the context manager form, restored on the way out
    assert flux.attention_implementation() == "int8"
  assert flux.attention_implementation() is None
