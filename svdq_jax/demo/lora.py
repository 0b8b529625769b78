"""A style LoRA for the demo model: sepia-toned scenes, trained on the frozen transformer.

Rank-``rank`` factors on the attention and MLP linears (the layers SVDQuant quantizes),
A ~ N(0, 1/K), B = 0 (the LoRA starts as the identity), trained with the base model's
rectified-flow loss on the same procedural scenes drawn in sepia. Saved in BFL LoRA naming
(``double_blocks.0.img_attn.qkv.lora_A.weight`` [r, K], ``lora_B.weight`` [N, r]), which
``svdq_jax.lora.load_lora`` reads like any other LoRA file.
"""

from __future__ import annotations

import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from svdq_jax.demo import model as demo_model
from svdq_jax.demo import shapes
from svdq_jax.models import sampling
from svdq_jax.tree import find_kernels, replace_kernels

LORA = os.path.join(os.path.dirname(__file__), "weights", "demo_lora_sepia.safetensors")
TARGETS = re.compile(r".*/(img_attn/qkv|txt_attn/qkv|img_attn/proj|txt_attn/proj|"
                     r"img_mlp/fc[12]|txt_mlp/fc[12]|linear[12])")
SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]],
                 np.float32)


def sepia(images: jax.Array) -> jax.Array:
  """f32 [B, 3, H, W] in [-1, 1] -> the same scenes sepia-toned, in [-1, 1]."""
  rgb = (images + 1) / 2
  toned = jnp.einsum("oc,bchw->bohw", SEPIA, rgb)
  return jnp.clip(toned, 0, 1) * 2 - 1


def train_lora(out: str = LORA, *, steps: int = 300, rank: int = 8, batch: int = 32,
               lr: float = 2e-3, seed: int = 0, progress: bool = True) -> dict:
  """Trains the sepia LoRA on the built-in model and writes ``out`` (+ ``out``.json log)."""
  model = demo_model.load(demo_model.WEIGHTS, dtype=jnp.float32)
  graph, state = nnx.split(model.flux)
  targets = {p: k for p, k in find_kernels(state).items() if TARGETS.fullmatch(p)}
  key = jax.random.key(seed)
  factors = {p: (jax.random.normal(jax.random.fold_in(key, i), (k.shape[0], rank))
                 / np.sqrt(k.shape[0]), jnp.zeros((rank, k.shape[1])))
             for i, (p, k) in enumerate(sorted(targets.items()))}
  tx = optax.adam(lr)
  opt_state = tx.init(factors)
  img_ids = sampling.image_ids(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)

  def loss_fn(factors, ids, images, key):
    kernels = {p: targets[p] + a @ b for p, (a, b) in factors.items()}
    flux = nnx.merge(graph, replace_kernels(state, kernels))
    txt, y = model.text(ids)
    x0 = sampling.pack_latents(sepia(images))
    k_noise, k_t = jax.random.split(key)
    noise = jax.random.normal(k_noise, x0.shape)
    t = jax.nn.sigmoid(jax.random.normal(k_t, (x0.shape[0],)))
    xt = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
    v = flux(xt, img_ids, txt, jnp.zeros((ids.shape[1], 3)), t, y)
    return jnp.mean(jnp.square(v - (noise - x0)))

  @jax.jit
  def step(factors, opt_state, ids, draw_args, key):
    images = shapes.draw(*draw_args)
    loss, grads = jax.value_and_grad(loss_fn)(factors, ids, images, key)
    updates, opt_state = tx.update(grads, opt_state, factors)
    return optax.apply_updates(factors, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  log = {"steps": [], "loss": [], "seconds": [], "rank": rank, "batch": batch, "lr": lr,
         "device": str(jax.devices()[0].device_kind)}
  start, losses = time.time(), []
  for i in tqdm(range(steps), desc="training LoRA", disable=not progress):
    scenes = shapes.random_scenes(rng, batch)
    ids = shapes.tokenize(shapes.captions(scenes))
    factors, opt_state, loss = step(factors, opt_state, ids, shapes.draw_args(scenes),
                                    jax.random.fold_in(key, 10**6 + i))
    losses.append(loss)
    if (i + 1) % 50 == 0 or i + 1 == steps:
      log["steps"].append(i + 1)
      log["loss"].append(float(np.mean(jax.device_get(losses))))
      log["seconds"].append(round(time.time() - start, 1))
      losses = []
  save_lora(factors, model.flux.cfg, out)
  with open(out + ".json", "w") as f:
    json.dump(log, f, indent=1)
  return log


def save_lora(factors: dict, cfg, out: str) -> None:
  """Factors {path: (A [K, r], B [r, N])} as a BFL-named LoRA file (bf16), atomically."""
  from svdq_jax.convert.mapping import NAMINGS
  bfl = {dst: srcs[0] for dst, srcs, _ in NAMINGS["bfl"](cfg)[0]}
  tensors = {}
  for path, (a, b) in factors.items():
    import ml_dtypes
    tensors[f"{bfl[path]}.lora_A.weight"] = np.asarray(a, np.float32).T.astype(ml_dtypes.bfloat16)
    tensors[f"{bfl[path]}.lora_B.weight"] = np.asarray(b, np.float32).T.astype(ml_dtypes.bfloat16)
  tmp = out + ".tmp"
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp)
  os.replace(tmp, out)
