"""``svdq-jax convert``: a PyTorch FLUX checkpoint into an orbax checkpoint of ``Flux`` params."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from svdq_jax.convert.checkpoint import SafetensorsSource, restore_tree, save_tree
from svdq_jax.convert.mapping import detect_naming, flux_params_from_torch, infer_config
from svdq_jax.models.flux import Flux, FluxConfig


def expected_shapes(cfg: FluxConfig) -> dict:
  """Pure dict of the model's parameter shapes (nothing allocated)."""
  abstract = nnx.eval_shape(lambda: Flux(cfg, nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(abstract))


def check_shapes(tree: dict, cfg: FluxConfig) -> None:
  """Raises ValueError naming every parameter whose shape differs from the config's."""
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


def convert(src, dst, *, naming: str | None = None, axes_dim=None, overwrite: bool = False,
            progress: bool = True) -> FluxConfig:
  """Converts a BFL- or diffusers-format FLUX transformer checkpoint into ``dst``.

  ``dst`` gets ``params`` (orbax, dtypes as stored) and ``config.json``. Nothing is left at
  ``dst`` if anything fails; an existing ``dst`` is refused unless ``overwrite``. Tensors
  are read one at a time: peak host memory is about the output tree plus one layer plus
  orbax's write buffer (docs/convert.md has a measurement).
  """
  dst = pathlib.Path(dst)
  if dst.exists() and not overwrite:
    raise FileExistsError(f"destination exists: {dst} (use --overwrite)")
  source = SafetensorsSource(src)
  keys = source.keys()
  naming = naming or detect_naming(keys)
  cfg = infer_config(keys, source.shape, naming, axes_dim)
  bar = tqdm(total=len(keys), desc="converting", unit="tensor", disable=not progress)

  def get(name):
    bar.update(1)
    return source.get(name)

  # Host (CPU) jax arrays: orbax writes them without another full copy of the tree.
  cpu = jax.devices("cpu")[0]
  try:
    tree = flux_params_from_torch(get, keys, cfg, naming, put=lambda x: jax.device_put(x, cpu))
  finally:
    bar.close()
  check_shapes(tree, cfg)
  save_tree(dst, tree, overwrite, extra={"config.json": json.dumps(dataclasses.asdict(cfg))})
  return cfg


def load_flux(path) -> Flux:
  """A Flux model with the parameters of a converted checkpoint."""
  path = pathlib.Path(path)
  cfg_file = path / "config.json"
  if not cfg_file.exists():
    raise FileNotFoundError(f"{path}: not a converted FLUX checkpoint (no config.json)")
  raw = json.loads(cfg_file.read_text())
  cfg = FluxConfig(**{**raw, "axes_dim": tuple(raw["axes_dim"])})
  graph, state = nnx.split(nnx.eval_shape(lambda: Flux(cfg, nnx.Rngs(0))))
  tree = restore_tree(path, like=nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, tree)
  return nnx.merge(graph, state)
