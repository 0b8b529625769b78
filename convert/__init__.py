"""PyTorch FLUX checkpoints (BFL or diffusers naming) into Flax trees (``svdq_jax.convert``)."""

from svdq_jax.convert.mapping import detect_naming, flux_params_from_torch

__all__ = ["detect_naming", "flux_params_from_torch"]
