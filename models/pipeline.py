"""Prompt to image with FLUX.1: tokenizers -> CLIP + T5 -> jitted sampling loop -> VAE.

A pipeline folder has diffusers' FLUX.1 layout: ``model_index.json``, ``transformer/``,
``text_encoder/`` (CLIP), ``text_encoder_2/`` (T5), ``vae/``, ``tokenizer/``,
``tokenizer_2/``. ``FluxPipeline.load`` reads it (tensors streamed to the device one at a
time), optionally with the transformer replaced by a quantized checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, PngImagePlugin

from svdq_jax.models import sampling
from svdq_jax.models.clip import CLIPTextModel
from svdq_jax.models.flux import Flux
from svdq_jax.models.t5 import T5EncoderModel
from svdq_jax.models.tokenizers import Tokenizer, clip_tokenizer, t5_tokenizer
from svdq_jax.models.vae import AutoencoderKL

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae", "tokenizer",
              "tokenizer_2")


def check_pipeline_folder(path) -> pathlib.Path:
  """``path`` as a FLUX pipeline folder, or a ValueError naming what is missing."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"pipeline folder not found: {path}")
  missing = [c for c in COMPONENTS if not (path / c).is_dir()]
  if not (path / "model_index.json").exists() or missing:
    raise ValueError(f"{path} is not a FLUX.1 pipeline folder (diffusers layout): missing "
                     f"{(['model_index.json'] if not (path / 'model_index.json').exists() else [])
                        + [c + '/' for c in missing]}")
  return path


@dataclasses.dataclass
class FluxPipeline:
  transformer: Flux
  clip: CLIPTextModel
  t5: T5EncoderModel
  vae: AutoencoderKL
  clip_tokenizer: Tokenizer
  t5_tokenizer: Tokenizer

  def __post_init__(self):
    for tok, enc, name in ((self.clip_tokenizer, self.clip.cfg.vocab_size, "CLIP"),
                           (self.t5_tokenizer, self.t5.cfg.vocab_size, "T5")):
      if tok.vocab_size > enc:
        raise ValueError(f"{tok.name} has {tok.vocab_size} tokens, more than the {name} "
                         f"encoder's vocabulary ({enc}): not the same model's tokenizer")
    cfg = self.transformer.cfg
    if (cfg.context_in_dim, cfg.vec_in_dim) != (self.t5.cfg.d_model, self.clip.cfg.hidden_size):
      raise ValueError(f"the transformer takes T5 width {cfg.context_in_dim} and CLIP width "
                       f"{cfg.vec_in_dim}; the encoders give {self.t5.cfg.d_model} and "
                       f"{self.clip.cfg.hidden_size}")
    if cfg.in_channels != 4 * self.vae.cfg.latent_channels:
      raise ValueError(f"the transformer takes {cfg.in_channels // 4} latent channels, the VAE "
                       f"has {self.vae.cfg.latent_channels}")

  @classmethod
  def load(cls, path, *, transformer: Flux | None = None, t5: T5EncoderModel | None = None,
           t5_max_length: int | None = None, device=None) -> FluxPipeline:
    """Every component from a pipeline folder (diffusers' files, or ``convert_pipeline``'s);
    ``transformer`` and ``t5`` replace the folder's (e.g. quantized ones). T5 reads 512 tokens
    for dev (guidance-distilled) and 256 for schnell unless ``t5_max_length``."""
    from svdq_jax.convert import load_clip, load_flux, load_t5, load_vae
    path = check_pipeline_folder(path)
    transformer = transformer or load_flux(path, device=device)
    max_len = t5_max_length or (512 if transformer.cfg.guidance_embed else 256)
    return cls(transformer=transformer, clip=load_clip(path, device=device),
               t5=t5 or load_t5(path, device=device), vae=load_vae(path, device=device),
               clip_tokenizer=clip_tokenizer(path), t5_tokenizer=t5_tokenizer(path, max_len))

  @property
  def size_multiple(self) -> int:
    """Image sides must be multiples of this: the VAE's downscale x the 2x2 patches (16)."""
    return 2 * self.vae.cfg.downscale

  def encode_text(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """prompts -> (T5 token embeddings [B, L, d_t5], CLIP pooled [B, d_clip])."""
    return _encode(self.clip, self.t5, jnp.asarray(self.clip_tokenizer(prompts)),
                   jnp.asarray(self.t5_tokenizer(prompts)))

  def _prepare(self, prompts, steps, guidance, seed, height, width):
    """(sampling arguments, settings) for ``sampling.sample`` / ``trajectory_inputs``."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise ValueError("no prompts")
    m = self.size_multiple
    if height % m or width % m or height <= 0 or width <= 0:
      raise ValueError(f"height and width must be positive multiples of {m}, got "
                       f"{height}x{width}")
    dev = self.transformer.cfg.guidance_embed
    steps = (28 if dev else 4) if steps is None else steps   # 0 is an error, not the default
    txt, y = self.encode_text(prompts)
    down = self.vae.cfg.downscale
    c = self.vae.cfg.latent_channels
    noise = jnp.concatenate([sampling.initial_noise(seed, 1, height * 8 // down,
                                                    width * 8 // down, channels=c)
                             for _ in prompts])
    sigmas = sampling.schedule(steps, (height // m) * (width // m), shift=dev)
    args = (noise.astype(txt.dtype), txt, jnp.zeros((txt.shape[1], 3), jnp.float32), y,
            sigmas, guidance if dev else None)
    settings = dict(steps=steps, guidance=guidance if dev else None, seed=seed,
                    height=height, width=width)
    return prompts, args, settings

  def __call__(self, prompts: str | Sequence[str], *, steps: int | None = None,
               guidance: float = 3.5, seed: int = 0, height: int = 1024, width: int = 1024,
               progress: bool = True, mesh=None, parallel: str = "data",
               hoist_weights: bool = False, hoist_modulation: bool = True
               ) -> list[Image.Image]:
    """Images (PIL, RGB, height x width) for the prompts, with ``seed`` the same noise for a
    prompt whatever the batch. ``steps`` defaults to 28 for dev and 4 for schnell;
    ``guidance`` applies to dev (guidance-distilled) models only; ``mesh``: the sampling loop
    over its devices, ``parallel`` 'data' (prompts split) or 'sequence' (each image's tokens
    split; ``sampling.sample``); ``hoist_weights``: the quantized weights expanded to int8
    once per call instead of once per step, ``hoist_modulation`` (default on): every step's
    modulations computed before the loop in one batch (both ``sampling.sample``). Each image
    carries the prompt and settings as PNG text metadata (``image.info``)."""
    prompts, args, settings = self._prepare(prompts, steps, guidance, seed, height, width)
    latents = sampling.sample(self.transformer, *args[:5], guidance=args[5],
                              progress=progress and mesh is None, mesh=mesh,
                              parallel=parallel, hoist_weights=hoist_weights,
                              hoist_modulation=hoist_modulation)
    pixels = np.asarray(_decode(self.vae, jnp.transpose(latents, (0, 2, 3, 1))))
    return [_to_image(p, dict(prompt=prompt, **settings)) for p, prompt in zip(pixels, prompts)]

  def quantize(self, config, prompts: Sequence[str], *, steps: int | None = None,
               guidance: float = 3.5, seed: int = 0, height: int = 512, width: int = 512,
               batch_size: int = 4, max_samples: int = 256, progress: bool = True,
               report: dict | None = None, devices=None,
               hessian_bytes: int | str | None = "auto") -> Flux:
    """The transformer quantized with ``config`` (``svdq_jax.quantize``), calibrated on the
    activations of real denoising trajectories: every step of sampling each prompt (batches
    of ``batch_size``, noise from ``seed + batch index``) at height x width. With
    ``config.uses_gptq`` calibration also accumulates each layer's Hessian, at most
    ``hessian_bytes`` of them at a time (``svdq_jax.calibrate_and_quantize``; None: all;
    'auto': all where the device's free memory holds them, else half of it at a time);
    ``devices`` spreads the layers' searches over several devices."""
    import svdq_jax
    model = self.transformer
    inputs = []
    for i in range(0, len(prompts), batch_size):
      _, args, _ = self._prepare(prompts[i:i + batch_size], steps, guidance, seed + i,
                                 height, width)
      inputs += sampling.trajectory_inputs(model, *args)
    return svdq_jax.calibrate_and_quantize(
        lambda a: model(*a[:6], guidance=a[6]), inputs, model, config,
        hessian_bytes=hessian_bytes, max_samples=max_samples, report=report,
        progress=progress, devices=devices)


def calibration_prompts() -> list[str]:
  """The project's calibration prompt set (32 varied prompts: photos, paintings, text,
  diagrams, styles)."""
  path = pathlib.Path(__file__).with_name("calibration_prompts.txt")
  return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
          if line.strip()]


# jax.jit with the modules as pytrees (NNX modules are ones): these only read them. nnx.jit
# (flax 0.12) by default hands a module's whole state back as new buffers on every call (a
# copy of every weight, the T5-XXL's 9.5 GB included), and even with graph_updates=False
# walks the module graph in Python at every call (models.sampling: ~30 ms for FLUX.1-dev).
@jax.jit
def _encode(clip, t5, clip_ids, t5_ids):
  _, pooled = clip(clip_ids)
  return t5(t5_ids), pooled.astype(t5.shared.embedding.dtype)


@jax.jit
def _decode(vae, latents):
  return vae.decode(latents.astype(vae.decoder.conv_in.kernel.dtype)).astype(jnp.float32)


def _to_image(pixels: np.ndarray, settings: dict) -> Image.Image:
  """f32 [H, W, 3] in [-1, 1] -> an RGB image with ``settings`` as its PNG text."""
  rgb = np.round((np.clip(pixels, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  image = Image.fromarray(rgb, "RGB")
  image.info = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in settings.items()}
  return image


def save_png(image: Image.Image, path) -> None:
  """Writes ``image`` with its ``info`` (prompt and settings) as PNG text chunks."""
  meta = PngImagePlugin.PngInfo()
  for k, v in image.info.items():
    meta.add_itxt(k, str(v))
  image.save(path, format="PNG", pnginfo=meta)
