"""Checkpoint conversion: safetensors (single, sharded, bf16) -> orbax -> model; bad input."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import svdq_jax
from svdq_jax import cli
from svdq_jax.convert import convert, load_flux, restore_tree, save_tree

from svdq_jax.models.flux import Flux, FluxConfig

from flux_helpers import GOLDEN, bfl_checkpoint, load_model

DEV = GOLDEN / "flux_dev_tiny.safetensors"
AXES = (8, 12, 12)


def _run(model, name):
  io = np.load(GOLDEN / f"{name}_io.npz")
  args = [jnp.asarray(io[k]) for k in ("img", "img_ids", "txt", "txt_ids", "timesteps", "y")]
  g = jnp.asarray(io["guidance"]) if "guidance" in io else None
  return np.asarray(model(*args, guidance=g)), io["out"]


def test_convert_then_load_matches_diffusers(tmp_path):
  cfg = convert(DEV, tmp_path / "ckpt", axes_dim=AXES, progress=False)
  assert cfg.depth == 2 and cfg.depth_single_blocks == 2 and cfg.guidance_embed
  assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["hidden_size"] == 64
  out, ref = _run(load_flux(tmp_path / "ckpt"), "flux_dev_tiny")
  assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4


def test_bfl_checkpoint_converts_to_the_same_model(tmp_path):
  model, _, _, _ = load_model("flux_dev_tiny")
  save_file(bfl_checkpoint(nnx.to_pure_dict(nnx.state(model))), tmp_path / "bfl.safetensors")
  cfg = convert(tmp_path / "bfl.safetensors", tmp_path / "ckpt", axes_dim=AXES, progress=False)
  assert cfg.depth == 2 and cfg.guidance_embed
  out, ref = _run(load_flux(tmp_path / "ckpt"), "flux_dev_tiny")
  assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4


def test_bf16_stays_bf16_and_sharded_equals_single(tmp_path):
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(DEV).items()}
  names = sorted(tensors)
  shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
  src = tmp_path / "src"
  src.mkdir()
  for shard, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, src / shard)
  (src / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: s for s, keys in shards.items() for k in keys}}))
  save_file(tensors, tmp_path / "single.safetensors")
  convert(src, tmp_path / "sharded", axes_dim=AXES, progress=False)  # folder with an index
  convert(tmp_path / "single.safetensors", tmp_path / "one", axes_dim=AXES, progress=False)
  a = nnx.to_pure_dict(nnx.state(load_flux(tmp_path / "sharded")))
  b = nnx.to_pure_dict(nnx.state(load_flux(tmp_path / "one")))
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert x.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_bad_inputs_leave_nothing_behind(tmp_path):
  not_st = tmp_path / "x.safetensors"
  not_st.write_text("this is not a safetensors file, just text")
  with pytest.raises(ValueError, match="not a readable safetensors file"):
    convert(not_st, tmp_path / "o1", progress=False)
  truncated = tmp_path / "t.safetensors"
  truncated.write_bytes(DEV.read_bytes()[:-100])
  with pytest.raises(ValueError, match="safetensors"):
    convert(truncated, tmp_path / "o2", axes_dim=AXES, progress=False)
  tensors = load_file(DEV)
  tensors["proj_out.weight"] = tensors["proj_out.weight"][:, :32]
  save_file(tensors, tmp_path / "shape.safetensors")
  with pytest.raises(ValueError, match=r"final_layer/linear/kernel: checkpoint \(32, 16\), model \(64, 16\)"):
    convert(tmp_path / "shape.safetensors", tmp_path / "o3", axes_dim=AXES, progress=False)
  with pytest.raises(ValueError, match="pass axes_dim"):
    convert(DEV, tmp_path / "o4", progress=False)
  with pytest.raises(FileNotFoundError):
    convert(tmp_path / "missing.safetensors", tmp_path / "o5", progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "shape.safetensors", "t.safetensors", "x.safetensors"]


def test_existing_destination_refused_unless_overwrite(tmp_path):
  dst = tmp_path / "ckpt"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="destination exists"):
    convert(DEV, dst, axes_dim=AXES, progress=False)
  assert (dst / "keep.txt").read_text() == "mine"
  convert(DEV, dst, axes_dim=AXES, overwrite=True, progress=False)
  assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()


def test_cli_convert(tmp_path, capsys):
  assert cli.main(["convert", str(DEV), str(tmp_path / "c"), "--axes-dim", "8,12,12",
                   "--quiet"]) == 0
  assert "depth 2+2" in capsys.readouterr().out
  assert cli.main(["convert", str(DEV), str(tmp_path / "c"), "--axes-dim", "8,12,12",
                   "--quiet"]) == 2
  assert "destination exists" in capsys.readouterr().err


def test_quantized_tree_orbax_round_trip(tmp_path):
  model = load_flux_from_golden(tmp_path)
  qstate = svdq_jax.quantize(nnx.state(model), None, svdq_jax.QuantConfig(rules=(
      svdq_jax.Rule(r".*(attn/qkv|linear1)", "rtn"),)), progress=False)
  tree = nnx.to_pure_dict(qstate)
  save_tree(tmp_path / "q", tree)
  back = restore_tree(tmp_path / "q", like=tree)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
  for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(back)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  with pytest.raises(FileExistsError):
    save_tree(tmp_path / "q", tree)


def load_flux_from_golden(tmp_path):
  convert(DEV, tmp_path / "base", axes_dim=AXES, progress=False)
  return load_flux(tmp_path / "base")


def test_cli_sample_is_deterministic(tmp_path, capsys):
  cfg = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=24, context_in_dim=32,
                   hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=AXES)
  state = nnx.to_pure_dict(nnx.state(Flux(cfg, nnx.Rngs(0))))
  save_file(bfl_checkpoint(state), tmp_path / "model.safetensors")
  convert(tmp_path / "model.safetensors", tmp_path / "ckpt", axes_dim=AXES, progress=False)
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "text.npz", t5=rng.standard_normal((1, 5, 32)).astype(np.float32),
           clip_pooled=rng.standard_normal((1, 24)).astype(np.float32))
  outs = []
  for name, extra in (("a.npy", []), ("b.npy", ["--hoist-weights"])):  # float: nothing to hoist
    assert cli.main(["sample", str(tmp_path / "ckpt"), str(tmp_path / "text.npz"), "--out",
                     str(tmp_path / name), "--height", "64", "--width", "48", "--steps", "2",
                     "--seed", "7", *extra]) == 0
    outs.append(np.load(tmp_path / name))
  assert outs[0].shape == (1, 16, 8, 6) and np.isfinite(outs[0]).all()
  np.testing.assert_array_equal(outs[0], outs[1])
  # --attention for this command only: INT8 q k^T moves the latents a little
  assert cli.main(["sample", str(tmp_path / "ckpt"), str(tmp_path / "text.npz"), "--out",
                   str(tmp_path / "c.npy"), "--height", "64", "--width", "48", "--steps", "2",
                   "--seed", "7", "--attention", "int8qk"]) == 0
  from svdq_jax.models import flux
  assert flux.attention_implementation() is None
  int8 = np.load(tmp_path / "c.npy")
  assert 0 < np.abs(int8 - outs[0]).max() < 0.05 * np.abs(outs[0]).max()
  assert cli.main(["sample", str(tmp_path / "missing"), str(tmp_path / "text.npz")]) == 2
  with pytest.raises(ValueError, match="noise has 16 latent channels; the model takes 16"):
    from svdq_jax.models import sampling
    sampling.sample(load_flux_from_golden(tmp_path / "g"), jnp.zeros((1, 16, 4, 4)),
                    jnp.zeros((1, 5, 32)), jnp.zeros((5, 3)), jnp.zeros((1, 24)),
                    sampling.schedule(1, 4), guidance=3.5)
