"""Reading PyTorch safetensors checkpoints tensor by tensor, and orbax checkpoints.

A checkpoint is one ``.safetensors`` file, a sharded set described by its ``.index.json``
(``{"weight_map": {name: shard file}}``), or a folder holding either. Tensors are read one at
a time, so converting holds the output tree plus the tensor in hand, not the input file.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors import SafetensorError, safe_open


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


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling folder that becomes ``dst`` only if the block succeeds.

  Refuses an existing ``dst`` unless ``overwrite``; on any error nothing is left behind.
  """
  dst = pathlib.Path(dst).absolute()
  if dst.exists() and not overwrite:
    raise FileExistsError(f"destination exists: {dst} (pass overwrite=True / --overwrite)")
  tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    yield tmp
    if dst.exists():
      shutil.rmtree(dst)
    tmp.rename(dst)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)


def save_tree(dst: str | os.PathLike, tree, overwrite: bool = False,
              extra: dict[str, str] | None = None) -> None:
  """Saves a pytree (float params or a quantized tree) as an orbax checkpoint at ``dst``,
  with ``extra`` text files beside it; all or nothing."""
  # Synchronous, at most 1 GB being written at a time: the host copy orbax makes of each
  # array while writing stays small next to the tree itself.
  handler = ocp.StandardCheckpointHandler(save_concurrent_gb=1)
  with atomic_directory(dst, overwrite) as tmp:
    with ocp.Checkpointer(handler) as ckpt:
      ckpt.save(tmp / "params", args=ocp.args.StandardSave(tree))
    for name, text in (extra or {}).items():
      (tmp / name).write_text(text)


def _path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def restore_tree(src: str | os.PathLike, like):
  """Restores a tree saved by ``save_tree`` or ``convert``.

  Args:
    src: the checkpoint folder.
    like: a tree (arrays or ShapeDtypeStructs) of the saved structure, e.g. the model's
      ``nnx.to_pure_dict(nnx.state(nnx.eval_shape(...)))``; needed for int keys and for
      custom nodes such as QuantizedLinear. Arrays come back in the dtypes they were saved
      in (bf16 stays bf16), whatever ``like`` says.
  """
  path = pathlib.Path(src).absolute() / "params"
  if not path.exists():
    raise FileNotFoundError(f"no svdq-jax orbax checkpoint at {src}")
  with ocp.StandardCheckpointer() as ckpt:
    stored = {_path_name(p): m for p, m in
              jax.tree_util.tree_flatten_with_path(ckpt.metadata(path).item_metadata)[0]}

    def abstract(p, x):
      meta = stored.get(_path_name(p))
      if meta is None:
        raise ValueError(f"{src}: the checkpoint has no {_path_name(p)!r}")
      if tuple(meta.shape) != tuple(np.shape(x)):
        raise ValueError(f"{src}: {_path_name(p)} is {tuple(meta.shape)} in the checkpoint, "
                         f"{tuple(np.shape(x))} in the model")
      return jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype)

    return ckpt.restore(path, jax.tree_util.tree_map_with_path(abstract, like))
