"""Calibration: run the user's forward pass and collect, per linear layer, what the
transforms need: the per-input-channel absmax over all tokens and a bounded uniform sample
of input tokens (for the output-error searches).

The model is not edited. Flax Linen ``nn.Dense`` calls are seen through
``flax.linen.intercept_methods``. Flax NNX has no method interception, so for NNX the
``__call__`` of the classes of the model's linear modules (any module holding a 2-D
``kernel`` Param: ``nnx.Linear``, ``svdq_jax.layers.Linear``, ...) is wrapped for the
duration of ``calibrate`` and each such module is tagged with its path (a static attribute,
so tags survive ``nnx.jit``); both are undone afterwards. Inputs reach the host through
``jax.debug.callback``, so the forward pass may be jitted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from tqdm.auto import tqdm

from svdq_jax.layers import dense_input
from svdq_jax.qlinear import join


@dataclasses.dataclass
class LayerStats:
  """Calibration statistics of one linear layer's input.

  absmax: f32 [K], max |x_j| over every calibration token.
  samples: f32 [S, K], S <= max_samples tokens drawn uniformly without replacement.
  num_tokens: tokens seen.
  hessian: f32 [K, K] X^T X summed over every token (``calibrate(..., hessian=True)``; what
    GPTQ residuals need), or None. A numpy array, or a jax.Array on the device that ran the
    layer when the forward pass was not jitted.
  """

  absmax: np.ndarray
  samples: np.ndarray
  num_tokens: int
  hessian: np.ndarray | jax.Array | None = None

  @classmethod
  def from_inputs(cls, x, max_samples: int | None = None, seed: int = 0,
                  hessian: bool = False) -> "LayerStats":
    """Statistics of inputs x [..., K] given directly (no forward pass).

    Raises ValueError if x holds NaN or Inf (as ``calibrate`` does)."""
    acc = _Accumulator(max_samples or int(np.prod(np.shape(x)[:-1])), seed, hessian)
    acc.add(np.asarray(x))
    if acc.nonfinite:
      raise ValueError("calibration inputs contain NaN or Inf")
    return acc.stats()

  def validate(self, name: str, k: int) -> None:
    """Raises ValueError naming the layer if the stats do not fit K or are not finite."""
    if self.absmax.shape != (k,) or self.samples.ndim != 2 or self.samples.shape[1] != k:
      raise ValueError(
          f"layer {name}: calibration statistics have absmax {self.absmax.shape} and "
          f"samples {self.samples.shape}, but the layer's input has K={k} channels")
    if not (np.isfinite(self.absmax).all() and np.isfinite(self.samples).all()):
      raise ValueError(f"layer {name}: calibration statistics contain NaN or Inf")
    if self.samples.shape[0] == 0:
      raise ValueError(f"layer {name}: calibration statistics hold no tokens")
    if self.hessian is not None and self.hessian.shape != (k, k):
      raise ValueError(f"layer {name}: calibration Hessian is {self.hessian.shape}, the "
                       f"layer's input has K={k} channels")


@functools.partial(jax.jit, donate_argnums=0)
def _add_xtx(h: jax.Array, x: jax.Array) -> jax.Array:
  """h f32 [K, K] + x^T x for x [..., K] (bf16 or f32): products exact, sums in f32."""
  x = x.reshape(-1, x.shape[-1])
  return h + jnp.einsum("tk,tn->kn", x, x, preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST)


class _Accumulator:
  """Running absmax and a uniform reservoir sample (keep the rows with the largest random
  keys) of one layer's input tokens, and optionally X^T X over all of them: on the host in
  f64 from ``add``, or on the input's device in f32 from ``add_device_hessian`` (no host
  copy, no host matmul: what FLUX-sized layers need). Memory: max_samples x K f32 on the
  host (+ K x K with the Hessian)."""

  def __init__(self, max_samples: int, seed: int, hessian: bool = False):
    self.max_samples = max_samples
    self.seed = seed
    self.hessian = None
    self.with_hessian = hessian
    self.calls = 0
    self.num_tokens = 0
    self.absmax = None
    self.samples = None
    self.keys = None
    self.nonfinite = False

  def add_device_hessian(self, x: jax.Array) -> None:
    """X^T X of a concrete (eager) input, accumulated where x lives."""
    if self.hessian is None:
      self.hessian = jnp.zeros((x.shape[-1],) * 2, jnp.float32, device=x.sharding)
    self.hessian = _add_xtx(self.hessian, x)

  def add_host_hessian(self, x: np.ndarray) -> None:
    """X^T X of x [..., K] on the host, in f64 (sums of many tokens)."""
    x = np.asarray(x, np.float32).reshape(-1, np.shape(x)[-1])
    xtx = x.T.astype(np.float64) @ x.astype(np.float64)
    self.hessian = xtx if self.hessian is None else self.hessian + xtx

  def add(self, x: np.ndarray, hessian: bool = True) -> None:
    """Absmax and samples of x [..., K]; and X^T X on the host when this accumulator keeps
    a Hessian and ``hessian`` (False: ``add_device_hessian`` takes it)."""
    x = np.asarray(x, np.float32).reshape(-1, np.shape(x)[-1])
    if not np.isfinite(x).all():
      self.nonfinite = True
      return
    # Seeded by call count only, so layers fed the same inputs keep the same samples
    # (``quantize`` uses that to find layers sharing an input).
    rng = np.random.default_rng([self.seed, self.calls])
    self.calls += 1
    self.num_tokens += x.shape[0]
    if self.with_hessian and hessian:
      self.add_host_hessian(x)
    amax = np.abs(x).max(axis=0)
    self.absmax = amax if self.absmax is None else np.maximum(self.absmax, amax)
    keys = rng.random(x.shape[0])
    if self.samples is not None:
      x = np.concatenate([self.samples, x])
      keys = np.concatenate([self.keys, keys])
    if x.shape[0] > self.max_samples:
      keep = np.sort(np.argpartition(-keys, self.max_samples - 1)[:self.max_samples])
      x, keys = x[keep], keys[keep]
    self.samples, self.keys = x, keys

  def stats(self) -> LayerStats:
    return LayerStats(self.absmax, self.samples, self.num_tokens,
                      None if self.hessian is None else self.hessian.astype(np.float32))


_NNX_TAG = "_svdq_calibration_path"


def is_nnx_linear(node) -> bool:
  """An NNX module holding a 2-D ``kernel`` parameter (nnx.Linear and look-alikes)."""
  kernel = getattr(node, "kernel", None)
  return (isinstance(node, nnx.Module) and isinstance(kernel, nnx.Param)
          and getattr(kernel.get_value(), "ndim", 0) == 2)


@contextlib.contextmanager
def _intercept_nnx(model, record):
  """Tags the model's linear modules with their paths and wraps their classes' __call__.

  The first positional argument of the call is recorded as the layer's input. A wrapped
  subclass calling a wrapped base ``__call__`` records once.
  """
  tagged, classes = [], {}
  if model is not None:
    for path, node in nnx.iter_graph(model):
      if is_nnx_linear(node):
        setattr(node, _NNX_TAG, "/".join(str(p) for p in path))
        tagged.append(node)
        for cls in type(node).__mro__:
          if "__call__" in vars(cls) and cls not in classes:
            classes[cls] = vars(cls)["__call__"]
  active: set[int] = set()

  def wrap(original):
    def call(self, x, *args, **kwargs):
      path = getattr(self, _NNX_TAG, None)
      if path is None or id(self) in active:
        return original(self, x, *args, **kwargs)
      record(path, join(x))   # an input given as parts (qlinear.Gelu) as the layer sees it
      active.add(id(self))
      try:
        return original(self, x, *args, **kwargs)
      finally:
        active.discard(id(self))
    return call

  for cls, original in classes.items():
    setattr(cls, "__call__", wrap(original))
  try:
    yield
  finally:
    for cls, original in classes.items():
      setattr(cls, "__call__", original)
    for node in tagged:
      delattr(node, _NNX_TAG)


def _linen_interceptor(record):
  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      path = "/".join(context.module.path)
      record(path, dense_input(path, args, kwargs))
    return next_fun(*args, **kwargs)
  return interceptor


# The running calibration's host-side recorder: traced callbacks look it up when they run,
# so a jitted forward traced by an earlier calibration records into this one.
_on_host: list[Callable] = []


def _host_record(path: str, traced: bool, x) -> None:
  if _on_host:
    _on_host[-1](path, x, traced)


def to_host(path: str, x) -> None:
  """Hands x (concrete, or traced: when the compiled call runs) to the running
  calibration's host recorder, ``on_host(path, x, traced)``."""
  traced = isinstance(x, jax.core.Tracer)
  jax.debug.callback(functools.partial(_host_record, path, traced), x)


def _watch(forward, batches, model, record, on_host, accumulators, progress, desc) -> None:
  """``forward(batch)`` for every batch with ``record(path, x)`` called on each watched
  linear layer's input as the forward pass is traced or run, and ``on_host(path, x,
  traced)`` on what ``to_host`` sends; a NaN or Inf an accumulator saw stops it, naming
  the layers. A ``jax.jit`` forward's compiled calls are dropped before and after: one traced
  before would record nothing, one traced here would keep recording. Every traced layer
  input goes to the host (whatever this recorder keeps), so that a trace made here serves
  any later calibration unchanged."""
  clear = getattr(forward, "clear_cache", lambda: None)
  clear()
  seen = set()

  def watched(path, x):
    seen.add(path)
    record(path, x)

  def watched_on_host(path, x, traced):
    seen.add(path)
    on_host(path, x, traced)

  _on_host.append(watched_on_host)
  try:
    count = _run(forward, batches, model, watched, accumulators, progress, desc)
  finally:
    _on_host.pop()
    clear()
  if not count:
    raise ValueError("calibration got no batches: the batches iterable is empty (or an "
                     "iterator already used up)")
  if not seen:
    raise ValueError("calibration saw no linear layer call: is forward running the model "
                     "(for NNX, was the model passed as model=)? A jitted function inside "
                     "forward that was traced before calibration keeps its uninstrumented "
                     "trace: pass the jax.jit function itself, or an un-jitted forward")


def _run(forward, batches, model, record, accumulators, progress, desc) -> int:
  """Runs the forward on every batch; returns how many there were."""
  count = 0
  with nn.intercept_methods(_linen_interceptor(record)), _intercept_nnx(model, record):
    for i, batch in enumerate(tqdm(batches, desc=desc, disable=not progress)):
      count += 1
      try:
        jax.block_until_ready(forward(batch))
      except ValueError as e:   # Flax's words for a callback in a linen.scan body
        if "data dependency on the scan body" not in str(e):
          raise
        raise ValueError(
            "calibrate cannot watch linear layers inside flax.linen.scan: the scan's body "
            "may not call the callbacks that record their inputs (and svdq_jax.quantize "
            "takes 2-D kernels, not a scan's stacked ones); calibrate and quantize a model "
            "whose layers are not scanned") from e
      jax.effects_barrier()
      bad = sorted(p for p, a in accumulators.items() if a.nonfinite)
      if bad:
        raise ValueError(f"calibration batch {i}: NaN or Inf in the input of layers {bad}")
  return count


def calibrate(forward: Callable, batches: Iterable, *, model: nnx.Module | None = None,
              max_samples: int = 256, seed: int = 0, progress: bool = True,
              hessian: bool = False) -> dict[str, LayerStats]:
  """Runs ``forward(batch)`` for every batch and collects each linear layer's input stats.

  Args:
    forward: calls the model on one batch (may be jitted). Linen ``nn.Dense`` layers are
      seen inside any ``module.apply``; for NNX, the linear modules of ``model``. A
      ``jax.jit`` forward has its compiled calls dropped before and after, so that it is
      traced with the recording in it and runs without it later.
    batches: iterable of whatever ``forward`` takes.
    model: the NNX model whose linear modules to watch (not needed for Linen).
    max_samples: tokens kept per layer for the output-error searches (memory is
      max_samples x K x 4 bytes per layer).
    seed: seed of the token sampling.
    progress: show a progress bar.
    hessian: also sum X^T X over every token (f32 [K, K] per layer), for
      ``QuantConfig(residual='gptq')``. When ``forward`` is not jitted, each layer's sum is
      kept on the device its input is on, in f32 (bf16 inputs: exact products), and no
      input goes through a host matmul: the way for FLUX-sized models (FLUX.1-dev: about
      67 GB of Hessians over its 304 linears; they fit an H200 beside the model). Under
      ``jax.jit`` the inputs reach the host and are summed there in f64 (fine for small
      models, hours of host matmuls for FLUX). GPTQ fitted to a few hundred sampled
      tokens overfits them when they are fewer than K (measured: docs/example).

  Returns:
    {module path: LayerStats}, paths as in ``svdq_jax.quantize`` (e.g. "blocks/0/attn/q").

  Raises:
    ValueError: if a layer's input holds NaN or Inf (naming the layers and the batch), or
      if no linear layer was called.
  """
  if max_samples < 1:
    raise ValueError(f"max_samples must be >= 1, got {max_samples}")
  accumulators: dict[str, _Accumulator] = {}

  def accumulator(path):
    return accumulators.setdefault(path, _Accumulator(max_samples, seed, hessian))

  def record(path, x):   # as the forward pass is traced, or run eagerly
    if hessian and not isinstance(x, jax.core.Tracer):   # X^T X where x is
      accumulator(path).add_device_hessian(x)
    to_host(path, x)

  def on_host(path, x, traced):
    accumulator(path).add(x, hessian=hessian and traced)

  _watch(forward, batches, model, record, on_host, accumulators, progress, "calibrating")
  return {p: a.stats() for p, a in accumulators.items()}


def input_hessians(forward: Callable, batches: Iterable, paths, *,
                   model: nnx.Module | None = None, progress: bool = True) -> dict:
  """X^T X, f32 [K, K], of the inputs of the linear layers at ``paths`` over every token of
  ``batches``: the Hessians ``calibrate(..., hessian=True)`` adds to its stats, the same
  sums, for these layers alone and nothing else kept, so that a model's Hessians can be
  summed a few layers at a time (``svdq_jax.calibrate_and_quantize``). As in ``calibrate``:
  on the input's device for an eager forward, on the host in f64 under jit.

  Returns {path: Hessian} (jax.Array or np.ndarray). Raises ValueError for a path no
  batch's forward pass reached, or a layer whose inputs held NaN or Inf."""
  paths = set(paths)
  accumulators: dict[str, _Accumulator] = {}

  def accumulator(path):
    return accumulators.setdefault(path, _Accumulator(1, 0, hessian=True))

  def record(path, x):
    if isinstance(x, jax.core.Tracer):
      to_host(path, x)   # every layer: the trace may serve a later calibration
    elif path in paths:
      accumulator(path).add_device_hessian(x)

  def on_host(path, x, traced):
    if traced and path in paths:
      accumulator(path).add_host_hessian(x)

  _watch(forward, batches, model, record, on_host, accumulators, progress, "input Hessians")
  missing = sorted(paths - set(accumulators))
  if missing:
    raise ValueError(f"the forward pass never called the layers {missing}")
  out = {p: a.hessian.astype(np.float32) for p, a in accumulators.items()}
  bad = sorted(p for p, h in out.items() if not bool(jnp.isfinite(h).all()))
  if bad:
    raise ValueError(f"NaN or Inf in the input of layers {bad}")
  return out
