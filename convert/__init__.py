"""PyTorch FLUX checkpoints (BFL or diffusers naming) into Flax trees (``svdq_jax.convert``):
the transformer, and the pipeline's VAE and text encoders."""

from svdq_jax.convert.checkpoint import (SafetensorsSource, restore_model, restore_tree,
                                        save_model, save_tree)
from svdq_jax.convert.components import load_clip, load_t5, load_vae
from svdq_jax.convert.convert import convert, load_flux
from svdq_jax.convert.mapping import detect_naming, flux_params_from_torch, infer_config

__all__ = ["SafetensorsSource", "convert", "detect_naming", "flux_params_from_torch",
           "infer_config", "load_clip", "load_flux", "load_t5", "load_vae", "restore_model",
           "restore_tree", "save_model", "save_tree"]
