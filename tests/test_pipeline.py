"""Prompt to PNG on a tiny random FLUX.1 pipeline folder (tests/pipeline_helpers.py)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pipeline_helpers import write_pipeline
from svdq_jax import cli
from svdq_jax.models import flux, sampling
from svdq_jax.models.pipeline import FluxPipeline


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  return write_pipeline(tmp_path_factory.mktemp("p") / "pipe")


def test_generate_cli_writes_pngs_with_settings(pipeline_dir, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle\n\n  a blue square on gray  \n")
  out = tmp_path / "out"
  assert cli.main(["generate", str(pipeline_dir), "--batch-file", str(prompts), "--out",
                   str(out), "--steps", "2", "--height", "32", "--width", "48",
                   "--batch-size", "2", "--seed", "7", "--quiet"]) == 0
  assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png"]
  img = Image.open(out / "0001.png")
  assert img.size == (48, 32) and img.mode == "RGB"
  assert img.text["prompt"] == "a blue square on gray"
  assert json.loads(img.text["seed"]) == 7 and json.loads(img.text["steps"]) == 2
  assert np.asarray(img).std() > 1.0   # not a blank image


def test_same_seed_same_image_whatever_the_batch(pipeline_dir):
  pipe = FluxPipeline.load(pipeline_dir)
  kw = dict(steps=2, height=16, width=16, seed=3, progress=False)
  alone = np.asarray(pipe("a green triangle", **kw)[0], np.int16)
  batched = np.asarray(pipe(["a red circle", "a green triangle"], **kw)[1], np.int16)
  assert np.abs(alone - batched).max() <= 1   # same noise and text; float batch effects only
  # the prompt reaches the model (random tiny weights: its effect on pixels is small)
  txt, y = pipe.encode_text(["a red circle", "a green triangle"])
  assert np.abs(np.asarray(txt[0] - txt[1])).max() > 1e-2
  assert np.abs(np.asarray(y[0] - y[1])).max() > 1e-2
  other = np.asarray(pipe("a red circle", **kw)[0], np.int16)
  assert np.abs(alone - other).max() > 0


def test_generate_errors_name_the_problem(pipeline_dir, tmp_path, capsys):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n \n")
  assert cli.main(["generate", str(pipeline_dir), "--batch-file", str(empty), "--out",
                   str(tmp_path / "o")]) == 2
  assert "holds no prompts" in capsys.readouterr().err
  assert cli.main(["generate", str(pipeline_dir), "x", "--height", "20", "--out",
                   str(tmp_path / "o"), "--quiet"]) == 2
  assert "multiples of 8" in capsys.readouterr().err
  assert not list((tmp_path / "o").glob("*.png"))
  # 0 steps is an error, not the default number of steps
  assert cli.main(["generate", str(pipeline_dir), "x", "--steps", "0", "--height", "16",
                   "--width", "16", "--out", str(tmp_path / "o"), "--quiet"]) == 2
  assert "num_steps must be >= 1, got 0" in capsys.readouterr().err
  assert not list((tmp_path / "o").glob("*.png"))
  assert cli.main(["sample", str(tmp_path / "none"), str(tmp_path / "none.npz"), "--steps",
                   "0", "--width", "-16"]) == 2
  assert ("--steps must be >= 1, got 0; --width must be >= 1, got -16"
          in capsys.readouterr().err)
  assert cli.main(["generate", str(pipeline_dir), "x", "--attention", "int4", "--out",
                   str(tmp_path / "o")]) == 2
  assert "attention implementation must be one of" in capsys.readouterr().err
  for name in ("cudnn", "cudnn_fp8"):   # CPU: refused before the checkpoint is read
    assert cli.main(["sample", str(tmp_path / "none"), str(tmp_path / "none.npz"),
                     "--attention", name]) == 2
    assert f"--attention {name} is cuDNN's kernel, for NVIDIA GPUs" in capsys.readouterr().err
    assert flux.attention_implementation() is None
  assert cli.main(["generate", str(pipeline_dir / "vae"), "x", "--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "not a FLUX.1 pipeline folder" in err and "tokenizer_2/" in err


def test_mismatched_components_are_refused(pipeline_dir):
  import dataclasses
  pipe = FluxPipeline.load(pipeline_dir)
  with pytest.raises(ValueError, match=r"CLIP tokenizer \(.*\) has 4514 tokens, more than "
                                       r"the T5 encoder's vocabulary \(320\)"):
    dataclasses.replace(pipe, t5_tokenizer=pipe.clip_tokenizer)   # CLIP's BPE as T5's


def test_quantize_then_generate_quantized(pipeline_dir, tmp_path):
  prompts = tmp_path / "calib.txt"
  prompts.write_text("a red circle\na blue square\n")
  qdir = tmp_path / "q"
  assert cli.main(["quantize", str(pipeline_dir), str(qdir), "--batch-file", str(prompts),
                   "--calib-steps", "2", "--calib-size", "16", "--rank", "8",
                   "--fast-search", "--t5", "w4a16", "--residual", "gptq", "--quiet"]) == 0
  summary = json.loads((qdir / "quantize.json").read_text())
  assert summary["layers_quantized"] > 0 and summary["calibration_prompts"] == 2
  assert summary["settings"]["residual"] == "gptq"
  assert summary["settings"]["fmt"] == "int4"   # the default off Hopper, recorded as chosen
  from svdq_jax.convert import load_flux
  from svdq_jax.qlinear import QuantizedLinear
  qmodel = load_flux(qdir)
  assert isinstance(qmodel.double_blocks[0].img_attn.qkv.kernel.get_value(), QuantizedLinear)
  # the Hessians a few layers at a time (several calibration passes): the same checkpoint
  assert cli.main(["quantize", str(pipeline_dir), str(tmp_path / "q_passes"), "--batch-file",
                   str(prompts), "--calib-steps", "2", "--calib-size", "16", "--rank", "8",
                   "--fast-search", "--residual", "gptq", "--hessian-memory", "0.0005",
                   "--quiet"]) == 0
  for a, b in zip(*(jax.tree_util.tree_leaves(nnx.state(m))
                    for m in (qmodel, load_flux(tmp_path / "q_passes")))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  from svdq_jax.convert import load_t5
  qt5 = load_t5(qdir / "text_encoder_2")
  wo = qt5.encoder.block[0].layer[1].DenseReluDense.wo.kernel.get_value()
  assert isinstance(wo, QuantizedLinear) and wo.act_format is None   # W4A16
  out = tmp_path / "out"
  args = ["generate", str(pipeline_dir), "a red circle", "--out", str(out), "--steps", "2",
          "--height", "16", "--width", "16", "--quiet"]
  assert cli.main(args + ["--quantized", str(qdir)]) == 0
  assert cli.main(args[:4] + [str(tmp_path / "float")] + args[5:]) == 0
  quant = np.asarray(Image.open(out / "0000.png"), np.float32)
  ref = np.asarray(Image.open(tmp_path / "float" / "0000.png"), np.float32)
  assert quant.shape == ref.shape == (16, 16, 3)
  # 4-bit on a random tiny model: close to, not equal to, the float image
  assert 0 < np.abs(quant - ref).mean() < 20
  assert cli.main(["quantize", str(pipeline_dir), str(qdir), "--quiet"]) == 2   # exists
  assert cli.main(["quantize", str(pipeline_dir), str(tmp_path / "q2"), "--devices", "99",
                   "--quiet"]) == 2
  assert cli.main(["quantize", str(pipeline_dir), str(tmp_path / "q2"), "--residual", "gptq",
                   "--hessian-memory", "0", "--quiet"]) == 2
  assert not (tmp_path / "q2").exists()


def test_converted_pipeline_gives_the_same_image(pipeline_dir, tmp_path):
  dst = tmp_path / "converted"
  assert cli.main(["convert", str(pipeline_dir), str(dst), "--quiet"]) == 0
  assert sorted(p.name for p in dst.iterdir()) == sorted(
      ["model_index.json", "transformer", "text_encoder", "text_encoder_2", "vae",
       "tokenizer", "tokenizer_2"])
  kw = dict(steps=2, height=16, width=16, seed=5, progress=False)
  a = np.asarray(FluxPipeline.load(pipeline_dir)("a red circle", **kw)[0])
  b = np.asarray(FluxPipeline.load(dst)("a red circle", **kw)[0])
  np.testing.assert_array_equal(a, b)
  assert cli.main(["convert", str(pipeline_dir), str(dst), "--quiet"]) == 2   # exists


def test_generate_with_lora(pipeline_dir, tmp_path):
  from safetensors.numpy import save_file
  rng = np.random.default_rng(0)
  h = 64   # the tiny pipeline's transformer width
  save_file({"lora_unet_single_blocks_0_linear2.lora_down.weight":
             rng.standard_normal((4, h + 4 * h)).astype(np.float32),
             "lora_unet_single_blocks_0_linear2.lora_up.weight":
             rng.standard_normal((h, 4)).astype(np.float32)}, tmp_path / "style.safetensors")
  args = ["generate", str(pipeline_dir), "a red circle", "--steps", "2", "--height", "16",
          "--width", "16", "--quiet", "--out"]
  assert cli.main(args + [str(tmp_path / "a")]) == 0
  assert cli.main(args + [str(tmp_path / "b"), "--lora",
                          f"{tmp_path / 'style.safetensors'}:0.8"]) == 0
  a = np.asarray(Image.open(tmp_path / "a" / "0000.png"), np.int16)
  b = np.asarray(Image.open(tmp_path / "b" / "0000.png"), np.int16)
  assert np.abs(a - b).max() > 0
  assert cli.main(args + [str(tmp_path / "c"), "--lora", str(tmp_path / "none.safetensors")]) == 2


def test_a_call_leaves_every_weight_buffer_in_place(pipeline_dir):
  """Encoding, sampling and decoding only read the weights: no copy of a model per call
  (nnx.jit's default hands the whole state back as new buffers, which held a second T5-XXL,
  9.5 GB, during text encoding)."""
  pipe = FluxPipeline.load(pipeline_dir)
  models = (pipe.clip, pipe.t5, pipe.transformer, pipe.vae)

  def buffers():
    return [a.unsafe_buffer_pointer() for m in models
            for a in jax.tree.leaves(nnx.state(m))]

  before = buffers()
  pipe("a red circle", steps=2, height=16, width=16, progress=False)
  _, args, _ = pipe._prepare(["a red circle"], 2, 3.5, 0, 16, 16)
  sampling.trajectory_inputs(pipe.transformer, *args[:5], guidance=args[5])
  assert buffers() == before


def test_quantize_out_of_memory_with_gptq_points_at_the_hessian_budget(pipeline_dir, tmp_path,
                                                                        capsys, monkeypatch):
  """GPTQ's Hessians exhausting the device memory: the command's error names the budget
  flag, and no checkpoint is left; without GPTQ the error is not dressed up."""
  budgets = []

  def exhausted(*args, **kwargs):
    budgets.append(kwargs["hessian_bytes"])
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 944 MB")
  monkeypatch.setattr(FluxPipeline, "quantize", exhausted)
  qdir = tmp_path / "q"
  assert cli.main(["quantize", str(pipeline_dir), str(qdir), "--residual", "gptq",
                   "--quiet"]) == 2
  err = capsys.readouterr().err
  assert budgets == ["auto"]   # no --hessian-memory: the free memory decides
  assert ("out of device memory with GPTQ's Hessians held all at once, or half the free "
          "memory at a time where they did not fit" in err)
  assert "--hessian-memory" in err and not qdir.exists()
  with pytest.raises(jax.errors.JaxRuntimeError):
    cli.main(["quantize", str(pipeline_dir), str(qdir), "--quiet"])
