"""BERT's encoder (transformers ``BertModel``) in Flax NNX: a small real pretrained transformer
to measure quantization quality on (all-MiniLM-L6-v2: 6 layers, width 384, 12 heads).

Module names follow transformers' (``encoder.layer.3.attention.self.query``), so its
checkpoints map onto this tree by layout alone (``convert.components.load_bert``). Post-
LayerNorm blocks: embeddings (word + position + token type) -> LayerNorm; per layer,
x = LN(x + attention(x)), x = LN(x + FF(x)) with exact (erf) GELU. The pooler is left out
(sentence embeddings mean-pool the last hidden state instead: ``mean_pooled``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from svdq_jax.layers import Linear, lookup


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 384
  intermediate_size: int = 1536
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12


MINILM_L6 = BertConfig()


def _layer_norm(cfg: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)


class Embeddings(nnx.Module):
  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
    self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                         rngs=rngs)
    self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, rngs=rngs)
    self.LayerNorm = _layer_norm(cfg, rngs)

  def __call__(self, ids):
    # one segment: token type 0 everywhere
    x = (lookup(self.word_embeddings, ids)
         + self.position_embeddings.embedding[:ids.shape[1]][None]
         + self.token_type_embeddings.embedding[0])
    return self.LayerNorm(x)


class SelfAttention(nnx.Module):
  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.heads = cfg.num_attention_heads
    self.query, self.key, self.value = (Linear(d, d, rngs=rngs) for _ in range(3))

  def __call__(self, x, mask):
    b, l, d = x.shape
    q, k, v = (p(x).reshape(b, l, self.heads, -1) for p in (self.query, self.key, self.value))
    return jax.nn.dot_product_attention(q, k, v, mask=mask).reshape(b, l, d)


class Dense(nnx.Module):
  """transformers' ``BertSelfOutput`` / ``BertOutput``: LN(x + dense(h))."""

  def __init__(self, cfg: BertConfig, d_in: int, rngs: nnx.Rngs):
    self.dense = Linear(d_in, cfg.hidden_size, rngs=rngs)
    self.LayerNorm = _layer_norm(cfg, rngs)

  def __call__(self, h, x):
    return self.LayerNorm(x + self.dense(h))


class Attention(nnx.Module):
  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.self = SelfAttention(cfg, rngs)
    self.output = Dense(cfg, cfg.hidden_size, rngs)

  def __call__(self, x, mask):
    return self.output(self.self(x, mask), x)


class Intermediate(nnx.Module):
  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.dense = Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)

  def __call__(self, x):
    return jax.nn.gelu(self.dense(x), approximate=False)


class Layer(nnx.Module):
  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.attention = Attention(cfg, rngs)
    self.intermediate = Intermediate(cfg, rngs)
    self.output = Dense(cfg, cfg.intermediate_size, rngs)

  def __call__(self, x, mask):
    x = self.attention(x, mask)
    return self.output(self.intermediate(x), x)


class Encoder(nnx.Module):
  def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
    self.layer = nnx.List([Layer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])


class BertModel(nnx.Module):
  """token ids int [B, L] + mask bool [B, L] (True = real token) -> last hidden state
  [B, L, hidden] in the parameters' dtype."""

  def __init__(self, cfg: BertConfig = MINILM_L6, rngs: nnx.Rngs | None = None):
    rngs = rngs or nnx.Rngs(0)
    self.cfg = cfg
    self.embeddings = Embeddings(cfg, rngs)
    self.encoder = Encoder(cfg, rngs)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"ids and mask must both be [B, L], got {ids.shape} and {mask.shape}")
    if ids.shape[1] > self.cfg.max_position_embeddings:
      raise ValueError(f"{ids.shape[1]} tokens; the model has "
                       f"{self.cfg.max_position_embeddings} positions")
    x = self.embeddings(ids)
    keys = mask[:, None, None, :]   # padding keys are not attended to
    for layer in self.encoder.layer:
      x = layer(x, keys)
    return x


def mean_pooled(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Sentence embeddings as sentence-transformers makes them for MiniLM: the mean of the real
  tokens' hidden states, L2-normalized. hidden [B, L, d], mask bool [B, L] -> f32 [B, d]."""
  m = mask[..., None].astype(jnp.float32)
  mean = (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
  return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
