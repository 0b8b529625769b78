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
  with pytest.raises(ValueError, match="^layer blk/lin: calibration statistics contain NaN or Inf"):
    svdq_jax.quantize(_tree(), bad, preset("smoothquant"), progress=False)
  with pytest.raises(ValueError, match="^layer blk/lin: calibration statistics have absmax"):
    svdq_jax.quantize(_tree(), _stats(k=64), preset("smoothquant"), progress=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_error_kernel_not_finite(bad):
  """A NaN or Inf in a kernel is named, for every method (RTN and SVDQuant would otherwise
  hide it in codes and scales or spread it through the decomposition)."""
  tree = _tree()
  tree["blk"]["lin"]["kernel"] = tree["blk"]["lin"]["kernel"].at[3, 5].set(bad)
  with pytest.raises(ValueError, match="^layer blk/lin: kernel holds NaN or Inf"):
    svdq_jax.quantize(tree, None, preset("rtn"), progress=False)
  with pytest.raises(ValueError, match="^layer blk/lin: kernel holds NaN or Inf"):
    svdq_jax.quantize(tree, _stats(), preset("svdquant", rank=8), progress=False)
  with pytest.raises(ValueError, match=r"^layer \(root\): kernel holds NaN or Inf"):
    svdq_jax.quantize({"kernel": tree["blk"]["lin"]["kernel"]}, None, preset("rtn"),
                      progress=False)


def test_errors_name_a_bare_linear_the_root():
  """A kernel at the tree's top (a bare ``nnx.Linear`` quantized) has the empty path."""
  tree = {"kernel": jnp.ones((96, 64), jnp.float32)}
  with pytest.raises(ValueError, match=r"^layer \(root\): K=96 is not a multiple"):
    svdq_jax.quantize(tree, None, preset("rtn"), progress=False)
  tree = {"kernel": jnp.ones((128, 64), jnp.float32)}
  with pytest.raises(ValueError, match=r"^layer \(root\): method 'svdquant' needs calibration"):
    svdq_jax.quantize(tree, {}, preset("svdquant", rank=8), progress=False)


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


class FlaxLinears(nnx.Module):
  """A model written with Flax's own nnx.Linear (not svdq_jax.layers.Linear)."""

  def __init__(self, rngs, general=False):
    self.fc1 = nnx.Linear(128, 128, rngs=rngs)
    self.fc2 = (nnx.LinearGeneral(128, 64, rngs=rngs) if general
                else nnx.Linear(128, 64, rngs=rngs))

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x)))


def _flax_batches():
  return [outlier_activations(jax.random.key(i), 32, 128, outlier_channels=2)[None]
          for i in range(2)]


def test_nnx_linear_model_runs_quantized_as_written():
  """quantize on a module of plain nnx.Linears returns one that runs (eager and jitted), each
  quantized layer's output its QuantizedLinear's (``svdq_jax.apply``); the input unchanged."""
  model = FlaxLinears(nnx.Rngs(0))
  batches = _flax_batches()
  calib = svdq_jax.calibrate(lambda b: model(b), batches, model=model, progress=False)
  cfg = QuantConfig(rules=(Rule("fc2", "skip"), Rule(".*", "svdquant", fmt="int4_2l",
                                                     act_fmt="int8", rank=8)), **FAST)
  qmodel = svdq_jax.quantize(model, calib, cfg, progress=False)
  assert type(qmodel.fc1) is Linear and type(qmodel.fc2) is nnx.Linear   # fc2 not quantized
  assert type(model.fc1) is nnx.Linear
  x = batches[0]
  kernel = qmodel.fc1.kernel.get_value()
  want = qmodel.fc2(jax.nn.gelu(svdq_jax.apply(kernel, x, qmodel.fc1.bias.get_value())))
  np.testing.assert_array_equal(np.asarray(qmodel(x)), np.asarray(want))
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(qmodel, x)),
                             np.asarray(want), rtol=1e-5, atol=1e-5)
  ref = model(x)
  assert 0 < float(jnp.linalg.norm(qmodel(x) - ref) / jnp.linalg.norm(ref)) < 0.05


def test_flax_module_that_cannot_run_a_quantized_kernel_is_named_before_the_work():
  model = FlaxLinears(nnx.Rngs(0), general=True)
  calib = svdq_jax.calibrate(lambda b: model(b), _flax_batches(), model=model, progress=False)
  with pytest.raises(ValueError, match=r"layer fc2 is a Flax LinearGeneral, which cannot run "
                                       r"a quantized kernel .*Rule\('fc2', 'skip'\)"):
    svdq_jax.quantize(model, calib, preset("rtn"), progress=False)
  # checked first: before the plan finds that svdquant has no calibration data here
  with pytest.raises(ValueError, match="layer fc2 is a Flax LinearGeneral"):
    svdq_jax.quantize(model, None, preset("svdquant"), progress=False)
  # skipped, it stays as it is
  out = svdq_jax.quantize(model, calib, QuantConfig(rules=(Rule("fc2", "skip"),
                                                           Rule(".*", "rtn"))), progress=False)
  assert type(out.fc1) is Linear and type(out.fc2) is nnx.LinearGeneral


def test_linen_dense_runs_quantized_inside_quantized_dense():
  """Linen nn.Dense layers with quantized kernels run them inside ``quantized_dense()``
  (each layer's output its QuantizedLinear's, jitted too); nn.DenseGeneral raises."""
  import flax.linen as nn
  from svdq_jax.layers import quantized_dense

  class Mlp(nn.Module):
    general: bool = False

    @nn.compact
    def __call__(self, x):
      h = nn.gelu(nn.Dense(128, name="fc1")(inputs=x))   # its argument by name too
      return (nn.DenseGeneral(64, name="fc2") if self.general else
              nn.Dense(64, name="fc2", dtype=jnp.bfloat16))(h)

  x = _flax_batches()[0]
  model = Mlp()
  params = model.init(jax.random.key(0), x)
  calib = svdq_jax.calibrate(lambda b: model.apply(params, b), _flax_batches(), progress=False)
  assert set(calib) == {"fc1", "fc2"}
  qparams = svdq_jax.quantize(params, calib, preset("svdquant", "int4_2l", rank=8,
                                                    act_fmt="int8", **FAST), progress=False)
  fc1, fc2 = (qparams["params"][n] for n in ("fc1", "fc2"))
  want = svdq_jax.apply(fc2["kernel"], jax.nn.gelu(
      svdq_jax.apply(fc1["kernel"], x, fc1["bias"])).astype(jnp.bfloat16), fc2["bias"])
  with quantized_dense():
    got = model.apply(qparams, x)
  assert got.dtype == jnp.bfloat16   # fc2's dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))

  @jax.jit
  def run(p, x):
    with quantized_dense():
      return model.apply(p, x)
  np.testing.assert_allclose(np.asarray(run(qparams, x), np.float32),
                             np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
  ref = model.apply(params, x).astype(jnp.float32)
  # a random-init MLP's W4A8 error (0.067 measured), far from a wrong layer's ~1
  assert 0 < float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 0.15
  # the float model runs as before inside it
  with quantized_dense():
    np.testing.assert_array_equal(np.asarray(model.apply(params, x)), np.asarray(ref))

  general = Mlp(general=True)
  gparams = general.init(jax.random.key(0), x)
  gq = svdq_jax.quantize(gparams, calib, preset("rtn"), progress=False)
  with quantized_dense(), pytest.raises(ValueError, match="layer fc2 is a Flax DenseGeneral"):
    general.apply(gq, x)


def test_quantized_nnx_linear_model_saved_and_restored_runs(tmp_path):
  """``convert.save_model`` / ``restore_model`` on a model of plain nnx.Linears: the restored
  model runs its quantized layers, bit for bit as before saving."""
  import dataclasses

  from svdq_jax.convert.checkpoint import restore_model, save_model

  @dataclasses.dataclass(frozen=True)
  class Cfg:
    general: bool = False

  class Model(FlaxLinears):
    def __init__(self, cfg, rngs):
      super().__init__(rngs, cfg.general)
      self.cfg = cfg

  model = Model(Cfg(), nnx.Rngs(0))
  qmodel = svdq_jax.quantize(model, None, preset("rtn"), progress=False)
  save_model(tmp_path / "q", qmodel)
  restored = restore_model(tmp_path / "q", Model, Cfg)
  assert type(restored.fc1) is Linear and type(restored.fc2) is Linear
  x = _flax_batches()[0]
  np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(qmodel(x)))


def _same_leaves(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_quantize_only_some_layers_then_merged_equals_one_call(net_and_calib):
  """``only``: disjoint calls keep a full call's random keys, so their layers merged give
  its result bit for bit; a path of a shared decomposition brings its siblings along."""
  from svdq_jax.tree import find_kernels, replace_kernels
  model, calib, _ = net_and_calib
  state = nnx.state(model)
  cfg = QuantConfig(rules=(Rule(".*", "svdquant", rank=8),), **FAST)
  full = svdq_jax.quantize(state, calib, cfg, progress=False)
  first = svdq_jax.quantize(state, calib, cfg, progress=False, only=["attn/q", "head"])
  quantized = {p for p, k in find_kernels(first, quantized=True).items()
               if isinstance(k, QuantizedLinear)}
  assert quantized == {"attn/q", "attn/k", "attn/v", "head"}
  rest = svdq_jax.quantize(state, calib, cfg, progress=False, only=["embed", "attn/o"])
  merged = replace_kernels(state, {p: k for t in (first, rest)
                                   for p, k in find_kernels(t, quantized=True).items()
                                   if isinstance(k, QuantizedLinear)})
  _same_leaves(merged, full)
  with pytest.raises(ValueError, match=r"only= names layers the config does not select: "
                                       r"\['attn/x'\]"):
    svdq_jax.quantize(state, calib, cfg, progress=False, only=["attn/q", "attn/x"])


def test_gptq_hessians_a_few_layers_at_a_time_equal_one_pass(net_and_calib, monkeypatch,
                                                             capsys):
  """calibrate_and_quantize with a Hessian budget: one stats pass, then a pass per group of
  layers whose Hessians fit (here three), the result bit for bit the all-at-once one's."""
  from svdq_jax import tree
  model, _, batches = net_and_calib
  cfg = QuantConfig(rules=(Rule(".*", "svdquant", rank=8),), residual="gptq", **FAST)
  forward = lambda b: model(b)
  calib = svdq_jax.calibrate(forward, batches, model=model, max_samples=64, progress=False,
                             hessian=True)
  want = svdq_jax.quantize(model, calib, cfg, progress=False)
  groups = []
  real = tree.input_hessians
  monkeypatch.setattr(tree, "input_hessians", lambda *a, **k: groups.append(sorted(a[2]))
                      or real(*a, **k))
  # in plan order (k|q|v's one decomposition, o, embed, head; K = 128 but embed's 64):
  # k|q|v alone, o with embed, head alone
  got = svdq_jax.calibrate_and_quantize(forward, batches, model, cfg, max_samples=64,
                                        hessian_bytes=4 * (64 ** 2 + 128 ** 2),
                                        progress=False)
  assert groups == [["attn/k"], ["attn/o", "embed"], ["head"]]
  assert type(got) is type(model)
  _same_leaves(nnx.state(got), nnx.state(want))
  with pytest.raises(TypeError, match="give a sequence, not an iterator"):
    svdq_jax.calibrate_and_quantize(forward, iter(batches), model, cfg, hessian_bytes=1)
  for bad in (0, "all"):
    with pytest.raises(ValueError, match=f"hessian_bytes must be > 0 or 'auto', got {bad!r}"):
      svdq_jax.calibrate_and_quantize(forward, batches, model, cfg, hessian_bytes=bad)
  # 'auto': one pass where every Hessian (4 K^2 bytes a layer: 64 and 5 x 128) fits the
  # device's free memory or the device does not say; else half the free memory at a time
  need = 4 * (64 ** 2 + 5 * 128 ** 2)
  for free, passes in ((None, []), (need, []),
                       (need - 1, [["attn/k", "attn/o", "embed"], ["head"]])):
    groups.clear()
    monkeypatch.setattr(tree, "_device_free_bytes", lambda: free)
    got = svdq_jax.calibrate_and_quantize(forward, batches, model, cfg, max_samples=64,
                                          hessian_bytes="auto", progress=True)
    assert groups == passes, free
    _same_leaves(nnx.state(got), nnx.state(want))
    out = capsys.readouterr().out
    assert ("exceed the device's free memory" in out) == bool(passes)   # the budget is said
    assert ("GPTQ: 2 groups of Hessians" in out) == bool(passes), out   # and its groups
  # no budget: calibrate(hessian=True) and quantize, as before
  _same_leaves(nnx.state(svdq_jax.calibrate_and_quantize(forward, batches, model, cfg,
                                                         max_samples=64, progress=False)),
               nnx.state(want))


def test_gptq_hessians_in_passes_for_linen_params(monkeypatch):
  """calibrate_and_quantize on Linen params with a jitted forward (host f64 Hessians): a
  pass per layer at a budget of one 128-wide Hessian, giving the one-pass params bit for
  bit."""
  import flax.linen as nn
  from svdq_jax import tree

  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(64, name="fc2")(nn.gelu(nn.Dense(128, name="fc1")(x)))

  batches = _flax_batches()
  model = Mlp()
  params = model.init(jax.random.key(0), batches[0])
  forward = jax.jit(lambda b: model.apply(params, b))
  cfg = QuantConfig(rules=(Rule(".*", "svdquant", rank=8),), residual="gptq", **FAST)
  one = svdq_jax.calibrate_and_quantize(forward, batches, params, cfg, progress=False)
  groups = []
  real = tree.input_hessians
  monkeypatch.setattr(tree, "input_hessians", lambda *a, **k: groups.append(sorted(a[2]))
                      or real(*a, **k))
  two = svdq_jax.calibrate_and_quantize(forward, batches, params, cfg, progress=False,
                                        hessian_bytes=4 * 128 ** 2)
  assert groups == [["fc1"], ["fc2"]], groups
  assert isinstance(two["params"]["fc1"]["kernel"], QuantizedLinear)
  _same_leaves(two, one)


def test_quantized_state_saved_and_restored_without_a_like_tree(tmp_path):
  """save_tree writes the structure beside the checkpoint, so restore_tree(src) rebuilds a
  quantized tree (QuantizedLinear nodes, int keys of an nnx.List) with no like= given; put
  into the float model's abstract state it runs as the quantized model did."""
  from svdq_jax.convert import restore_tree, save_tree
  from svdq_jax.layers import runnable

  class Stack(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(128, 128, rngs=rngs) for _ in range(2)])

    def __call__(self, x):
      for layer in self.layers:
        x = jax.nn.gelu(layer(x))
      return x

  qmodel = svdq_jax.quantize(Stack(nnx.Rngs(0)), None, preset("rtn"), progress=False)
  save_tree(tmp_path / "ckpt", nnx.to_pure_dict(nnx.state(qmodel)))
  tree = restore_tree(tmp_path / "ckpt")
  assert isinstance(tree["layers"][1]["kernel"], QuantizedLinear)
  graph, state = nnx.split(nnx.eval_shape(lambda: Stack(nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, tree)
  restored = runnable(nnx.merge(graph, state))
  x = _flax_batches()[0]
  np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(qmodel(x)))
