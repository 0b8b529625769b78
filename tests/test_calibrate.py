"""Calibration through Flax interception, Linen and NNX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from svdq_jax import LayerStats, calibrate
from svdq_jax.layers import Linear


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(32, name="fc1")(x)
    return nn.Dense(8, name="fc2")(nn.relu(h))


class Block(nnx.Module):
  def __init__(self, rngs):
    self.q = nnx.Linear(16, 16, rngs=rngs)
    self.k = Linear(16, 16, rngs=rngs)
    self.out = Linear(16, 16, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.gelu(self.q(x) + self.k(x)))


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([Block(rngs), Block(rngs)])

  def __call__(self, x):
    for b in self.blocks:
      x = b(x)
    return x


def _batches(k, n=3, tokens=(2, 10), seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((*tokens, k)), jnp.float32) for _ in range(n)]


def test_linen_paths_absmax_and_samples():
  model = LinenNet()
  batches = _batches(16)
  params = model.init(jax.random.key(0), batches[0])
  stats = calibrate(jax.jit(lambda b: model.apply(params, b)), batches, max_samples=25,
                    progress=False)
  assert set(stats) == {"fc1", "fc2"}
  allx = np.concatenate([np.asarray(b).reshape(-1, 16) for b in batches])
  np.testing.assert_array_equal(stats["fc1"].absmax, np.abs(allx).max(0))
  assert stats["fc1"].num_tokens == 60
  s = stats["fc1"].samples
  assert s.shape == (25, 16)
  # every sampled row is a real input token, each at most once
  rows = {r.tobytes() for r in allx}
  assert all(r.tobytes() in rows for r in s) and len({r.tobytes() for r in s}) == 25
  h = jax.nn.relu(allx @ np.asarray(params["params"]["fc1"]["kernel"])
                  + np.asarray(params["params"]["fc1"]["bias"]))
  np.testing.assert_allclose(stats["fc2"].absmax, np.abs(h).max(0), rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_nnx_paths_with_and_without_jit(jit):
  model = NnxNet(nnx.Rngs(0))
  fwd = nnx.jit(lambda m, b: m(b)) if jit else (lambda m, b: m(b))
  batches = _batches(16)
  before = np.asarray(fwd(model, batches[0]))
  stats = calibrate(lambda b: fwd(model, b), batches, model=model, progress=False)
  assert set(stats) == {f"blocks/{i}/{n}" for i in (0, 1) for n in ("q", "k", "out")}
  # q and k see the same input: identical statistics
  for i in (0, 1):
    np.testing.assert_array_equal(stats[f"blocks/{i}/q"].samples, stats[f"blocks/{i}/k"].samples)
  allx = np.concatenate([np.asarray(b).reshape(-1, 16) for b in batches])
  np.testing.assert_array_equal(stats["blocks/0/q"].absmax, np.abs(allx).max(0))
  # the model is left as it was: no tags, original __call__
  assert not any(hasattr(m, "_svdq_calibration_path") for _, m in nnx.iter_graph(model))
  assert nnx.Linear.__call__.__qualname__ == "Linear.__call__"
  np.testing.assert_array_equal(np.asarray(fwd(model, batches[0])), before)


@pytest.mark.parametrize("jit", [False, True])
def test_input_hessians_are_calibrates_for_the_layers_asked(jit):
  """input_hessians: the Hessians calibrate(hessian=True) gives those layers (device f32
  sums eagerly, host f64 under jit), no other layer's; a layer never called is an error."""
  from svdq_jax.calibrate import input_hessians
  model = NnxNet(nnx.Rngs(0))
  fwd = nnx.jit(lambda m, b: m(b)) if jit else (lambda m, b: m(b))
  batches = _batches(16)
  # first: under jit its trace is the one calibrate then reuses (and must find complete)
  got = input_hessians(lambda b: fwd(model, b), batches, ["blocks/0/q", "blocks/1/out"],
                       model=model, progress=False)
  stats = calibrate(lambda b: fwd(model, b), batches, model=model, progress=False,
                    hessian=True)
  assert len(stats) == 6 and all(s.num_tokens == 60 for s in stats.values())
  assert set(got) == {"blocks/0/q", "blocks/1/out"}
  for p, h in got.items():
    assert h.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(h), np.asarray(stats[p].hessian))
  with pytest.raises(ValueError, match=r"never called the layers \['blocks/2/q'\]"):
    input_hessians(lambda b: fwd(model, b), batches, ["blocks/2/q"], model=model,
                   progress=False)


def test_a_jitted_forward_calibrates_whenever_it_was_traced():
  """A jax.jit forward traced before calibration, or by an earlier one, records into this
  calibration; afterwards it runs without the recording. Inside an un-clearable wrapper, a
  trace made before calibration is a clear error."""
  model = LinenNet()
  batches = _batches(16)
  params = model.init(jax.random.key(0), batches[0])
  forward = jax.jit(lambda b: model.apply(params, b))
  forward(batches[0])   # traced before: no recording in it
  first = calibrate(forward, batches, progress=False)
  again = calibrate(forward, batches[:2], progress=False)
  assert first["fc1"].num_tokens == 60 and again["fc1"].num_tokens == 40
  np.testing.assert_array_equal(
      again["fc1"].absmax, np.abs(np.concatenate([np.asarray(b) for b in batches[:2]])
                                  ).reshape(-1, 16).max(0))
  assert forward._cache_size() == 0   # the instrumented trace is not kept
  wrapped = jax.jit(lambda b: model.apply(params, b))
  wrapped(batches[0])
  with pytest.raises(ValueError, match="traced before calibration keeps its uninstrumented"):
    calibrate(lambda b: wrapped(b), batches, progress=False)


def test_sampling_is_deterministic_and_bounded():
  model = LinenNet()
  batches = _batches(16, n=5)
  params = model.init(jax.random.key(0), batches[0])
  a = calibrate(lambda b: model.apply(params, b), batches, max_samples=7, progress=False)
  b = calibrate(lambda b: model.apply(params, b), batches, max_samples=7, progress=False)
  np.testing.assert_array_equal(a["fc1"].samples, b["fc1"].samples)
  assert a["fc2"].samples.shape == (7, 32)


def test_nan_in_calibration_names_layer_and_batch():
  model = LinenNet()
  batches = _batches(16)
  batches[1] = batches[1].at[0, 3, 5].set(jnp.nan)
  params = model.init(jax.random.key(0), batches[0])
  with pytest.raises(ValueError, match=r"batch 1: NaN or Inf in the input of layers \['fc1', 'fc2'\]"):
    calibrate(lambda b: model.apply(params, b), batches, progress=False)


def test_linen_scan_is_a_clear_error():
  """nn.scan's body may not hold the recording callbacks: the error says so, not Flax's
  'broadcasted variable has a data dependency on the scan body'."""
  class Step(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return x + nn.Dense(16, name="fc")(x), None

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(Step, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=2)(name="steps")(x, None)[0]

  model = Scanned()
  batches = _batches(16)
  params = model.init(jax.random.key(0), batches[0])
  with pytest.raises(ValueError, match="cannot watch linear layers inside flax.linen.scan"):
    calibrate(lambda b: model.apply(params, b), batches, progress=False)


def test_no_linear_called_is_an_error():
  with pytest.raises(ValueError, match="saw no linear layer"):
    calibrate(lambda b: b * 2, _batches(4), progress=False)


def test_no_batches_is_an_error():
  """An empty (or used-up) iterable is named as such, not as a model that calls nothing."""
  model = nn.Dense(8)
  batches = iter(_batches(16, n=2))
  params = model.init(jax.random.key(0), _batches(16, n=1)[0])
  calibrate(lambda b: model.apply(params, b), batches, progress=False)
  with pytest.raises(ValueError, match="got no batches"):
    calibrate(lambda b: model.apply(params, b), batches, progress=False)


def test_from_inputs_and_validate():
  x = np.random.default_rng(0).standard_normal((4, 8, 16)).astype(np.float32)
  st = LayerStats.from_inputs(x)
  assert st.samples.shape == (32, 16) and st.num_tokens == 32
  st.validate("l", 16)
  with pytest.raises(ValueError, match="layer l: .* K=12"):
    st.validate("l", 12)
  st.samples[0, 0] = np.inf
  with pytest.raises(ValueError, match="layer l: calibration statistics contain NaN or Inf"):
    st.validate("l", 16)


def test_from_inputs_rejects_nan():
  import numpy as np
  import pytest
  from svdq_jax.calibrate import LayerStats
  with pytest.raises(ValueError, match="NaN or Inf"):
    LayerStats.from_inputs(np.full((4, 8), np.nan, np.float32))
