"""T5 v1.1's encoder (transformers ``T5EncoderModel``) in Flax NNX: FLUX.1's per-token text
conditioning (T5-XXL: 24 blocks, d_model 4096, 64 heads of 64, gated-GELU FF 10240).

Module names follow transformers' (``encoder.block.3.layer.0.SelfAttention.q``), so its
checkpoints map onto this tree by layout alone (``convert.components``). Pre-RMS-norm blocks;
attention without 1/sqrt(d) scaling plus a learned relative-position bias (32 buckets up to
distance 128, owned by the first block and shared by all); feed-forward
``wo(gelu_tanh(wi_0 x) * wi_1 x)``; a final RMS norm.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from svdq_jax.layers import Linear, lookup
from svdq_jax.models.flux import RMSNorm   # T5's LayerNorm: no mean, no bias, stats in f32


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6


T5_XXL = T5Config()


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """int32 [L, L] bucket of (key - query) positions, bidirectional: half the buckets per
  sign, exact below num_buckets / 4, log-spaced up to ``max_distance`` (computed in f32 on
  the host, as the reference does, so bucket edges agree)."""
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  max_exact = half // 2
  # (rel < max_exact takes the exact bucket below; max(., 1) only keeps log finite there)
  large = max_exact + (np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
                       / np.float32(math.log(max_distance / max_exact))
                       * np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class SelfAttention(nnx.Module):
  def __init__(self, cfg: T5Config, has_bias: bool, rngs: nnx.Rngs):
    inner = cfg.num_heads * cfg.d_kv
    self.heads = cfg.num_heads
    self.q, self.k, self.v = (Linear(cfg.d_model, inner, use_bias=False, rngs=rngs)
                              for _ in range(3))
    self.o = Linear(inner, cfg.d_model, use_bias=False, rngs=rngs)
    if has_bias:
      self.relative_attention_bias = nnx.Embed(cfg.relative_attention_num_buckets,
                                               cfg.num_heads, rngs=rngs)

  def __call__(self, x, bias):
    b, l, _ = x.shape
    q, k, v = (p(x).reshape(b, l, self.heads, -1) for p in (self.q, self.k, self.v))
    # T5 does not scale the logits; softmax in f32 (as transformers)
    out = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                       v.astype(jnp.float32), bias=bias, scale=1.0)
    return self.o(out.astype(x.dtype).reshape(b, l, -1))


class LayerSelfAttention(nnx.Module):
  def __init__(self, cfg: T5Config, has_bias: bool, rngs: nnx.Rngs):
    self.SelfAttention = SelfAttention(cfg, has_bias, rngs)
    self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

  def __call__(self, x, bias):
    return x + self.SelfAttention(self.layer_norm(x), bias)


class DenseGatedGelu(nnx.Module):
  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.wi_0 = Linear(cfg.d_model, cfg.d_ff, use_bias=False, rngs=rngs)
    self.wi_1 = Linear(cfg.d_model, cfg.d_ff, use_bias=False, rngs=rngs)
    self.wo = Linear(cfg.d_ff, cfg.d_model, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class LayerFF(nnx.Module):
  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.DenseReluDense = DenseGatedGelu(cfg, rngs)
    self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

  def __call__(self, x):
    return x + self.DenseReluDense(self.layer_norm(x))


class Block(nnx.Module):
  def __init__(self, cfg: T5Config, first: bool, rngs: nnx.Rngs):
    self.layer = nnx.List([LayerSelfAttention(cfg, first, rngs), LayerFF(cfg, rngs)])

  def __call__(self, x, bias):
    return self.layer[1](self.layer[0](x, bias))


class Stack(nnx.Module):
  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.block = nnx.List([Block(cfg, i == 0, rngs) for i in range(cfg.num_layers)])
    self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5EncoderModel(nnx.Module):
  """token ids int [B, L] (+ optional mask bool [B, L], True = real token) -> hidden states
  [B, L, d_model] in the parameters' dtype. FLUX passes no mask (padding tokens attend and
  are attended to, as in diffusers' FluxPipeline)."""

  def __init__(self, cfg: T5Config = T5_XXL, rngs: nnx.Rngs | None = None):
    rngs = rngs or nnx.Rngs(0)
    self.cfg = cfg
    self.shared = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.encoder = Stack(cfg, rngs)

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    if ids.ndim != 2:
      raise ValueError(f"token ids must be [B, L], got {ids.shape}")
    cfg, l = self.cfg, ids.shape[1]
    buckets = relative_position_buckets(l, cfg.relative_attention_num_buckets,
                                        cfg.relative_attention_max_distance)
    table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.embedding
    bias = jnp.transpose(table[...][buckets], (2, 0, 1))[None].astype(jnp.float32)  # [1,H,L,L]
    if mask is not None:
      bias = jnp.where(mask[:, None, None, :], bias, jnp.finfo(jnp.float32).min)
    x = lookup(self.shared, ids)   # bf16 weights: bf16 activations and embeddings for FLUX
    for block in self.encoder.block:
      x = block(x, bias)
    return self.encoder.final_layer_norm(x)
