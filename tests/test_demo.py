"""The demo: scene drawing and captions, model file I/O, training, and the end-to-end run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import save_file

from svdq_jax import cli
from svdq_jax.demo import model as demo_model
from svdq_jax.demo import shapes, train
from svdq_jax.models.flux import FluxConfig

TINY = FluxConfig(in_channels=12, out_channels=12, vec_in_dim=32, context_in_dim=32,
                  hidden_size=64, num_heads=1, depth=1, depth_single_blocks=1,
                  axes_dim=(16, 24, 24), guidance_embed=False)


def _scene(**kw):
  base = dict(count=np.array([1]), shape=np.array([[0, 0]]), color=np.array([[0, 1]]),
              background=np.array([list(shapes.COLORS).index("gray")]),
              center=np.array([[[0.5, 0.5], [0.0, 0.0]]], np.float32),
              size=np.array([[0.2, 0.1]], np.float32), relation=np.array([0]))
  return shapes.Scenes(**(base | kw))


def _pixel(img, x, y):
  """RGB in [0, 1] of image [3, H, W] in [-1, 1] at relative (x, y)."""
  return (np.asarray(img)[:, int(y * shapes.IMAGE_SIZE), int(x * shapes.IMAGE_SIZE)] + 1) / 2


def test_render_draws_shape_colour_over_background():
  img = shapes.render(_scene())[0]
  np.testing.assert_allclose(_pixel(img, 0.5, 0.5), shapes.COLORS["red"], atol=1e-6)
  np.testing.assert_allclose(_pixel(img, 0.05, 0.05), shapes.COLORS["gray"], atol=1e-6)
  # A circle leaves its bounding square's corner empty; a square fills it.
  corner = (0.5 + 0.17, 0.5 + 0.17)
  np.testing.assert_allclose(_pixel(img, *corner), shapes.COLORS["gray"], atol=1e-6)
  square = shapes.render(_scene(shape=np.array([[1, 0]])))[0]
  np.testing.assert_allclose(_pixel(square, *corner), shapes.COLORS["red"], atol=1e-6)


def test_random_scenes_keep_their_captions_true():
  s = shapes.random_scenes(np.random.default_rng(0), 500)
  two = s.count == 2
  first, second = s.center[two, 0], s.center[two, 1]
  axis = np.where(s.relation[two] < 2, 1, 0)            # above/below: y, left/right: x
  delta = first[np.arange(two.sum()), axis] - second[np.arange(two.sum()), axis]
  sign = np.where(np.isin(s.relation[two], (0, 2)), -1, 1)   # above / left of: first is lower
  assert (sign * delta >= s.size[two].sum(1)).all()     # the shapes never touch
  assert (s.color[:, 0] != s.color[:, 1]).all()
  assert (s.color != s.background[:, None]).all()
  ids = shapes.tokenize(shapes.captions(s))
  assert ids.shape == (500, shapes.MAX_TOKENS) and ids.max() < len(shapes.VOCAB)


def test_tokenize_rejects_unknown_words_and_long_prompts():
  with pytest.raises(ValueError, match="unknown word 'hexagon'"):
    shapes.tokenize(["a red hexagon on a gray background"])
  with pytest.raises(ValueError, match="13 words"):
    shapes.tokenize(["a red circle left of a blue square on a gray background a"])
  with pytest.raises(ValueError, match="unknown word"):
    shapes.tokenize([shapes.PAD])


def test_model_file_round_trip_and_bad_files(tmp_path):
  m = demo_model.DemoModel(TINY, seed=3)
  path = str(tmp_path / "m.safetensors")
  demo_model.save(m, path)
  back = demo_model.load(path)
  assert back.flux.cfg == TINY
  for a, b in zip(jax.tree.leaves(nnx.state(m, nnx.Param)), jax.tree.leaves(nnx.state(back, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a.astype(b.dtype)), np.asarray(b))
  with pytest.raises(FileNotFoundError):
    demo_model.load(str(tmp_path / "missing.safetensors"))
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="not a readable safetensors"):
    demo_model.load(str(bad))
  partial = tmp_path / "partial.safetensors"
  save_file({"text.pos": np.zeros((12, 32), np.float32)}, str(partial),
            metadata={"flux_config": json.dumps({**TINY.__dict__})})
  with pytest.raises(ValueError, match="missing tensors"):
    demo_model.load(str(partial))


def test_training_reduces_loss_and_writes_weights(tmp_path):
  out = str(tmp_path / "w.safetensors")
  log = train.train(out, steps=30, batch=8, lr=1e-3, warmup=5, log_every=10, progress=False,
                    cfg=TINY)
  assert log["steps_done"] == 30 and all(np.isfinite(log["loss"]))
  assert log["loss"][-1] < log["loss"][0]
  assert demo_model.load(out).flux.cfg == TINY


def test_demo_end_to_end_orders_methods(tmp_path):
  out = tmp_path / "demo"
  argv = ["demo", "--out", str(out), "--steps", "4", "--alpha-grid", "4", "--quiet",
          "--methods", "svdquant-int4,smoothquant,rtn",
          "--prompt", "a red circle above a blue square on a gray background",
          "--prompt", "a green square left of a white circle on a blue background"]
  assert cli.main(argv) == 0
  data = json.loads((out / "results.json").read_text())
  psnr = {r["key"]: r["psnr_db"] for r in data["results"]}
  assert list(psnr) == ["bf16", "svdquant-int4", "smoothquant", "rtn", "bf16+lora",
                        "svdquant-int4+lora"]
  assert psnr["svdquant-int4"] > psnr["smoothquant"] and psnr["svdquant-int4"] > psnr["rtn"]
  # the built-in sepia LoRA moves the images far; quantized + LoRA stays near 16-bit + LoRA
  assert psnr["bf16+lora"] < 20 < psnr["svdquant-int4+lora"]
  # the prediction error on held-out inputs orders them too, without the sampling's noise
  err = {r["key"]: r["velocity_error"] for r in data["results"]}
  assert err["bf16"] == 0 and 0 < err["svdquant-int4"] < min(err["smoothquant"], err["rtn"])
  assert err["svdquant-int4+lora"] < 0.5 * err["bf16+lora"]
  weights = {r["key"]: r["weight_bytes"] for r in data["results"]}
  assert weights["svdquant-int4"] < 0.5 * weights["bf16"]
  grid = Image.open(out / "grid.png")
  assert grid.size == (240 + 6 * 128, 36 + 2 * 128)
  assert "SVDQuant INT4" in (out / "results.md").read_text()
  assert data["outliers"]


def test_demo_cli_rejects_bad_prompts_and_methods(tmp_path, capsys):
  out = tmp_path / "demo"
  assert cli.main(["demo", "--out", str(out), "--prompt", "a red hexagon", "--quiet"]) == 2
  assert "hexagon" in capsys.readouterr().err
  assert cli.main(["demo", "--out", str(out), "--methods", "gptq", "--quiet"]) == 2
  assert "gptq" in capsys.readouterr().err
  assert not out.exists()


def test_lora_training_writes_a_loadable_lora(tmp_path):
  from svdq_jax.demo import lora as demo_lora
  from svdq_jax.lora import load_lora
  out = str(tmp_path / "l.safetensors")
  log = demo_lora.train_lora(out, steps=2, rank=2, batch=2, progress=False)
  assert log["steps"] == [2] and np.isfinite(log["loss"]).all()
  lora = load_lora(out, demo_model.DEMO_FLUX)
  assert len(lora.factors) == 2 * 8 + 4 * 2 and lora.rank == 2   # attention + MLP linears
  sep = np.asarray(demo_lora.sepia(jnp.ones((1, 3, 2, 2))))       # white -> sepia's max tone
  np.testing.assert_allclose(sep[0, :, 0, 0], np.minimum(demo_lora.SEPIA.sum(1), 1) * 2 - 1,
                             rtol=1e-6)
