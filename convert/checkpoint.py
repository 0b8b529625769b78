"""Reading PyTorch safetensors checkpoints tensor by tensor, and orbax checkpoints.

A checkpoint is one ``.safetensors`` file, a sharded set described by its ``.index.json``
(``{"weight_map": {name: shard file}}``), or a folder holding either. Tensors are read one at
a time, so converting holds the output tree plus the tensor in hand, not the input file.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from safetensors import SafetensorError, safe_open

from svdq_jax import layers

log = logging.getLogger(__name__)


class SafetensorsSource:
  """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

  def __init__(self, path: str | os.PathLike):
    path = pathlib.Path(path)
    if path.is_dir():
      found = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.safetensors"))
      if len(found) != 1:
        raise ValueError(f"{path}: expected one .safetensors file or one .index.json, "
                         f"found {[p.name for p in found] or 'none'}")
      path = found[0]
    if not path.exists():
      raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.name.endswith(".json"):
      try:
        weight_map = json.loads(path.read_text())["weight_map"]
      except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a safetensors index (no 'weight_map'): {e}") from None
      self._shard_of = {k: path.parent / v for k, v in weight_map.items()}
    else:
      self._shard_of = None
      self._single = path
    # Shapes are read once; tensors are read with the file opened (memory-mapped) only for
    # the read, so no page of the checkpoint stays resident after its tensor is copied.
    self._shapes = {}
    for shard in self.shards():
      with self._open(shard) as f:
        for name in f.keys():
          self._shapes[name] = tuple(f.get_slice(name).get_shape())
    if self._shard_of is None:
      self._shard_of = {k: path for k in self._shapes}
    else:
      lacking = sorted(set(self._shard_of) - set(self._shapes))
      if lacking:
        raise ValueError(f"{path}: the index lists tensors no shard holds: {lacking[:20]}")

  def shards(self) -> list[pathlib.Path]:
    return sorted(set(self._shard_of.values())) if self._shard_of else [self._single]

  def keys(self) -> list[str]:
    return sorted(self._shard_of)

  @staticmethod
  def _open(shard: pathlib.Path):
    if not shard.exists():
      raise FileNotFoundError(f"checkpoint shard is missing: {shard}")
    try:
      return safe_open(str(shard), framework="np")
    except SafetensorError as e:
      raise ValueError(f"{shard}: not a readable safetensors file ({e})") from None

  def shape(self, name: str) -> tuple[int, ...]:
    return self._shapes[name]

  def get(self, name: str) -> np.ndarray:
    """The tensor ``name`` as a numpy array in its stored dtype (bf16 via ml_dtypes)."""
    shard = self._shard_of[name]
    try:
      with self._open(shard) as f:
        return f.get_tensor(name)
    except SafetensorError as e:
      raise ValueError(f"{shard}: cannot read tensor {name!r} "
                       f"(truncated or corrupt file?): {e}") from None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


def _sweep_stale(dst: pathlib.Path) -> None:
  """Removes temporary siblings of ``dst`` left by killed runs (their process is gone; names
  without a process id come from older versions and are removed too)."""
  for tmp in dst.parent.glob(f".{dst.name}.tmp-*"):
    pid = tmp.name.rsplit(".tmp-", 1)[1].split("-")[0]
    if pid.isdigit() and len(pid) < 8 and _pid_alive(int(pid)):
      continue  # a conversion into the same destination is running
    log.warning("removing %s, left by an interrupted run", tmp)
    shutil.rmtree(tmp, ignore_errors=True)


_sigint_hits: list | None = None   # Ctrl-Cs received while a save defers them


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
  """A Ctrl-C during the block raises KeyboardInterrupt at the next ``stop_if_interrupted``
  (between two groups of a save), not wherever the main thread happens to be: inside orbax's
  writes it was swallowed (a save that completed after Ctrl-C, about one run in six) or left
  writer threads adding files to a folder being deleted. A second Ctrl-C raises at once.
  Re-entrant; only in the main thread with Python's default SIGINT handler."""
  global _sigint_hits
  if (_sigint_hits is not None or threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
    yield
    return

  def on_sigint(signum, frame):
    _sigint_hits.append(signum)
    if len(_sigint_hits) > 1:
      raise KeyboardInterrupt

  _sigint_hits = []
  previous = signal.signal(signal.SIGINT, on_sigint)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
    _sigint_hits = None


def stop_if_interrupted() -> None:
  """Raises KeyboardInterrupt if a Ctrl-C was deferred (``interrupts_deferred``)."""
  if _sigint_hits:
    raise KeyboardInterrupt


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling folder that becomes ``dst`` only if the block succeeds.

  Refuses an existing ``dst`` unless ``overwrite``; on any error, Ctrl-C included, nothing is
  left behind. A run killed outright (SIGKILL, the OOM killer) leaves its temporary folder,
  ``.<dst>.tmp-<pid>-<hex>``: the next run into the same ``dst`` removes it.
  """
  dst = pathlib.Path(dst).absolute()
  if dst.exists() and not overwrite:
    raise FileExistsError(f"destination exists: {dst} (pass overwrite=True / --overwrite)")
  _sweep_stale(dst)
  tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    with interrupts_deferred():
      yield tmp
      stop_if_interrupted()   # a Ctrl-C during the block cancels the result
    if dst.exists():
      shutil.rmtree(dst)
    tmp.rename(dst)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)


GROUPS_FILE = "groups.json"


def release_freed_memory() -> None:
  """Hands memory that was freed back to the OS (glibc's malloc_trim; a no-op elsewhere).

  Writing block after block, glibc keeps the freed buffers of earlier blocks in its heaps
  (orbax writes from several threads): measured on FLUX.1-dev-sized blocks, RSS crept from
  1.4 to 2.3 GiB over 8 blocks without this and stays at ~1.0 GiB between blocks with it
  (docs/convert.md)."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _has_block_list(tree) -> bool:
  """Whether a dict holds, at any depth, a block list (a non-empty dict with int keys)."""
  if not isinstance(tree, dict):
    return False
  if tree and all(isinstance(k, int) for k in tree):
    return True
  return any(_has_block_list(v) for v in tree.values())


def tree_groups(tree: dict, prefix: tuple = ()) -> Iterator[tuple[str, dict]]:
  """Splits a nested dict into checkpoint groups, each nested from the root: one per element
  of every block list (a dict with int keys, at any depth), and one per other subtree that
  holds no block list, so ``{'double_blocks': {0: ..., 1: ...}, 'img_in': ...}`` gives
  'double_blocks/0', 'double_blocks/1', 'img_in', and T5's ``{'encoder': {'block': {0: ...},
  'final_layer_norm': ...}}`` gives 'encoder/block/0', ..., 'encoder/final_layer_norm'."""
  def nest(path, value):
    for k in reversed(path):
      value = {k: value}
    return value

  for key, value in tree.items():
    path = prefix + (key,)
    if isinstance(value, dict) and value and all(isinstance(k, int) for k in value):
      for i, sub in value.items():
        yield "/".join(map(str, path + (i,))), nest(path + (i,), sub)
    elif _has_block_list(value):
      yield from tree_groups(value, path)
    else:
      yield "/".join(map(str, path)), nest(path, value)


def _group_dir(params: pathlib.Path, group: str) -> pathlib.Path:
  return params / group.replace("/", ".")


def save_groups(dst: str | os.PathLike, groups, overwrite: bool = False,
                extra: dict[str, str] | None = None) -> None:
  """Saves ``(name, tree)`` groups, one orbax checkpoint each under ``dst/params``, as they
  come: host memory holds one group at a time (with ``flux_param_groups``, one block). All or
  nothing, as ``atomic_directory``."""
  # Synchronous, at most 1 GB being written at a time
  handler = ocp.StandardCheckpointHandler(save_concurrent_gb=1)
  with atomic_directory(dst, overwrite) as tmp:
    params = tmp / "params"
    params.mkdir(parents=True)
    names = []
    with ocp.Checkpointer(handler) as ckpt:
      for name, tree in groups:
        ckpt.save(_group_dir(params, name), args=ocp.args.StandardSave(tree))
        names.append(name)
        del tree
        release_freed_memory()
        stop_if_interrupted()
    (params / GROUPS_FILE).write_text(json.dumps(names))
    for name, text in (extra or {}).items():
      (tmp / name).write_text(text)


def save_tree(dst: str | os.PathLike, tree, overwrite: bool = False,
              extra: dict[str, str] | None = None) -> None:
  """Saves a nested dict (float params or a quantized tree) as an orbax checkpoint at
  ``dst``, one group (``tree_groups``) at a time, with its structure (``tree_spec``: what
  ``restore_tree(dst)`` rebuilds it from) and ``extra`` text files beside it; all or
  nothing."""
  if not isinstance(tree, dict):
    raise TypeError(f"save_tree takes a nested dict (e.g. nnx.to_pure_dict(state)), got "
                    f"{type(tree).__name__}")
  extra = {STRUCTURE_FILE: json.dumps(tree_spec(tree))} | (extra or {})
  save_groups(dst, tree_groups(tree), overwrite, extra)


def tree_spec(tree) -> dict:
  """JSON-able structure of a nested dict of arrays and ``QuantizedLinear`` nodes (shapes,
  formats, absent fields): what ``like_from_spec`` needs to rebuild ``restore_tree``'s
  ``like`` without the data."""
  from svdq_jax.qlinear import QuantizedLinear

  def spec(node):
    if isinstance(node, dict):
      return {"dict": {str(k): spec(v) for k, v in node.items()}}
    if isinstance(node, QuantizedLinear):
      fields = {f.name: None if getattr(node, f.name) is None
                else list(np.shape(getattr(node, f.name)))
                for f in dataclasses.fields(node) if f.metadata.get("pytree_node", True)}
      return {"quantized": fields, "weight_format": node.weight_format,
              "act_format": node.act_format}
    return {"shape": list(np.shape(node))}

  return spec(tree)


def like_from_spec(spec: dict):
  """The abstract tree (ShapeDtypeStructs, QuantizedLinear nodes) ``tree_spec`` describes;
  keys made of digits become ints (block indices), as in the model's pure dicts."""
  from svdq_jax.qlinear import QuantizedLinear

  if "dict" in spec:
    return {int(k) if k.isdigit() else k: like_from_spec(v) for k, v in spec["dict"].items()}
  if "quantized" in spec:
    fields = {k: None if v is None else jax.ShapeDtypeStruct(tuple(v), np.float32)
              for k, v in spec["quantized"].items()}
    return QuantizedLinear(**fields, weight_format=spec["weight_format"],
                           act_format=spec["act_format"])
  return jax.ShapeDtypeStruct(tuple(spec["shape"]), np.float32)


STRUCTURE_FILE = "structure.json"


def save_model(dst, model, *, overwrite: bool = False, extra: dict | None = None,
               groups=None) -> None:
  """Writes an NNX model with a dataclass ``cfg`` (FLUX, CLIP, T5, VAE), float or quantized
  (QuantizedLinear kernels), as ``restore_model`` reads it: orbax params one group (block) at
  a time, ``config.json`` (the cfg), ``structure.json`` (the tree's shapes and formats);
  ``extra`` text files beside them. ``groups``: ``(name, tree)`` pairs to write instead of the
  model's state (streamed conversion: ``model`` may then be abstract). All or nothing."""
  tree = nnx.to_pure_dict(nnx.state(model))
  files = {"config.json": json.dumps(dataclasses.asdict(model.cfg)),
           STRUCTURE_FILE: json.dumps(tree_spec(tree))} | (extra or {})
  save_groups(dst, tree_groups(tree) if groups is None else groups, overwrite, extra=files)


def is_saved_model(path) -> bool:
  path = pathlib.Path(path)
  return (path / "params").is_dir() and (path / "config.json").exists()


def restore_model(path, model_cls, cfg_cls, device=None):
  """A model written by ``save_model``: ``model_cls(cfg_cls(**config.json), rngs)``'s
  structure, quantized layers as recorded in structure.json (runnable in plain
  ``nnx.Linear``s too: ``layers.runnable``), parameters restored onto ``device`` one group at
  a time."""
  path = pathlib.Path(path)
  raw = json.loads((path / "config.json").read_text())
  cfg = cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
  graph, state = nnx.split(nnx.eval_shape(lambda: model_cls(cfg, nnx.Rngs(0))))
  structure = path / STRUCTURE_FILE
  like = (like_from_spec(json.loads(structure.read_text())) if structure.exists()
          else nnx.to_pure_dict(state))   # float checkpoints written by `convert`
  nnx.replace_by_pure_dict(state, restore_tree(path, like=like, device=device))
  return layers.runnable(nnx.merge(graph, state))


def merge_trees(trees) -> dict:
  """Deep-merges nested dicts with disjoint leaves (the groups of one model)."""
  out: dict = {}

  def into(dst, src):
    for k, v in src.items():
      if isinstance(v, dict):
        into(dst.setdefault(k, {}), v)
      else:
        dst[k] = v

  for t in trees:
    into(out, t)
  return out


def _path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _subtree(like: dict, group: str) -> dict:
  """The part of ``like`` that a group (``'double_blocks/3'``, ``'img_in'``,
  ``'encoder/block/0'``) holds, nested from the root."""
  node, keys = like, []
  for part in group.split("/"):
    key = next((k for k in node if str(k) == part), None) if isinstance(node, dict) else None
    if key is None:
      raise ValueError(f"the checkpoint holds group {group!r}, which the model does not have")
    keys.append(key)
    node = node[key]
  for key in reversed(keys):
    node = {key: node}
  return node


def _restore_item(ckpt, path: pathlib.Path, like, src, device):
  stored = {_path_name(p): m for p, m in
            jax.tree_util.tree_flatten_with_path(ckpt.metadata(path).item_metadata)[0]}
  sharding = (device if device is None or isinstance(device, jax.sharding.Sharding)
              else jax.sharding.SingleDeviceSharding(device))

  def abstract(p, x):
    meta = stored.get(_path_name(p))
    if meta is None:
      raise ValueError(f"{src}: the checkpoint has no {_path_name(p)!r}")
    if tuple(meta.shape) != tuple(np.shape(x)):
      raise ValueError(f"{src}: {_path_name(p)} is {tuple(meta.shape)} in the checkpoint, "
                       f"{tuple(np.shape(x))} in the model")
    return jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=sharding)

  return ckpt.restore(path, jax.tree_util.tree_map_with_path(abstract, like))


def restore_tree(src: str | os.PathLike, like=None, device=None):
  """Restores a tree saved by ``save_tree`` or ``convert``, one group at a time.

  Args:
    src: the checkpoint folder.
    like: a tree (arrays or ShapeDtypeStructs) of the saved structure, e.g. the model's
      ``nnx.to_pure_dict(nnx.state(nnx.eval_shape(...)))``; needed for int keys and for
      custom nodes such as QuantizedLinear. Arrays come back in the dtypes they were saved
      in (bf16 stays bf16), whatever ``like`` says. None: the structure ``save_tree`` wrote
      beside the checkpoint (digit keys as ints, as in NNX's pure dicts).
    device: a jax device to restore onto (each group goes there before the next is read, so
      host memory holds about one group), or a sharding: ``parallel.replicated(mesh)`` puts
      every parameter on every device of a mesh (data- or sequence-parallel sampling)
      straight from the files; None: orbax's default placement.
  """
  path = pathlib.Path(src).absolute() / "params"
  if not path.exists():
    raise FileNotFoundError(f"no svdq-jax orbax checkpoint at {src}")
  if like is None:
    structure = path.parent / STRUCTURE_FILE
    if not structure.exists():
      raise ValueError(f"{src} holds no {STRUCTURE_FILE} (save_tree writes it since "
                       f"2026-12-05): give restore_tree a like= tree of its structure")
    like = like_from_spec(json.loads(structure.read_text()))
  with ocp.StandardCheckpointer() as ckpt:
    if not (path / GROUPS_FILE).exists():  # one item: checkpoints written before 2026-11-29
      return _restore_item(ckpt, path, like, src, device)
    groups = json.loads((path / GROUPS_FILE).read_text())
    absent = sorted(set(name for name, _ in tree_groups(like)) - set(groups))
    if absent:
      raise ValueError(f"{src}: the checkpoint has no {absent[:20]}")
    return merge_trees(_restore_item(ckpt, _group_dir(path, g), _subtree(like, g), src, device)
                       for g in groups)
