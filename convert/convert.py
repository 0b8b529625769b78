"""``svdq-jax convert``: a PyTorch FLUX checkpoint into an orbax checkpoint of ``Flux`` params."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from svdq_jax.convert.checkpoint import (SafetensorsSource, is_saved_model, merge_trees,
                                        restore_model, save_groups)
from svdq_jax.convert.mapping import detect_naming, flux_param_groups, infer_config
from svdq_jax.models.flux import Flux, FluxConfig


def expected_shapes(cfg: FluxConfig) -> dict:
  """Pure dict of the model's parameter shapes (nothing allocated)."""
  abstract = nnx.eval_shape(lambda: Flux(cfg, nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(abstract))


def check_shapes(tree: dict, cfg: FluxConfig, want: dict | None = None) -> None:
  """Raises ValueError naming every parameter whose shape differs from the config's (``tree``
  may be one group of the model; ``want``: ``expected_shapes(cfg)`` flattened, if at hand)."""
  if want is None:
    want = dict(jax.tree_util.tree_flatten_with_path(expected_shapes(cfg))[0])
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if path not in want:
      bad.append(f"{name}: not a parameter of the model")
    elif tuple(np.shape(leaf)) != tuple(want[path].shape):
      bad.append(f"{name}: checkpoint {tuple(np.shape(leaf))}, model {tuple(want[path].shape)}")
  if bad:
    raise ValueError("checkpoint shapes do not match the FLUX config:\n  " + "\n  ".join(bad))


def _checked_groups(source: SafetensorsSource, naming, axes_dim, put, progress: bool):
  """(config, iterator of checked (group, tree)) for a safetensors FLUX checkpoint."""
  keys = source.keys()
  naming = naming or detect_naming(keys)
  cfg = infer_config(keys, source.shape, naming, axes_dim)
  want = dict(jax.tree_util.tree_flatten_with_path(expected_shapes(cfg))[0])

  def groups():
    with tqdm(total=len(keys), desc="converting", unit="tensor", disable=not progress) as bar:
      def get(name):
        bar.update(1)
        return source.get(name)

      for group, tree in flux_param_groups(get, keys, cfg, naming, put=put):
        check_shapes(tree, cfg, want)
        yield group, tree

  return cfg, groups()


def convert(src, dst, *, naming: str | None = None, axes_dim=None, overwrite: bool = False,
            progress: bool = True) -> FluxConfig:
  """Converts a BFL- or diffusers-format FLUX transformer checkpoint into ``dst``.

  ``dst`` gets ``params`` (orbax, one checkpoint per block, dtypes as stored) and
  ``config.json``. Each block is read, converted, checked and written before the next is
  read: peak host memory is about one block plus orbax's write buffer, whatever the model's
  size (docs/convert.md). Nothing is left at ``dst`` if anything fails (Ctrl-C included); an
  existing ``dst`` is refused unless ``overwrite``; a run killed outright leaves a hidden
  temporary folder that the next run into ``dst`` removes.
  """
  dst = pathlib.Path(dst)
  if dst.exists() and not overwrite:
    raise FileExistsError(f"destination exists: {dst} (use --overwrite)")
  source = SafetensorsSource(src)
  # Host (CPU) jax arrays: orbax writes them without another copy
  cpu = jax.devices("cpu")[0]
  cfg, groups = _checked_groups(source, naming, _axes_dim(pathlib.Path(src), axes_dim),
                                lambda x: jax.device_put(x, cpu), progress)
  save_groups(dst, groups, overwrite,
              extra={"config.json": json.dumps(dataclasses.asdict(cfg))})
  return cfg


def _axes_dim(src: pathlib.Path, axes_dim):
  """``axes_dim``, or the RoPE split a diffusers ``transformer/config.json`` beside the
  weights records (the weights cannot tell it)."""
  cfg = src / "config.json"
  if axes_dim is None and src.is_dir() and cfg.exists():
    return json.loads(cfg.read_text()).get("axes_dims_rope")
  return axes_dim


def _transformer_source(path: pathlib.Path) -> pathlib.Path:
  """A diffusers pipeline folder's transformer/ subfolder, or ``path`` itself."""
  sub = path / "transformer"
  return sub if path.is_dir() and sub.is_dir() else path


def load_flux(path, *, device=None, naming: str | None = None, axes_dim=None,
              progress: bool = False) -> Flux:
  """A Flux model from a converted checkpoint (``svdq-jax convert``'s folder) or straight
  from the PyTorch safetensors (one file, a sharded ``.index.json``, a folder holding either,
  or a diffusers pipeline folder with ``transformer/``).

  Parameters go to ``device`` (default: the first jax device; or a sharding such as
  ``svdq_jax.parallel.replicated(mesh)``: every device of a mesh) one block at a time (fused
  q/k/v built on the host per block), so host memory holds about one block, not the model.
  ``naming`` and ``axes_dim`` apply to safetensors sources (as for ``convert``).
  """
  device = device or jax.devices()[0]
  src = _transformer_source(pathlib.Path(path))
  if is_saved_model(src):   # `convert`, `save_model` (quantized too)
    return restore_model(src, Flux, FluxConfig, device)
  source = SafetensorsSource(src)
  cfg, groups = _checked_groups(source, naming, _axes_dim(src, axes_dim),
                                lambda x: jax.device_put(x, device), progress)
  tree = merge_trees(tree for _, tree in groups)
  graph, state = nnx.split(nnx.eval_shape(lambda: Flux(cfg, nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, tree)
  return nnx.merge(graph, state)
