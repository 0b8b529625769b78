"""FLUX's VAE against diffusers' AutoencoderKL (golden files from
scripts/make_pipeline_golden.py), its converter's two namings and its input checks."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from svdq_jax.convert.components import load_vae
from svdq_jax.models.vae import VAEConfig

GOLDEN = pathlib.Path(__file__).parent / "golden"


def _io():
  io = np.load(GOLDEN / "vae_tiny_io.npz")
  raw = json.loads(str(io["config"]))
  cfg = VAEConfig(in_channels=raw["in_channels"], latent_channels=raw["latent_channels"],
                  block_out_channels=tuple(raw["block_out_channels"]),
                  layers_per_block=raw["layers_per_block"],
                  norm_num_groups=raw["norm_num_groups"], scaling_factor=raw["scaling_factor"],
                  shift_factor=raw["shift_factor"])
  return cfg, io


def _rel(a, b):
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("file", ["vae_tiny.safetensors", "vae_tiny_bfl.safetensors"])
def test_vae_matches_diffusers(file):
  cfg, io = _io()
  vae = load_vae(GOLDEN / file, cfg=cfg)
  assert _rel(vae.encoder(jnp.asarray(io["image"])), io["moments"]) < 1e-4
  assert _rel(vae.decoder(jnp.asarray(io["latents"])), io["decoded"]) < 1e-4
  # encode/decode apply FLUX's shift and scale around the raw encoder/decoder
  mean = io["moments"][..., :cfg.latent_channels]
  z = vae.encode(jnp.asarray(io["image"]))
  assert _rel(z, (mean - cfg.shift_factor) * cfg.scaling_factor) < 1e-4
  scaled = (io["latents"] - cfg.shift_factor) * cfg.scaling_factor
  assert _rel(jax.jit(vae.decode)(jnp.asarray(scaled)), io["decoded"]) < 1e-4


def test_vae_from_diffusers_folder_reads_its_config(tmp_path):
  cfg, io = _io()
  folder = tmp_path / "pipe" / "vae"
  folder.mkdir(parents=True)
  shutil.copy(GOLDEN / "vae_tiny.safetensors", folder / "diffusion_pytorch_model.safetensors")
  (folder / "config.json").write_text(str(io["config"]))
  vae = load_vae(tmp_path / "pipe")
  assert vae.cfg == cfg
  assert _rel(vae.decoder(jnp.asarray(io["latents"])), io["decoded"]) < 1e-4


def test_vae_bad_checkpoints_name_the_problem(tmp_path):
  cfg, _ = _io()
  sd = load_file(GOLDEN / "vae_tiny.safetensors")
  missing = dict(sd)
  del missing["decoder.conv_out.bias"]
  save_file(missing, tmp_path / "missing.safetensors")
  with pytest.raises(ValueError, match=r"missing 1 tensors \['decoder.conv_out.bias'\]"):
    load_vae(tmp_path / "missing.safetensors", cfg=cfg)
  wrong = dict(sd)
  wrong["encoder.conv_in.weight"] = np.zeros((16, 3, 5, 5), np.float32)
  save_file(wrong, tmp_path / "wrong.safetensors")
  with pytest.raises(ValueError, match=r"encoder.conv_in.weight: checkpoint \(16, 3, 5, 5\)"):
    load_vae(tmp_path / "wrong.safetensors", cfg=cfg)
  with pytest.raises(ValueError, match="not a FLUX VAE checkpoint"):
    save_file({"x": np.zeros(2, np.float32)}, tmp_path / "other.safetensors")
    load_vae(tmp_path / "other.safetensors", cfg=cfg)
  (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="not a readable safetensors file"):
    load_vae(tmp_path / "junk.safetensors", cfg=cfg)
  with pytest.raises(ValueError, match="does not match the model"):
    load_vae(GOLDEN / "vae_tiny.safetensors")   # FLUX's full config, tiny weights


def test_vae_rejects_bad_shapes():
  cfg, _ = _io()
  vae = load_vae(GOLDEN / "vae_tiny.safetensors", cfg=cfg)
  with pytest.raises(ValueError, match="multiples of 4"):
    vae.encode(jnp.zeros((1, 18, 16, 3)))
  with pytest.raises(ValueError, match=r"images must be \[B, H, W, 3\]"):
    vae.encode(jnp.zeros((1, 16, 16)))
  with pytest.raises(ValueError, match=r"latents must be \[B, h, w, 4\]"):
    vae.decode(jnp.zeros((1, 4, 4, 16)))
