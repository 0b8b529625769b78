"""CLIP's text transformer (transformers ``CLIPTextModel``) in Flax NNX: FLUX.1's pooled
text conditioning (ViT-L/14's text tower: 12 layers, width 768, 12 heads, 77 tokens).

Module names follow transformers' (``text_model.encoder.layers.3.self_attn.q_proj``), so its
checkpoints map onto this tree by layout alone (``convert.components``). Pre-LayerNorm
blocks, causal self-attention, quick-GELU MLP, a final LayerNorm; the pooled output is the
final hidden state at the end-of-text token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from svdq_jax.layers import Linear, lookup


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  # 2 (the original CLIP configs, FLUX's among them): the end-of-text token is the largest id
  # in the sequence; otherwise the first occurrence of this id
  eos_token_id: int = 2


FLUX_CLIP = CLIPTextConfig()

ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class Attention(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.heads = cfg.num_attention_heads
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
        Linear(d, d, rngs=rngs) for _ in range(4))

  def __call__(self, x, mask):
    b, l, d = x.shape
    q, k, v = (p(x).reshape(b, l, self.heads, -1) for p in (self.q_proj, self.k_proj,
                                                              self.v_proj))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return self.out_proj(out.reshape(b, l, d))


class MLP(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs):
    self.act = ACTIVATIONS[cfg.hidden_act]
    self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
    self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, rngs=rngs)

  def __call__(self, x):
    return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs):
    self.layer_norm1 = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.self_attn = Attention(cfg, rngs)
    self.layer_norm2 = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, mask):
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class Embeddings(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs):
    self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
    self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs)

  def __call__(self, ids):
    return (lookup(self.token_embedding, ids)
            + self.position_embedding.embedding[:ids.shape[1]][None])


class Encoder(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs):
    self.layers = nnx.List([EncoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])


class TextTransformer(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, rngs: nnx.Rngs):
    self.embeddings = Embeddings(cfg, rngs)
    self.encoder = Encoder(cfg, rngs)
    self.final_layer_norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps,
                                          rngs=rngs)


class CLIPTextModel(nnx.Module):
  """token ids int [B, L] (L <= max_position_embeddings) -> (last hidden state [B, L, d],
  pooled [B, d]); float outputs in the parameters' dtype."""

  def __init__(self, cfg: CLIPTextConfig = FLUX_CLIP, rngs: nnx.Rngs | None = None):
    self.cfg = cfg
    self.text_model = TextTransformer(cfg, rngs or nnx.Rngs(0))

  def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    cfg = self.cfg
    if ids.ndim != 2 or ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f"token ids must be [B, L] with L <= {cfg.max_position_embeddings}, "
                       f"got {ids.shape}")
    tm = self.text_model
    x = tm.embeddings(ids)
    causal = jnp.tril(jnp.ones((ids.shape[1], ids.shape[1]), bool))[None, None]
    for layer in tm.encoder.layers:
      x = layer(x, causal)
    x = tm.final_layer_norm(x)
    if cfg.eos_token_id == 2:
      eos = jnp.argmax(ids, axis=-1)
    else:
      eos = jnp.argmax(ids == cfg.eos_token_id, axis=-1)
    return x, x[jnp.arange(ids.shape[0]), eos]
