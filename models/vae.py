"""FLUX.1's image autoencoder (diffusers ``AutoencoderKL``) in Flax NNX, NHWC.

Module names follow diffusers' (``encoder.down_blocks.0.resnets.1.conv1``), so its checkpoints
map onto this tree by layout alone (``convert.pipeline``). FLUX.1: 16 latent channels, block
widths 128/256/512/512, 2 resnets per encoder block (3 per decoder block), GroupNorm(32),
one single-head attention in each mid block, no quant convs; latents enter the transformer as
``(z - shift_factor) * scaling_factor``. Images are f32 [B, H, W, 3] in [-1, 1]; latents
[B, H/8, W/8, 16] for FLUX (one halving per block after the first).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from svdq_jax.layers import Linear


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  latent_channels: int = 16
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.3611
  shift_factor: float = 0.1159

  @property
  def downscale(self) -> int:
    """Pixels per latent along each side."""
    return 2 ** (len(self.block_out_channels) - 1)


FLUX_VAE = VAEConfig()
EPS = 1e-6


def conv(cin: int, cout: int, kernel: int, rngs: nnx.Rngs, stride: int = 1,
         padding="SAME") -> nnx.Conv:
  return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding=padding,
                  rngs=rngs)


def group_norm(channels: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
  return nnx.GroupNorm(channels, num_groups=groups, epsilon=EPS, rngs=rngs)


class ResnetBlock(nnx.Module):
  """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 shortcut when widths differ."""

  def __init__(self, cin: int, cout: int, groups: int, rngs: nnx.Rngs):
    self.norm1 = group_norm(cin, groups, rngs)
    self.conv1 = conv(cin, cout, 3, rngs)
    self.norm2 = group_norm(cout, groups, rngs)
    self.conv2 = conv(cout, cout, 3, rngs)
    self.conv_shortcut = conv(cin, cout, 1, rngs) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nnx.Module):
  """Single-head self-attention over the H*W positions, with a residual connection."""

  def __init__(self, channels: int, groups: int, rngs: nnx.Rngs):
    self.group_norm = group_norm(channels, groups, rngs)
    self.to_q = Linear(channels, channels, rngs=rngs)
    self.to_k = Linear(channels, channels, rngs=rngs)
    self.to_v = Linear(channels, channels, rngs=rngs)
    self.to_out = nnx.List([Linear(channels, channels, rngs=rngs)])

  def __call__(self, x):
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, 1, c)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    # softmax in f32 (diffusers upcasts it), whatever the activations' dtype
    out = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                       v.astype(jnp.float32)).astype(x.dtype)
    return x + self.to_out[0](out).reshape(b, h, w, c)


class MidBlock(nnx.Module):
  def __init__(self, channels: int, groups: int, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs) for _ in range(2)])
    self.attentions = nnx.List([Attention(channels, groups, rngs)])

  def __call__(self, x):
    return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nnx.Module):
  """Pad one row and column at the end (bottom/right), then a stride-2 3x3 conv."""

  def __init__(self, channels: int, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, rngs, stride=2, padding="VALID")

  def __call__(self, x):
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour 2x, then a 3x3 conv."""

  def __init__(self, channels: int, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, rngs)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, n: int, groups: int, down: bool, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, rngs)
                             for i in range(n)])
    self.downsamplers = nnx.List([Downsample(cout, rngs)] if down else [])

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    for d in self.downsamplers:
      x = d(x)
    return x


class UpBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, n: int, groups: int, up: bool, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, rngs)
                             for i in range(n)])
    self.upsamplers = nnx.List([Upsample(cout, rngs)] if up else [])

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    for u in self.upsamplers:
      x = u(x)
    return x


class Encoder(nnx.Module):
  """image [B, H, W, 3] -> posterior moments [B, H/s, W/s, 2 * latent] (mean, log-variance)."""

  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    ch, g = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = conv(cfg.in_channels, ch[0], 3, rngs)
    self.down_blocks = nnx.List([
        DownBlock(ch[max(i - 1, 0)], c, cfg.layers_per_block, g, i < len(ch) - 1, rngs)
        for i, c in enumerate(ch)])
    self.mid_block = MidBlock(ch[-1], g, rngs)
    self.conv_norm_out = group_norm(ch[-1], g, rngs)
    self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, rngs)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """latents z [B, h, w, latent] (unscaled) -> image [B, h*s, w*s, 3]."""

  def __init__(self, cfg: VAEConfig, rngs: nnx.Rngs):
    ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
    self.conv_in = conv(cfg.latent_channels, ch[0], 3, rngs)
    self.mid_block = MidBlock(ch[0], g, rngs)
    self.up_blocks = nnx.List([
        UpBlock(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, g, i < len(ch) - 1, rngs)
        for i, c in enumerate(ch)])
    self.conv_norm_out = group_norm(ch[-1], g, rngs)
    self.conv_out = conv(ch[-1], cfg.in_channels, 3, rngs)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """``encode`` images to the transformer's latents and ``decode`` them back (both scaled and
  shifted as FLUX expects)."""

  def __init__(self, cfg: VAEConfig = FLUX_VAE, rngs: nnx.Rngs | None = None):
    rngs = rngs or nnx.Rngs(0)
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs)
    self.decoder = Decoder(cfg, rngs)

  def encode(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """images [B, H, W, 3] in [-1, 1] (H, W multiples of ``cfg.downscale``) -> latents
    [B, H/s, W/s, latent], scaled: the posterior mean, or a sample of it with ``key``."""
    if images.ndim != 4 or images.shape[-1] != self.cfg.in_channels:
      raise ValueError(f"images must be [B, H, W, {self.cfg.in_channels}], got {images.shape}")
    if images.shape[1] % self.cfg.downscale or images.shape[2] % self.cfg.downscale:
      raise ValueError(f"image height and width must be multiples of {self.cfg.downscale}, "
                       f"got {images.shape[1]}x{images.shape[2]}")
    mean, logvar = jnp.split(self.encoder(images), 2, axis=-1)
    z = mean
    if key is not None:
      std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
      z = mean + std * jax.random.normal(key, mean.shape, mean.dtype)
    return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

  def decode(self, latents: jax.Array) -> jax.Array:
    """latents [B, h, w, latent] (scaled, as the transformer produces them) -> images
    [B, h*s, w*s, 3], nominally in [-1, 1] (not clipped)."""
    if latents.ndim != 4 or latents.shape[-1] != self.cfg.latent_channels:
      raise ValueError(f"latents must be [B, h, w, {self.cfg.latent_channels}], "
                       f"got {latents.shape}")
    return self.decoder(latents / self.cfg.scaling_factor + self.cfg.shift_factor)
