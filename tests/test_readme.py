"""The README's API example, run as written on a small model, so that the README stays true."""

import pathlib
import re

import jax
import numpy as np
from flax import nnx

from svdq_jax.qlinear import QuantizedLinear
from svdq_jax.tree import find_kernels

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _api_snippet() -> str:
  """The first ```python block under '## API'."""
  text = README.read_text()
  api = text[text.index("\n## API\n"):]
  return re.search(r"```python\n(.*?)```", api, re.S).group(1)


class _Mod(nnx.Module):
  def __init__(self, d, rngs):
    self.lin = nnx.Linear(d, 2 * d, rngs=rngs)


class _Body(nnx.Module):
  def __init__(self, d, rngs):
    self.embed = nnx.Linear(d, d, rngs=rngs)
    self.mod = _Mod(d, rngs)
    self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
    self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)
    self.final = nnx.Linear(d, d, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x)
    shift, scale = jax.numpy.split(self.mod.lin(jax.nn.silu(h.mean(0))), 2)
    h = h * (1 + scale) + shift
    return self.final(h + self.fc2(jax.nn.gelu(self.fc1(h))))


class MyModel(nnx.Module):
  """Paths body/embed, body/mod/lin, body/fc1, body/fc2, body/final: each of the snippet's
  rules selects a layer."""

  def __init__(self, rngs):
    self.body = _Body(128, rngs)

  def __call__(self, x):
    return self.body(x)


def test_readme_api_example_runs():
  batches = [jax.random.normal(jax.random.key(i), (64, 128)) for i in range(2)]
  scope = {"MyModel": MyModel, "batches": batches}
  exec(compile(_api_snippet(), str(README) + " (## API)", "exec"), scope)
  model, qmodel, qparams = scope["model"], scope["qmodel"], scope["qparams"]
  x = batches[0]
  want, got = np.asarray(model(x)), np.asarray(qmodel(x))
  assert got.shape == want.shape
  err = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert err < 0.2, err   # 4-bit weights and activations: close, not equal
  quantized = sorted(p for p, k in find_kernels(qparams, quantized=True).items()
                     if isinstance(k, QuantizedLinear))
  assert quantized == ["body/fc1", "body/fc2", "body/mod/lin"]   # embed, final: skipped
