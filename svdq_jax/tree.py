"""``quantize``: the functional transform over a Flax parameter tree.

Works on any pytree whose linear layers hold a 2-D ``kernel`` [K, N] leaf: a plain nested
dict of Linen params and an ``nnx.State`` alike. Each selected kernel is replaced by a
``QuantizedLinear`` (bias left where it is); every other leaf passes through untouched and
the tree keeps its type and structure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from svdq_jax import formats, layers
from svdq_jax.calibrate import LayerStats, calibrate, input_hessians, is_nnx_linear
from svdq_jax.config import QuantConfig, Rule
from svdq_jax.qlinear import QuantizedLinear
from svdq_jax.transforms import LayerReport, quantize_group


def _key_name(key) -> str | None:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return None if key.name in ("value", "raw_value") else key.name  # nnx.Variable
  return str(getattr(key, "key", key))


def module_path(key_path) -> tuple[str, str]:
  """A leaf's key path -> (module path, leaf name), dropping a leading 'params'."""
  names = [n for n in (_key_name(k) for k in key_path) if n is not None]
  if names and names[0] == "params":
    names = names[1:]
  return "/".join(names[:-1]), names[-1] if names else ""


def _is_quantized(node) -> bool:
  return isinstance(node, QuantizedLinear)


def find_kernels(params, quantized: bool = False) -> dict[str, jax.Array]:
  """{module path: kernel [K, N]} for every 2-D leaf named 'kernel'; with ``quantized``, the
  kernels that are QuantizedLinear too."""
  found = {}
  leaves = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=_is_quantized if quantized else None)[0]
  for key_path, leaf in leaves:
    path, name = module_path(key_path)
    if name == "kernel" and (np.ndim(leaf) == 2 or _is_quantized(leaf)):
      found[path] = leaf
  return found


def replace_kernels(params, new: Mapping[str, object]):
  """``params`` (same type and structure) with the kernels at the module paths of ``new``
  replaced by its values (arrays or QuantizedLinear); every other leaf untouched."""
  def swap(key_path, leaf):
    path, name = module_path(key_path)
    return new.get(path, leaf) if name == "kernel" else leaf

  return jax.tree_util.tree_map_with_path(swap, params, is_leaf=_is_quantized)


@dataclasses.dataclass
class _Job:
  paths: list[str]
  rule: Rule


def _fingerprint(stats: LayerStats) -> str:
  h = hashlib.sha1(stats.absmax.tobytes())
  h.update(stats.samples.tobytes())
  return h.hexdigest()


def _label(path: str) -> str:
  """A layer's name in errors: its module path ('(root)' for a bare linear's kernel, whose
  path is empty)."""
  return path or "(root)"


def _plan(kernels: dict[str, jax.Array], calib: Mapping[str, LayerStats] | None,
          config: QuantConfig) -> list[_Job]:
  """Assigns rules to layers, validates, and groups layers that share an input."""
  selected: dict[str, Rule] = {}
  hits = {r: 0 for r in config.rules}
  for path in kernels:
    rule = config.rule_for(path)
    if rule is not None:
      hits[rule] += 1
      if rule.method != "skip":
        selected[path] = rule
  empty = [r.pattern for r, n in hits.items() if n == 0]
  if empty:
    shown = ", ".join(list(kernels)[:20]) + (" ..." if len(kernels) > 20 else "")
    raise ValueError(f"rules select no layer: {empty}; linear layers in the tree: {shown}")
  for path, rule in selected.items():
    k, n = kernels[path].shape
    spec = rule.spec
    label = _label(path)
    name = f"layer {label}"
    for fmt_name in (spec.weight_format, spec.act_format):
      if fmt_name is not None:
        formats.check_groups(k, formats.get_format(fmt_name), name)
    if spec.lowrank and rule.rank > min(k, n):
      raise ValueError(f"{name}: rank {rule.rank} exceeds min(K, N) = {min(k, n)} "
                       f"of its kernel [{k}, {n}]")
    if spec.needs_calibration:
      stats = None if calib is None else calib.get(path)
      if stats is None:
        raise ValueError(
            f"{name}: method {rule.method!r} needs calibration statistics, but the "
            f"calibration data has none for this path (it has {len(calib or {})} layers)")
      stats.validate(label, k)
  # Siblings (same parent module) with the same low-rank rule and identical input statistics
  # got the same input (q, k, v of one attention): one shared decomposition. Layers elsewhere
  # that see the same input (every modulation linear reads SiLU(vec)) stay separate.
  groups: dict[tuple, list[str]] = {}
  for path, rule in selected.items():
    share = config.share_lowrank and rule.spec.lowrank
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    key = (id(rule), parent, _fingerprint(calib[path])) if share else (path,)
    groups.setdefault(key, []).append(path)
  return [_Job(paths, selected[paths[0]]) for paths in groups.values()]


def quantize(params, calib: Mapping[str, LayerStats] | None, config: QuantConfig, *,
             report: dict | None = None, progress: bool = True,
             devices: Sequence[jax.Device] | None = None, only: Collection[str] | None = None):
  """Returns a copy of ``params`` with every selected linear kernel quantized.

  Args:
    params: Flax parameter tree (nested dict, with or without a top 'params' level, or an
      ``nnx.State``), or an NNX module (a new module comes back; the one passed in is left
      as it was). Linear kernels are 2-D leaves named 'kernel', shaped [K, N].
    calib: {module path: LayerStats} from ``calibrate`` (may be None when every selected
      method works without data: 'rtn', 'w4a16_rtn').
    config: the rules and search settings.
    report: if a dict is given, it is filled with {module path: LayerReport}.
    progress: show a progress bar over layers.
    devices: spread the layers' searches over these devices (one host thread each, taking
      the next layer group as it frees up); the result is the same as on one device (each
      group's random key depends on its place in the plan only) and every QuantizedLinear
      comes back on the device its kernel was on. None: everything on the default device.
    only: module paths: quantize just these of the selected layers (with any layer sharing
      a decomposition with one of them), the others left as they are, each with the random
      key a full call gives it: calls on disjoint sets, merged, equal one full call. Their
      calibration stats alone need a Hessian (GPTQ), and of layers sharing an input, the
      first's (``calibrate_and_quantize`` sums them a few at a time).

  Returns:
    A tree of the same type and structure (a module for a module), selected kernels
    replaced by QuantizedLinear. In a module, the ``nnx.Linear``s whose kernels were
    quantized come back as ``svdq_jax.layers.Linear`` (``layers.runnable``), so the model
    runs as it is; Linen params run inside ``svdq_jax.layers.quantized_dense()``.

  Raises:
    ValueError: for a selected layer in any other Flax module class (nnx.LinearGeneral,
      nnx.Conv, ...), whose call cannot take a quantized kernel; a bad rule, shape or
      calibration (naming the layer).
  """
  if isinstance(params, nnx.Module):
    _check_runnable(params, config)
    graph, state = nnx.split(params)
    return layers.runnable(nnx.merge(graph, quantize(
        state, calib, config, report=report, progress=progress, devices=devices)))
  kernels = find_kernels(params)
  if not kernels:
    raise ValueError("no linear layer found: the tree has no 2-D leaf named 'kernel'")
  jobs = _plan(kernels, calib, config)
  if only is not None:
    unknown = sorted(set(only) - {p for j in jobs for p in j.paths})
    if unknown:
      raise ValueError(f"only= names layers the config does not select: {unknown[:20]}")
  todo = [i for i, j in enumerate(jobs) if only is None or not set(j.paths).isdisjoint(only)]
  replaced: dict[str, object] = {}
  key = jax.random.key(config.seed)
  bar = tqdm(total=sum(len(jobs[i].paths) for i in todo), desc="quantizing",
             disable=not progress)

  def run(i: int, device: jax.Device | None) -> None:
    job = jobs[i]
    stats = calib[job.paths[0]] if job.rule.spec.needs_calibration else None
    put = (lambda x: x) if device is None else (
        lambda x: None if x is None else jax.device_put(x, device))
    layers, rep = quantize_group(
        [put(kernels[p]) for p in job.paths], job.rule.spec, job.rule.rank, job.rule.alpha,
        config, put(jax.random.fold_in(key, i)),
        x_absmax=None if stats is None else put(stats.absmax),
        samples=None if stats is None else put(stats.samples),
        name="layer " + "+".join(_label(p) for p in job.paths),
        hessian=None if stats is None else put(stats.hessian))
    for path, layer in zip(job.paths, layers):
      if device is not None:  # back where the kernel was (numpy: the default device)
        layer = jax.device_put(layer, getattr(kernels[path], "sharding", jax.devices()[0]))
      replaced[path] = layer
      if report is not None:
        report[path] = rep
    bar.update(len(job.paths))

  if devices is None or len(devices) < 2:
    for i in todo:
      run(i, None if not devices else devices[0])
  else:
    _on_devices(run, todo, list(devices))
  bar.close()
  return replace_kernels(params, replaced)


def _check_runnable(model: nnx.Module, config: QuantConfig) -> None:
  """Raises ValueError (before any work) for a layer the config selects in a Flax module
  that cannot run a quantized kernel (``layers.runs_quantized``)."""
  for path, node in nnx.iter_graph(model):
    path = "/".join(str(p) for p in path)
    rule = config.rule_for(path)
    if (is_nnx_linear(node) and not layers.runs_quantized(node) and rule is not None
        and rule.method != "skip"):
      raise layers.unrunnable_error(path, node)


def _on_devices(run, indices: Sequence[int], devices: list[jax.Device]) -> None:
  """``run(i, device)`` for i in indices, one thread per device pulling the next i; the
  first error stops the others' pulling and is raised here."""
  todo = iter(indices)
  lock = threading.Lock()
  failed: list[BaseException] = []

  def worker(device):
    while not failed:
      with lock:
        i = next(todo, None)
      if i is None:
        return
      try:
        run(i, device)
      except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
        failed.append(e)

  threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in devices]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if failed:
    raise failed[0]


def _device_free_bytes() -> int | None:
  """The default device's free memory as its allocator reports it (its limit less what is in
  use); None where it reports none (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def auto_hessian_bytes(params) -> int | None:
  """``calibrate_and_quantize(hessian_bytes='auto')``'s budget for a model's parameters:
  None (every layer's Hessian in the one calibration pass) where they all fit in the default
  device's free memory, or where the device does not say (CPU); else half that free memory,
  the other half left to calibration's and quantization's working sets."""
  free = _device_free_bytes()
  if free is None or _hessians_bytes(params) <= free:
    return None
  return max(free // 2, 1)


def _hessian_nbytes(kernel) -> int:
  """Bytes of the f32 K x K Hessian of a kernel [K, N]'s input."""
  return 4 * kernel.shape[0] ** 2


def _hessians_bytes(params) -> int:
  """Bytes of every linear layer's Hessian (what ``calibrate(hessian=True)`` holds)."""
  return sum(_hessian_nbytes(k) for k in find_kernels(params).values())


def calibrate_and_quantize(forward: Callable, batches: Iterable, model, config: QuantConfig, *,
                           hessian_bytes: int | str | None = None, max_samples: int = 256,
                           report: dict | None = None, progress: bool = True,
                           devices: Sequence[jax.Device] | None = None):
  """``calibrate`` then ``quantize``, with GPTQ's Hessians (``config.uses_gptq``) held for at
  most ``hessian_bytes`` of layers at a time.

  ``calibrate(hessian=True)`` keeps every layer's K x K Hessian until ``quantize`` has used
  them all: about 67 GB for FLUX.1-dev, more than an 80 GB GPU holds beside the model. Here
  one ``calibrate`` pass takes the stats alone; then, for each group of layers whose
  Hessians (4 K^2 bytes each, one per decomposition) fit ``hessian_bytes``, one more pass
  over the batches sums just those (``input_hessians``), ``quantize(only=...)`` uses and
  drops them. A layer over the budget alone is a group of its own. The result equals the
  single pass's (same sums, same random keys), at the cost of a forward pass per group.

  Args:
    forward, batches: as ``calibrate``; batches is iterated once per pass (a sequence).
    model: an NNX module (watched through ``calibrate(model=...)``; its quantized copy
      comes back) or Linen params that ``forward`` applies.
    config, report, progress, devices: as ``quantize``; max_samples: as ``calibrate``.
    hessian_bytes: the budget; None: everything in one pass (``calibrate(hessian=True)``);
      'auto': ``auto_hessian_bytes`` (one pass where the device's free memory holds it).
  """
  watched = model if isinstance(model, nnx.Module) else None
  state = nnx.state(model) if watched is not None else model
  if hessian_bytes == "auto":
    hessian_bytes = auto_hessian_bytes(state) if config.uses_gptq else None
    if hessian_bytes is not None and progress:
      print(f"GPTQ: the layers' Hessians ({_hessians_bytes(state) / 1e9:.1f} GB) exceed the "
            f"device's free memory; {hessian_bytes / 1e9:.1f} GB of them at a time, a "
            "calibration pass each (--hessian-memory / hessian_bytes to choose)")
  elif hessian_bytes is not None and (isinstance(hessian_bytes, str) or not hessian_bytes > 0):
    raise ValueError(f"hessian_bytes must be > 0 or 'auto', got {hessian_bytes!r}")
  passes = config.uses_gptq and hessian_bytes is not None
  if passes and iter(batches) is batches:
    raise TypeError("calibrate_and_quantize with hessian_bytes iterates the batches once "
                    "per pass: give a sequence, not an iterator")
  if watched is not None:
    _check_runnable(watched, config)
  calib = calibrate(forward, batches, model=watched, max_samples=max_samples,
                    progress=progress, hessian=config.uses_gptq and not passes)
  if not passes:
    return quantize(model, calib, config, report=report, progress=progress, devices=devices)
  kernels = find_kernels(state)
  groups, sizes = [[]], [0]
  for job in _plan(kernels, calib, config):
    nbytes = _hessian_nbytes(kernels[job.paths[0]])
    if groups[-1] and sizes[-1] + nbytes > hessian_bytes:
      groups.append([])
      sizes.append(0)
    groups[-1].append(job.paths)
    sizes[-1] += nbytes
  if progress:
    unit, scale = ("GB", 1e9) if max(sizes) >= 1e8 else ("MB", 1e6)
    print(f"GPTQ: {len(groups)} groups of Hessians "
          f"({', '.join(f'{b / scale:.3g}' for b in sizes)} {unit}), a calibration pass each")
  out = {}
  for group in groups:
    firsts = [paths[0] for paths in group]
    hessians = input_hessians(forward, batches, firsts, model=watched, progress=progress)
    stats = dict(calib) | {p: dataclasses.replace(calib[p], hessian=hessians[p])
                           for p in firsts}
    del hessians
    done = quantize(state, stats, config, report=report, progress=progress, devices=devices,
                    only=[p for paths in group for p in paths])
    del stats   # the group's Hessians
    out |= {p: q for p, q in find_kernels(done, quantized=True).items()
            if isinstance(q, QuantizedLinear)}
  state = replace_kernels(state, out)
  if watched is None:
    return state
  graph, _ = nnx.split(model)
  return layers.runnable(nnx.merge(graph, state))


def tree_bytes(tree) -> int:
  """Bytes of every array leaf of a tree (float or quantized parameters)."""
  return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


__all__ = ["auto_hessian_bytes", "calibrate_and_quantize", "quantize", "find_kernels",
           "module_path", "tree_bytes", "LayerReport"]
