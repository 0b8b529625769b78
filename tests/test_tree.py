"""svdq_jax.quantize over parameter trees: selection, structure, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import svdq_jax
from svdq_jax import LayerStats, QuantConfig, QuantizedLinear, Rule, preset
from svdq_jax.example import outlier_activations
from svdq_jax.layers import Linear


class Attn(nnx.Module):
  def __init__(self, d, rngs):
    self.q = Linear(d, d, rngs=rngs)
    self.k = Linear(d, d, rngs=rngs)
    self.v = Linear(d, d, rngs=rngs)
    self.o = Linear(d, d, rngs=rngs)
    self.norm = nnx.LayerNorm(d, rngs=rngs)

  def __call__(self, x):
    h = self.norm(x)
    a = jax.nn.softmax(self.q(h) @ jnp.swapaxes(self.k(h), -1, -2) / 8.0) @ self.v(h)
    return x + self.o(a)


class Net(nnx.Module):
  def __init__(self, d=128, rngs=None):
    self.embed = Linear(64, d, rngs=rngs)
    self.attn = Attn(d, rngs)
    self.head = Linear(d, 64, rngs=rngs)

  def __call__(self, x):
    return self.head(self.attn(self.embed(x)))


@pytest.fixture(scope="module")
def net_and_calib():
  model = Net(rngs=nnx.Rngs(0))
  batches = [outlier_activations(jax.random.key(i), 32, 64, outlier_channels=2)[None]
             for i in range(4)]
  calib = svdq_jax.calibrate(lambda b: model(b), batches, model=model, max_samples=64,
                             progress=False)
  return model, calib, batches


FAST = dict(alpha_grid=4, lowrank_iters=4)


def test_nnx_state_quantized_model_runs_jitted(net_and_calib):
  model, calib, batches = net_and_calib
  graph, state = nnx.split(model)
  cfg = QuantConfig(rules=(Rule("embed|head", "skip"), Rule("attn/.*", "svdquant", rank=8)),
                    **FAST)
  report = {}
  qstate = svdq_jax.quantize(state, calib, cfg, report=report, progress=False)
  assert isinstance(qstate, nnx.State)
  assert set(report) == {"attn/q", "attn/k", "attn/v", "attn/o"}
  # q, k, v share one input: one decomposition
  assert report["attn/q"] is report["attn/k"] is report["attn/v"]
  assert report["attn/o"] is not report["attn/q"]
  qmodel = nnx.merge(graph, qstate)
  assert isinstance(qmodel.attn.q.kernel.get_value(), QuantizedLinear)
  assert not isinstance(qmodel.embed.kernel.get_value(), QuantizedLinear)
  np.testing.assert_array_equal(np.asarray(qmodel.attn.q.kernel.get_value().lora_down),
                                np.asarray(qmodel.attn.v.kernel.get_value().lora_down))
  y = nnx.jit(lambda m, x: m(x))(qmodel, batches[0])
  y_ref = model(batches[0])
  rel = float(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref))
  assert 0 < rel < 0.05
  # a module in, a new module out, equal to the state route; the one passed in unchanged
  direct = svdq_jax.quantize(model, calib, cfg, progress=False)
  assert isinstance(direct, type(model)) and direct is not model
  assert not isinstance(model.attn.q.kernel.get_value(), QuantizedLinear)
  for a, b in zip(jax.tree_util.tree_leaves(nnx.state(direct)),
                  jax.tree_util.tree_leaves(qstate)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unselected_leaves_pass_through_untouched(net_and_calib):
  model, calib, _ = net_and_calib
  state = nnx.state(model)
  qstate = svdq_jax.quantize(state, calib, QuantConfig(rules=(Rule("attn/o", "rtn"),)),
                             progress=False)
  flat_in = dict(jax.tree_util.tree_flatten_with_path(state)[0])
  flat_out = jax.tree_util.tree_flatten_with_path(qstate)[0]
  for path, leaf in flat_out:
    if path in flat_in:
      assert leaf is flat_in[path]
  assert isinstance(qstate["attn"]["o"]["kernel"].get_value(), QuantizedLinear)
  assert qstate["attn"]["o"]["bias"].get_value() is state["attn"]["o"]["bias"].get_value()


def test_plain_dict_with_params_level_and_first_rule_wins():
  rng = np.random.default_rng(0)
  params = {"params": {"fc1": {"kernel": jnp.asarray(rng.standard_normal((128, 64)), jnp.float32),
                               "bias": jnp.zeros(64)},
                       "fc2": {"kernel": jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)},
                       "scale": jnp.ones(3)}}
  cfg = QuantConfig(rules=(Rule("fc1", "w4a16_rtn", "nvfp4"), Rule("fc.*", "rtn")))
  out = svdq_jax.quantize(params, None, cfg, progress=False)
  fc1, fc2 = out["params"]["fc1"]["kernel"], out["params"]["fc2"]["kernel"]
  assert (fc1.weight_format, fc1.act_format) == ("nvfp4", None)
  assert (fc2.weight_format, fc2.act_format) == ("int4", "int4")
  assert out["params"]["scale"] is params["params"]["scale"]
  x = jnp.asarray(rng.standard_normal((5, 128)), jnp.float32)
  ref = x @ params["params"]["fc1"]["kernel"]
  rel = jnp.linalg.norm(svdq_jax.apply(fc1, x) - ref) / jnp.linalg.norm(ref)
  assert float(rel) < 0.15


def _tree(k=128, n=64):
  return {"blk": {"lin": {"kernel": jnp.ones((k, n), jnp.float32)}}}


def _stats(k=128, tokens=16):
  return {"blk/lin": LayerStats.from_inputs(np.ones((tokens, k), np.float32))}


def test_error_k_not_multiple_of_group():
  with pytest.raises(ValueError, match="layer blk/lin: K=96 is not a multiple of the int4 group size 64"):
    svdq_jax.quantize(_tree(k=96), None, preset("rtn"), progress=False)
  with pytest.raises(ValueError, match="layer blk/lin: K=40 is not a multiple of the nvfp4 group size 16"):
    svdq_jax.quantize(_tree(k=40), None, preset("rtn", "nvfp4"), progress=False)


def test_error_rank_too_large():
  with pytest.raises(ValueError, match=r"layer blk/lin: rank 100 exceeds min\(K, N\) = 64"):
    svdq_jax.quantize(_tree(), _stats(), preset("svdquant", rank=100), progress=False)


def test_error_unknown_method_and_format():
  with pytest.raises(ValueError, match="unknown method 'gptq'"):
    Rule(".*", "gptq")
  with pytest.raises(ValueError, match=r"format must be one of \('int4', 'nvfp4', 'int4_2l'\)"):
    Rule(".*", "rtn", "int2")


def test_error_rule_selects_nothing():
  cfg = QuantConfig(rules=(Rule("blk/.*", "rtn"), Rule("other/.*", "rtn")))
  with pytest.raises(ValueError, match=r"rules select no layer: \['other/\.\*'\]; linear layers in the tree: blk/lin"):
    svdq_jax.quantize(_tree(), None, cfg, progress=False)


def test_error_missing_or_bad_calibration():
  with pytest.raises(ValueError, match="layer blk/lin: method 'svdquant' needs calibration"):
    svdq_jax.quantize(_tree(), {}, preset("svdquant", rank=8), progress=False)
  bad = _stats()
  bad["blk/lin"].absmax[3] = np.nan
  with pytest.raises(ValueError, match="layer blk/lin: calibration statistics contain NaN or Inf"):
    svdq_jax.quantize(_tree(), bad, preset("smoothquant"), progress=False)
  with pytest.raises(ValueError, match="layer blk/lin: calibration statistics have absmax"):
    svdq_jax.quantize(_tree(), _stats(k=64), preset("smoothquant"), progress=False)


def test_error_tree_without_kernels():
  with pytest.raises(ValueError, match="no linear layer found"):
    svdq_jax.quantize({"w": jnp.ones(3)}, None, preset("rtn"), progress=False)


def test_same_input_in_different_modules_is_not_shared():
  class Two(nnx.Module):
    def __init__(self, rngs):
      self.a = Attn(64, rngs)
      self.b = Attn(64, rngs)
      self.mod_a = Linear(64, 64, rngs=rngs)
      self.mod_b = Linear(64, 64, rngs=rngs)

    def __call__(self, x):
      return self.a(x) + self.b(x) + self.mod_a(x) + self.mod_b(x)

  model = Two(nnx.Rngs(0))
  x = outlier_activations(jax.random.key(0), 32, 64, outlier_channels=2)[None]
  calib = svdq_jax.calibrate(lambda b: model(b), [x], model=model, progress=False)
  report = {}
  svdq_jax.quantize(nnx.state(model), calib, QuantConfig(
      rules=(Rule(r"mod_.*", "w4a16"), Rule(r".*", "svdquant", rank=8)), **FAST),
      report=report, progress=False)
  assert report["a/q"] is report["a/k"] is report["a/v"]   # siblings, same input: shared
  assert report["a/q"] is not report["b/q"]                # same input, other attention
  assert report["mod_a"] is not report["mod_b"]            # weight-only: never shared
