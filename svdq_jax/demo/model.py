"""The demo's text-to-image model: a tiny text encoder and a small FLUX.1 transformer.

The transformer is ``svdq_jax.models.flux.Flux`` with the FLUX.1-schnell block structure
(double-stream then single-stream blocks, no guidance embedding), sized down. It works in
pixel space: a 32x32 RGB image packed in 2x2 patches is 256 tokens of 12 features, so no
autoencoder is needed. The text encoder (word embeddings, learned positions, two pre-norm
transformer layers) plays T5 (token states) and CLIP (pooled vector) at once.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import flax as st_flax
from safetensors import safe_open

from svdq_jax.demo import shapes
from svdq_jax.models.flux import Flux, FluxConfig

TEXT_DIM = 128
DEMO_FLUX = FluxConfig(in_channels=12, out_channels=12, vec_in_dim=TEXT_DIM,
                       context_in_dim=TEXT_DIM, hidden_size=192, mlp_ratio=4.0, num_heads=3,
                       depth=2, depth_single_blocks=4, axes_dim=(16, 24, 24),
                       guidance_embed=False)
WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "demo_flux.safetensors")


class EncoderLayer(nnx.Module):
  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.fc2 = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.norm1(x), mask=mask)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class TextEncoder(nnx.Module):
  """Token ids [B, L] -> (token states f32 [B, L, dim], pooled f32 [B, dim])."""

  def __init__(self, dim: int = TEXT_DIM, layers: int = 2, heads: int = 4, *,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(len(shapes.VOCAB), dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (shapes.MAX_TOKENS, dim)))
    self.layers = nnx.List([EncoderLayer(dim, heads, rngs) for _ in range(layers)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)

  def __call__(self, ids):
    valid = ids != 0
    x = self.embed(ids) + self.pos[...][None, :ids.shape[1]]
    mask = nnx.make_attention_mask(valid, valid, dtype=bool) | jnp.eye(ids.shape[1], dtype=bool)
    for layer in self.layers:
      x = layer(x, mask)
    x = self.norm(x)
    w = valid[..., None].astype(x.dtype)
    return x, (x * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


class DemoModel(nnx.Module):
  """The pair that makes images from captions; ``flux`` is what gets quantized."""

  def __init__(self, cfg: FluxConfig = DEMO_FLUX, seed: int = 0):
    rngs = nnx.Rngs(seed)
    self.text = TextEncoder(cfg.context_in_dim, rngs=rngs)
    self.flux = Flux(cfg, rngs)

  def encode(self, prompts: list[str]) -> tuple[jax.Array, jax.Array]:
    """Prompts -> (txt f32 [B, MAX_TOKENS, TEXT_DIM], pooled y f32 [B, TEXT_DIM])."""
    return self.text(jnp.asarray(shapes.tokenize(prompts)))


def _key(prefix: str, path) -> str:
  """File key of a parameter: prefix + its tree path joined by dots."""
  return prefix + ".".join(str(getattr(k, "key", k)) for k in path)


def _flat(module: nnx.Module, prefix: str) -> dict[str, jax.Array]:
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(module, nnx.Param)))[0]
  return {_key(prefix, path): leaf for path, leaf in flat}


def save(model: DemoModel, path: str, dtype=jnp.bfloat16) -> None:
  """Writes both modules' parameters (as ``dtype``) and the FLUX config to one
  safetensors file, atomically (temporary sibling, then rename)."""
  tensors = {k: jnp.asarray(v, dtype) for k, v in
             (_flat(model.text, "text.") | _flat(model.flux, "flux.")).items()}
  meta = {"flux_config": json.dumps(dataclasses.asdict(model.flux.cfg))}
  tmp = path + ".tmp"
  st_flax.save_file(tensors, tmp, metadata=meta)
  os.replace(tmp, path)


def load(path: str = WEIGHTS, dtype=jnp.bfloat16) -> DemoModel:
  """Reads a file written by ``save`` into a new DemoModel with ``dtype`` parameters.

  Raises FileNotFoundError, or ValueError naming missing/unexpected tensors or a shape
  mismatch.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"demo weights not found: {path}")
  try:
    with safe_open(path, framework="flax") as f:
      meta = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own error types for corrupt headers
    raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
  if "flux_config" not in meta:
    raise ValueError(f"{path} has no 'flux_config' metadata: not written by demo.model.save")
  cfg = json.loads(meta["flux_config"])
  cfg = FluxConfig(**(cfg | {"axes_dim": tuple(cfg["axes_dim"])}))
  model = nnx.eval_shape(lambda: DemoModel(cfg))
  expected = _flat(model.text, "text.") | _flat(model.flux, "flux.")
  missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
  if missing or unexpected:
    raise ValueError(f"{path}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
  for k, v in expected.items():
    if tuple(tensors[k].shape) != tuple(v.shape):
      raise ValueError(f"{path}: tensor {k} has shape {tuple(tensors[k].shape)}, expected "
                       f"{tuple(v.shape)}")
  for prefix, module in (("text.", model.text), ("flux.", model.flux)):
    state = nnx.state(module, nnx.Param)
    pure = nnx.to_pure_dict(state)
    pure = jax.tree_util.tree_map_with_path(
        lambda p, _: jnp.asarray(tensors[_key(prefix, p)], dtype), pure)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(module, state)
  return model
