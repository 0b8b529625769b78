"""FLUX rectified-flow sampling: latent packing, position ids, shifted schedule, Euler loop.

Latents are [B, 16, H/8, W/8] (AE space); the transformer sees them packed into 2x2 patches,
[B, (H/16)(W/16), 64], with position ids (0, row, col). Text tokens have zero ids.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from svdq_jax import qlinear
from svdq_jax.models import flux
from svdq_jax.parallel import tokens_over

AE_SHIFT, AE_SCALE = 0.1159, 0.3611  # z = (z - shift) * scale between AE and transformer


def pack_latents(z: jax.Array) -> jax.Array:
  """[B, C, H, W] -> [B, (H/2)(W/2), C*4], each token a 2x2 patch (c, ph, pw order)."""
  b, c, h, w = z.shape
  if h % 2 or w % 2:
    raise ValueError(f"latent height and width must be even, got {h}x{w}")
  z = z.reshape(b, c, h // 2, 2, w // 2, 2)
  return z.transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: jax.Array, height: int, width: int) -> jax.Array:
  """Inverse of pack_latents for latents of height x width: -> [B, C, height, width]."""
  b, _, d = x.shape
  c = d // 4
  x = x.reshape(b, height // 2, width // 2, c, 2, 2)
  return x.transpose(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(height: int, width: int) -> jax.Array:
  """Position ids [(height/2)(width/2), 3] = (0, row, col) of the packed latent tokens."""
  rows, cols = jnp.meshgrid(jnp.arange(height // 2), jnp.arange(width // 2), indexing="ij")
  return jnp.stack([jnp.zeros_like(rows), rows, cols], -1).reshape(-1, 3).astype(jnp.float32)


def initial_noise(seed: int, batch: int, height: int, width: int, channels: int = 16
                  ) -> jax.Array:
  """Gaussian latents [batch, channels, 2*ceil(height/16), 2*ceil(width/16)] for an image of
  height x width pixels (FLUX's VAE: 8 pixels per latent), determined by ``seed``."""
  shape = (batch, channels, 2 * math.ceil(height / 16), 2 * math.ceil(width / 16))
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def time_shift(mu: float, t: np.ndarray) -> np.ndarray:
  """t' = e^mu / (e^mu + (1/t - 1)); t = 0 stays 0."""
  with np.errstate(divide="ignore"):
    return np.where(t > 0, math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0)), 0.0)


def schedule(num_steps: int, image_seq_len: int, *, shift: bool = True,
             base_shift: float = 0.5, max_shift: float = 1.15) -> np.ndarray:
  """f32 [num_steps + 1] sigmas from 1 to 0; dev shifts them by a mu linear in the image
  token count, from (256 tokens, base_shift) to (4096 tokens, max_shift); schnell does not."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  t = np.linspace(1.0, 0.0, num_steps + 1)
  if shift:
    slope = (max_shift - base_shift) / (4096 - 256)
    t = time_shift(base_shift + slope * (image_seq_len - 256), t)
  return t.astype(np.float32)


# The model goes in as a JAX pytree (NNX modules are ones), not as nnx.split's (graph, state):
# jit flattens it in C++, while nnx.split walks the graph in Python at every call (FLUX.1-dev
# in bf16 on an H200's host: ~30 ms a sample() call, ~1 ms a step of a 28-step loop).
@functools.partial(jax.jit, static_argnames=("progress", "token_mesh", "attention",
                                              "kernels", "hoist_weights", "hoist_modulation"))
def _euler(model, img, img_ids, txt, txt_ids, y, sigmas, guidance, progress=False,
           token_mesh=None, attention=None, kernels=None, hoist_weights=False,
           hoist_modulation=False):
  # read by the model and its quantized layers at trace time; static so a change retraces
  del attention, kernels
  # weight-only work done once, before the loop: the small operands always, the int8
  # weight values with hoist_weights
  graph, state = nnx.split(model)
  model = nnx.merge(graph, qlinear.prepare(state, expand=hoist_weights))
  batch, steps = img.shape[0], sigmas.shape[0] - 1
  ts = jnp.broadcast_to(sigmas[:-1, None], (steps, batch)).astype(img.dtype)
  if hoist_modulation:  # every step's modulations [steps, B, 1, hidden] from one pass
    g = None if guidance is None else jnp.broadcast_to(guidance, (steps, batch))
    vec = model.conditioning(ts, jnp.broadcast_to(y, (steps, *y.shape)), g,
                             jax.eval_shape(model.img_in, img).dtype)  # as the model's own
    leaves, tree = jax.tree.flatten(model.modulations(vec))
    # one [steps, arrays, B, 1, hidden] array: a step takes its modulations in one slice, not
    # one per array (FLUX.1-dev: 342 small copies a step, 0.26 ms on an H200)
    mods = jnp.stack(leaves, axis=1)

  def step(i, x):
    t, t_next = sigmas[i], sigmas[i + 1]
    v = model(x, img_ids, txt, txt_ids, ts[i], y, guidance,
              mods=jax.tree.unflatten(tree, list(mods[i])) if hoist_modulation else None)
    if progress:
      jax.debug.callback(_tick, i)
    return x + (t_next - t).astype(x.dtype) * v

  # sequence parallel: quantized layers traced here split their tokens over the mesh
  with tokens_over(token_mesh) if token_mesh is not None else contextlib.nullcontext():
    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, img)


# The progress bar lives at module level: a jitted callback cannot close over a new bar per
# call (the traced function, and what it closes over, is cached).
_bar = None


def _tick(i):
  if _bar is not None:
    _bar.update(1)


@jax.jit   # the model as a pytree, as in _euler: no graph walk per call
def _velocity(model, x, img_ids, txt, txt_ids, t, y, guidance):
  return model(x, img_ids, txt, txt_ids, t, y, guidance)


def trajectory_inputs(model: nnx.Module, noise: jax.Array, txt: jax.Array, txt_ids: jax.Array,
                      y: jax.Array, sigmas, guidance: float | None = None) -> list[tuple]:
  """The transformer's inputs at every step of the Euler loop that ``sample`` runs (same
  arguments), for calibrating on real denoising trajectories: one tuple ``(img [B, L, 4C],
  img_ids, txt, txt_ids, t [B], y, guidance [B] or None)`` per step, in ``model``'s call
  order."""
  b, _, h, w = noise.shape
  g = None if guidance is None else jnp.full((b,), guidance, jnp.float32)
  x, ids = pack_latents(noise), image_ids(h, w)
  steps = []
  for i in range(len(sigmas) - 1):
    t = jnp.full((b,), sigmas[i], x.dtype)
    steps.append((x, ids, txt, txt_ids, t, y, g))
    v = _velocity(model, x, ids, txt, txt_ids, t, y, g)
    x = x + jnp.asarray(sigmas[i + 1] - sigmas[i], x.dtype) * v
  return steps


def _put(mesh, a, *spec):
  """``a`` (None passes) placed on ``mesh`` with PartitionSpec(*spec); () replicates."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  return None if a is None else jax.device_put(a, NamedSharding(mesh, P(*spec)))


def _data_parallel(mesh, img, txt, y, g, model):
  """Batch inputs padded to a multiple of the mesh's devices and split over them (every mesh
  axis shards the batch); ``model``'s arrays replicated (a copy of the module)."""
  pad = -img.shape[0] % mesh.devices.size

  def split(a):
    if a is not None and pad:
      a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)])
    return _put(mesh, a, mesh.axis_names)

  return (split(img), split(txt), split(y), split(g),
          jax.tree_util.tree_map(lambda a: _put(mesh, a), model))


def _sequence_parallel(mesh, img, img_ids, txt, y, g, model):
  """Image tokens (and their positions) split over the mesh's devices; the rest replicated."""
  n, length = mesh.devices.size, img.shape[1]
  if length % n:
    raise ValueError(f"sequence parallel needs the image token count ({length}) to be a "
                     f"multiple of the mesh's {n} devices")
  axes = mesh.axis_names
  return (_put(mesh, img, None, axes), _put(mesh, img_ids, axes), _put(mesh, txt),
          _put(mesh, y), _put(mesh, g), jax.tree_util.tree_map(lambda a: _put(mesh, a), model))


def sample(model: nnx.Module, noise: jax.Array, txt: jax.Array, txt_ids: jax.Array,
           y: jax.Array, sigmas, guidance: float | None = None, progress: bool = False,
           mesh: jax.sharding.Mesh | None = None, parallel: str = "data",
           hoist_weights: bool = False, hoist_modulation: bool = True) -> jax.Array:
  """Euler integration of the flow from noise (sigma 1) to a clean latent (sigma 0).

  Args:
    model: ``models.flux.Flux`` (float or quantized parameters).
    noise: [B, 16, h, w] Gaussian latents (h, w = image size / 8).
    txt, txt_ids, y: text conditioning (T5 embeddings [B, L, 4096], zeros [L, 3], CLIP
      pooled [B, 768]).
    sigmas: [steps + 1] from ``schedule``.
    guidance: guidance scale for dev models (distilled: one pass, no CFG); None for schnell.
    progress: show a progress bar over steps.
    mesh: data parallel over this mesh's devices (all its axes; axis type Auto, e.g.
      ``jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))``): the
      batch is padded to a multiple of the device count and split over them, the (quantized)
      weights replicated; one jitted program, XLA's SPMD partitioner does the rest. Each
      image is the one the same noise gives on one device.
    parallel: with a mesh, 'data' (above) or 'sequence': every image's tokens split over the
      devices (for one large image), weights replicated, quantized layers run per device on
      their tokens (``svdq_jax.parallel``), attention gathers keys/values through XLA. The
      image token count must divide by the device count.
    hoist_weights: on the Hopper kernels, expand the quantized layers' 4-bit weights to the
      int8 GEMM's operand once before the loop instead of at every step (``qlinear.prepare``;
      same results). N * K bytes per layer while the loop runs: FLUX.1-dev W4A8 +8.6 GB over
      its 6.4 GB of weights, for a 4% faster loop (H200, 2026-12-03, before the W4A8 GEMM
      expanded the weights itself). Without it the layers' small weight-side operands are
      still computed once before the loop (``qlinear.prepare(expand=False)``: 0.29 GB for
      FLUX.1-dev, its 28-step W4A8 loop 2.658 -> 2.614 s on an H200, 2026-12-04).
    hoist_modulation: compute every step's modulations (shifts, scales, gates: linears of
      the timestep, guidance and pooled-text embedding only) before the loop, as one batch
      of ``steps`` rows per image (``Flux.modulations``), instead of one row per step: their
      weights (FLUX.1-dev: 3.2 G parameters, 1.6 GB at W4A16, 6.5 GB in bf16) read once per
      loop, not per step. The same values up to the matmuls' f32 summation order (on the
      CPU bit for bit for the tests' models; the demo model's latents move by ~1e-6).
      Default on: H200, FLUX.1-dev 1024x1024, 28 steps, W4A8 2.806 -> 2.771 s and bf16
      3.694 -> 3.678 s (2026-12-04, docs/benchmarks); the modulations
      held while the loop runs take ~2 MB per step and image (FLUX.1-dev).

  Returns:
    [B, 16, h, w] latents (unpacked, in transformer space; see AE_SHIFT / AE_SCALE).
  """
  global _bar
  b, c, h, w = noise.shape
  if 4 * c != model.cfg.in_channels:
    raise ValueError(f"noise has {c} latent channels; the model takes {model.cfg.in_channels}"
                     f" features per token = 4 x {model.cfg.in_channels // 4} channels")
  g = None if guidance is None else jnp.full((b,), guidance, jnp.float32)
  img = pack_latents(noise)
  img_ids = image_ids(h, w)
  if parallel not in ("data", "sequence"):
    raise ValueError(f"parallel must be 'data' or 'sequence', got {parallel!r}")
  if mesh is not None and parallel == "data":
    img, txt, y, g, model = _data_parallel(mesh, img, txt, y, g, model)
  elif mesh is not None:
    img, img_ids, txt, y, g, model = _sequence_parallel(mesh, img, img_ids, txt, y, g, model)
  _bar = tqdm(total=len(sigmas) - 1, desc="sampling") if progress else None
  try:
    x = _euler(model, img, img_ids, txt, txt_ids, y,
               jnp.asarray(sigmas, jnp.float32), g, progress=progress,
               token_mesh=mesh if parallel == "sequence" else None,
               attention=flux.attention_settings(),
               kernels=qlinear.trace_settings(), hoist_weights=bool(hoist_weights),
               hoist_modulation=bool(hoist_modulation))[:b]
    x = jax.block_until_ready(x)
    jax.effects_barrier()
  finally:
    if _bar is not None:
      _bar.close()
    _bar = None
  return unpack_latents(x, h, w)
