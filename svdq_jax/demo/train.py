"""Trains the demo model with rectified flow on freshly drawn scenes (optax AdamW, EMA).

Every step draws a new batch: scenes and captions on the host (numpy), images on the device
inside the jitted step. The loss is FLUX's: x_t = t * noise + (1 - t) * x_0 with t from a
logit-normal distribution, the transformer predicts the velocity noise - x_0, mean squared
error. The saved weights are the exponential moving average of the parameters, in bf16.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from svdq_jax.demo import model as demo_model
from svdq_jax.demo import shapes
from svdq_jax.models import sampling


def loss_fn(params, graph, rest, ids, images, key):
  """Rectified-flow loss of one batch: ids int [B, L], images f32 [B, 3, 32, 32]."""
  model = nnx.merge(graph, params, rest)
  txt, y = model.text(ids)
  x0 = sampling.pack_latents(images)
  k_noise, k_t = jax.random.split(key)
  noise = jax.random.normal(k_noise, x0.shape)
  t = jax.nn.sigmoid(jax.random.normal(k_t, (x0.shape[0],)))
  xt = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
  img_ids = sampling.image_ids(shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
  v = model.flux(xt, img_ids, txt, jnp.zeros((ids.shape[1], 3)), t, y)
  return jnp.mean(jnp.square(v - (noise - x0)))


def train(out: str, *, steps: int = 20_000, batch: int = 128, lr: float = 3e-4,
          warmup: int = 500, ema_decay: float = 0.999, seed: int = 0,
          max_minutes: float | None = None, log_every: int = 100, progress: bool = True,
          cfg=demo_model.DEMO_FLUX) -> dict:
  """Trains from scratch and writes ``out`` (safetensors, EMA weights) and ``out``.json (loss
  log). Stops after ``steps`` or ``max_minutes``, whichever comes first; the log records the
  steps done, so rerunning with that ``steps`` and no time limit reproduces the weights on
  the same device. Returns the log."""
  model = demo_model.DemoModel(cfg, seed=seed)
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(optax.linear_schedule(0.0, lr, warmup), weight_decay=0.01)
  opt_state = tx.init(params)
  ema = params

  @jax.jit
  def step(params, opt_state, ema, ids, draw_args, key):
    images = shapes.draw(*draw_args)
    loss, grads = jax.value_and_grad(loss_fn)(params, graph, rest, ids, images, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    return params, opt_state, ema, loss

  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  log = {"steps": [], "loss": [], "seconds": [], "batch": batch, "lr": lr, "warmup": warmup,
         "ema_decay": ema_decay, "seed": seed, "device": str(jax.devices()[0].device_kind)}
  start, losses = time.time(), []
  bar = tqdm(range(steps), desc="training", disable=not progress)
  for i in bar:
    scenes = shapes.random_scenes(rng, batch)
    ids = shapes.tokenize(shapes.captions(scenes))
    params, opt_state, ema, loss = step(params, opt_state, ema, ids, shapes.draw_args(scenes),
                                        jax.random.fold_in(key, i))
    losses.append(loss)
    if (i + 1) % log_every == 0 or i + 1 == steps:
      mean = float(np.mean(jax.device_get(losses)))
      if not np.isfinite(mean):
        raise FloatingPointError(f"training diverged: loss {mean} at step {i + 1}")
      log["steps"].append(i + 1)
      log["loss"].append(mean)
      log["seconds"].append(round(time.time() - start, 1))
      bar.set_postfix(loss=f"{mean:.4f}")
      losses = []
      if max_minutes is not None and time.time() - start > 60 * max_minutes:
        break
  bar.close()
  log["steps_done"] = log["steps"][-1]
  nnx.update(model, ema)
  demo_model.save(model, out)
  with open(out + ".json", "w") as f:
    json.dump(log, f, indent=1)
  return log
