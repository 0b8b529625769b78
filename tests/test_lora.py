"""LoRAs on quantized and float FLUX trees (svdq_jax.lora), in the three file namings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import svdq_jax
from svdq_jax import qlinear
from svdq_jax.lora import apply_loras, load_lora
from svdq_jax.models.flux import Flux, FluxConfig, quant_config
from svdq_jax.qlinear import QuantizedLinear

CFG = FluxConfig(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                 hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1,
                 axes_dim=(8, 12, 12), guidance_embed=True)
H, MLP = CFG.hidden_size, CFG.mlp_dim
RNG = np.random.default_rng(0)


def _ab(r, k, n):
  return (RNG.standard_normal((r, k)).astype(np.float32) * 0.1,
          RNG.standard_normal((n, r)).astype(np.float32) * 0.1)


def _inputs(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(k[0], (1, 16, 16)), jnp.zeros((16, 3)),
          jax.random.normal(k[1], (1, 8, 32)), jnp.zeros((8, 3)), jnp.full((1,), 0.5),
          jax.random.normal(k[2], (1, 32)), jnp.full((1,), 3.5))


@pytest.fixture(scope="module")
def trees():
  model = Flux(CFG, nnx.Rngs(0))
  calib = svdq_jax.calibrate(lambda a: model(*a[:6], guidance=a[6]), [_inputs(1)],
                             model=model, progress=False)
  graph, state = nnx.split(model)
  config = quant_config("svdquant", "int4", rank=16, alpha_grid=1, lowrank_iters=1)
  return graph, state, svdq_jax.quantize(state, calib, config, progress=False)


def _write_lora(tmp_path, naming):
  """A LoRA file in ``naming`` and the deltas it means per layer, fused by hand."""
  t, want = {}, {}
  if naming == "diffusers":
    aq, bq = _ab(4, H, H)
    av, bv = _ab(4, H, H)
    t |= {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": aq,
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": bq,
          "transformer.transformer_blocks.0.attn.to_v.lora_A.weight": av,
          "transformer.transformer_blocks.0.attn.to_v.lora_B.weight": bv}
    d = np.zeros((H, 3 * H), np.float32)
    d[:, :H], d[:, 2 * H:] = aq.T @ bq.T, av.T @ bv.T
    want["double_blocks/0/img_attn/qkv"] = d
    am, bm = _ab(2, H, MLP)
    t |= {"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": am,
          "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": bm}
    d = np.zeros((H, 3 * H + MLP), np.float32)
    d[:, 3 * H:] = am.T @ bm.T
    want["single_blocks/0/linear1"] = d
    a, b = _ab(3, H, 2 * H)   # diffusers' (scale, shift) order: halves swap in ours
    t |= {"transformer.norm_out.linear.lora_A.weight": a,
          "transformer.norm_out.linear.lora_B.weight": b}
    d = a.T @ b.T
    want["final_layer/adaLN_modulation"] = np.concatenate([d[:, H:], d[:, :H]], axis=1)
  elif naming == "kohya":
    a, b = _ab(8, H, 3 * H)
    t |= {"lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight": a,
          "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight": b,
          "lora_unet_double_blocks_0_txt_attn_qkv.alpha": np.float32(4.0)}
    want["double_blocks/0/txt_attn/qkv"] = 0.5 * a.T @ b.T   # alpha / rank
    a, b = _ab(4, MLP, H)
    t |= {"lora_unet_double_blocks_0_img_mlp_2.lora_down.weight": a,
          "lora_unet_double_blocks_0_img_mlp_2.lora_up.weight": b}
    want["double_blocks/0/img_mlp/fc2"] = a.T @ b.T
  else:
    a, b = _ab(4, H + MLP, H)
    t |= {"diffusion_model.single_blocks.0.linear2.lora_A.weight": a,
          "diffusion_model.single_blocks.0.linear2.lora_B.weight": b}
    want["single_blocks/0/linear2"] = a.T @ b.T
    a, b = _ab(2, H, 6 * H)
    t |= {"diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight": a,
          "diffusion_model.double_blocks.0.img_mod.lin.lora_B.weight": b}
    want["double_blocks/0/img_mod/lin"] = a.T @ b.T
  path = tmp_path / f"{naming}.safetensors"
  save_file({k: np.asarray(v, np.float32).reshape(np.shape(v)) for k, v in t.items()}, path)
  return path, want


def _layer(tree, path):
  node = tree
  for p in path.split("/"):
    node = node[int(p) if p.isdigit() else p]
  return node["kernel"]


@pytest.mark.parametrize("naming", ["diffusers", "kohya", "bfl"])
def test_lora_adds_exactly_its_delta(trees, tmp_path, naming):
  _, state, qstate = trees
  file, want = _write_lora(tmp_path, naming)
  lora = load_lora(file, CFG)
  assert set(lora.factors) == set(want)
  s = 0.7
  for base, tol in ((nnx.to_pure_dict(qstate), 2e-2), (nnx.to_pure_dict(state), 1e-5)):
    out = apply_loras(base, [lora], [s])
    for path, delta in want.items():
      old, new = _layer(base, path), _layer(out, path)
      x = jax.random.normal(jax.random.key(3), (5, delta.shape[0]))
      if isinstance(old, QuantizedLinear):
        got = (qlinear.reference_apply(new, x, jnp.zeros(delta.shape[1])) -
               qlinear.reference_apply(old, x, jnp.zeros(delta.shape[1])))
        assert new.rank == old.rank + lora.factors[path][0].shape[1]
      else:
        got = x @ (new - old)
      ref = s * (np.asarray(x) @ delta)
      assert np.abs(np.asarray(got) - ref).max() <= tol * np.abs(ref).max(), path
    untouched = "double_blocks/0/txt_mlp/fc1"
    assert _layer(out, untouched) is _layer(base, untouched)


def test_strengths_are_data_not_structure(trees, tmp_path):
  graph, _, qstate = trees
  file, _ = _write_lora(tmp_path, "diffusers")
  lora = load_lora(file, CFG)
  step = jax.jit(lambda st, *a: nnx.merge(graph, st)(*a[:6], guidance=a[6]))
  outs = [step(apply_loras(qstate, [lora], [s]), *_inputs()) for s in (0.0, 0.5, 1.0)]
  assert step._cache_size() == 1     # one compilation for every strength
  np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(step(
      apply_loras(qstate, [lora], [0.0]), *_inputs())))
  assert np.abs(np.asarray(outs[2] - outs[0])).max() > 1e-4
  base = step(qstate, *_inputs())    # the LoRA-free tree is untouched: removal is exact
  assert np.abs(np.asarray(base - outs[0])).max() < 1e-2   # strength 0: bf16 branch only


def test_bad_lora_files_name_the_problem(trees, tmp_path):
  _, state, _ = trees
  a, b = _ab(4, H, H)
  save_file({"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": a,
             "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": b},
            tmp_path / "deep.safetensors")
  with pytest.raises(ValueError, match=r"1 LoRA modules the model does not have "
                                       r"\['transformer.transformer_blocks.7.attn.to_q'\]"):
    load_lora(tmp_path / "deep.safetensors", CFG)
  save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": a},
            tmp_path / "half.safetensors")
  with pytest.raises(ValueError, match="has no matching"):
    load_lora(tmp_path / "half.safetensors", CFG)
  a2, b2 = _ab(4, 2 * H, H)
  save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": a2,
             "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": b2},
            tmp_path / "wide.safetensors")
  with pytest.raises(ValueError, match=r"double_blocks/0/img_attn/proj are \[128, r\]"):
    apply_loras(nnx.to_pure_dict(state), [load_lora(tmp_path / "wide.safetensors", CFG)])
  (tmp_path / "junk.safetensors").write_bytes(b"junk")
  with pytest.raises(ValueError, match="not a readable safetensors LoRA file"):
    load_lora(tmp_path / "junk.safetensors", CFG)
  with pytest.raises(ValueError, match="unknown LoRA naming"):
    save_file({"foo.weight": a}, tmp_path / "foo.safetensors")
    load_lora(tmp_path / "foo.safetensors", CFG)


def test_kohya_and_its_diffusers_conversion_agree():
  """tests/golden/lora_kohya*.safetensors: a kohya LoRA at FLUX.1's widths and diffusers'
  own conversion of it to PEFT names (q/k/v and proj_mlp split, alphas folded): both load
  onto the same layers with the same deltas."""
  from pathlib import Path
  from svdq_jax.models.flux import FLUX_DEV
  golden = Path(__file__).parent / "golden"
  kohya = load_lora(golden / "lora_kohya.safetensors", FLUX_DEV)
  peft = load_lora(golden / "lora_kohya_as_diffusers.safetensors", FLUX_DEV)
  assert set(kohya.factors) == set(peft.factors) == {
      "double_blocks/0/img_attn/qkv", "single_blocks/0/linear1", "double_blocks/0/txt_attn/proj"}
  x = np.random.default_rng(1).standard_normal((3, 3072))
  for path, (down, up) in kohya.factors.items():
    d2, u2 = peft.factors[path]
    want = (x @ down.astype(np.float64)) @ up.astype(np.float64)
    got = (x @ d2.astype(np.float64)) @ u2.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
