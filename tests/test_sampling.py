"""Sampling: packing, ids, schedule, deterministic jitted Euler loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flux_helpers import w4a8_model
from svdq_jax.models import sampling
from svdq_jax.models.flux import Flux, FluxConfig

TINY = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=8, context_in_dim=16,
                  hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1,
                  axes_dim=(8, 12, 12))


def test_pack_unpack_round_trip_and_patch_order():
  z = jnp.arange(2 * 16 * 4 * 6, dtype=jnp.float32).reshape(2, 16, 4, 6)
  x = sampling.pack_latents(z)
  assert x.shape == (2, 6, 64)
  # token (row 1, col 2) channel block c holds z[c, 2:4, 4:6] flattened (ph, pw)
  np.testing.assert_array_equal(np.asarray(x[0, 1 * 3 + 2, 5 * 4:5 * 4 + 4]),
                                np.asarray(z[0, 5, 2:4, 4:6]).reshape(-1))
  np.testing.assert_array_equal(np.asarray(sampling.unpack_latents(x, 4, 6)), np.asarray(z))
  with pytest.raises(ValueError, match="must be even"):
    sampling.pack_latents(jnp.zeros((1, 16, 3, 4)))


def test_image_ids():
  ids = np.asarray(sampling.image_ids(4, 6))
  assert ids.shape == (6, 3)
  np.testing.assert_array_equal(ids[4], [0, 1, 1])


def test_schedule_shift():
  s = sampling.schedule(4, 4096)
  assert s[0] == 1.0 and s[-1] == 0.0 and np.all(np.diff(s) < 0)
  mu = 1.15  # 4096 tokens
  t = 0.5
  assert s[2] == pytest.approx(np.exp(mu) / (np.exp(mu) + (1 / t - 1)), rel=1e-6)
  np.testing.assert_allclose(sampling.schedule(4, 256, shift=False), [1, 0.75, 0.5, 0.25, 0])
  with pytest.raises(ValueError):
    sampling.schedule(0, 256)


def test_sampler_is_deterministic_and_matches_a_python_loop():
  model = Flux(TINY, nnx.Rngs(0))
  noise = jax.random.normal(jax.random.key(1), (1, 16, 4, 4))
  txt = jax.random.normal(jax.random.key(2), (1, 3, 16))
  tids = jnp.zeros((3, 3))
  y = jax.random.normal(jax.random.key(3), (1, 8))
  sig = sampling.schedule(3, 4)
  a = sampling.sample(model, noise, txt, tids, y, sig, guidance=3.5)
  b = sampling.sample(model, noise, txt, tids, y, sig, guidance=3.5, progress=True)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = sampling.pack_latents(noise)
  ids = sampling.image_ids(4, 4)
  for t, tn in zip(sig[:-1], sig[1:]):
    x = x + (tn - t) * model(x, ids, txt, tids, jnp.full((1,), t), y, jnp.full((1,), 3.5))
  np.testing.assert_allclose(np.asarray(a), np.asarray(sampling.unpack_latents(x, 4, 4)),
                             rtol=1e-4, atol=1e-4)


def test_the_sampling_loop_retraces_when_a_kernel_switch_changes(monkeypatch):
  """The jitted loop takes ``qlinear.trace_settings()`` as a static argument: a layer
  backend or kernel switch set after a first sample applies to the next one."""
  from svdq_jax import qlinear
  from svdq_jax.pallas_kernels import int8_hopper

  model = Flux(TINY, nnx.Rngs(0))
  noise = jax.random.normal(jax.random.key(1), (1, 16, 4, 4))
  args = (jax.random.normal(jax.random.key(2), (1, 3, 16)), jnp.zeros((3, 3)),
          jax.random.normal(jax.random.key(3), (1, 8)), sampling.schedule(2, 4))
  sampling.sample(model, noise, *args, guidance=3.5)
  traced = sampling._euler._cache_size()
  sampling.sample(model, noise, *args, guidance=3.5)
  assert sampling._euler._cache_size() == traced          # nothing changed: no retrace
  with qlinear.backend("reference"):
    sampling.sample(model, noise, *args, guidance=3.5)
  monkeypatch.setattr(int8_hopper, "SPLIT_STORE", not int8_hopper.SPLIT_STORE)
  sampling.sample(model, noise, *args, guidance=3.5)
  assert sampling._euler._cache_size() == traced + 2


def test_a_traced_sample_call_does_not_walk_the_model_graph(monkeypatch):
  """sample() hands the model to its jitted loop as a pytree: once traced, a call does not
  run nnx.split (a Python walk of the whole graph, ~30 ms a call for FLUX.1-dev)."""
  model = Flux(TINY, nnx.Rngs(0))
  noise = jax.random.normal(jax.random.key(1), (1, 16, 4, 4))
  args = (jax.random.normal(jax.random.key(2), (1, 3, 16)), jnp.zeros((3, 3)),
          jax.random.normal(jax.random.key(3), (1, 8)), sampling.schedule(2, 4))
  first = sampling.sample(model, noise, *args, guidance=3.5)
  calls = []
  split = nnx.split
  monkeypatch.setattr(nnx, "split", lambda *a, **k: calls.append(1) or split(*a, **k))
  again = sampling.sample(model, noise, *args, guidance=3.5)
  assert not calls
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))


def test_trace_settings_do_not_change_when_a_kernel_module_is_first_imported():
  """A kernel module first imported while the loop traces (the Hopper GEMMs are imported on
  first use) must not change the settings the loop was traced with: the second sample()
  traced again (on a CPU, 15 s at FLUX.1-dev's depth). A fresh interpreter, where nothing
  has imported them yet."""
  import subprocess
  import sys
  code = ("from svdq_jax import qlinear; first = qlinear.trace_settings()\n"
          "import pkgutil, importlib; from svdq_jax import pallas_kernels\n"
          "for m in pkgutil.iter_modules(pallas_kernels.__path__):\n"
          "  importlib.import_module('svdq_jax.pallas_kernels.' + m.name)\n"
          "assert qlinear.trace_settings() == first, (first, qlinear.trace_settings())\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]


def _kernel_switches():
  """Every on/off switch of the kernel modules: their ``set_*(flag: bool)`` functions."""
  import importlib
  import inspect
  import pkgutil

  from svdq_jax import pallas_kernels
  found = []
  for info in pkgutil.iter_modules(pallas_kernels.__path__):
    mod = importlib.import_module(f"svdq_jax.pallas_kernels.{info.name}")
    for name, fn in inspect.getmembers(mod, inspect.isfunction):
      params = list(inspect.signature(fn).parameters.values())
      if (name.startswith("set_") and fn.__module__ == mod.__name__ and len(params) == 1
          and params[0].annotation in (bool, "bool")):
        found.append(pytest.param(mod, fn, id=f"{info.name}.{name}"))
  return found


@pytest.mark.parametrize("mod,setter", _kernel_switches())
def test_every_kernel_switch_is_a_trace_setting(monkeypatch, mod, setter):
  """Each kernel module's on/off switch (found by its ``set_*(bool)`` signature, so a new one
  is checked too) changes ``qlinear.trace_settings()``, so the jitted loop retraces when it
  flips (a switch missing there silently kept the first trace)."""
  from svdq_jax import qlinear
  for name, value in list(vars(mod).items()):   # the module's flags, restored after the test
    if isinstance(value, bool):
      monkeypatch.setattr(mod, name, value)
  setter(False)
  off = qlinear.trace_settings()
  setter(True)
  assert qlinear.trace_settings() != off


def test_switch_discovery_finds_the_known_switches():
  names = {p.id for p in _kernel_switches()}
  assert {"w4a4.set_input_parts", "w4a16_gemv.set_enabled", "w4a8_hopper.set_three_warpgroups",
          "w4a8_hopper.set_three_warpgroups_gelu"} <= names and len(names) >= 7, names


def test_hoisting_weight_work_out_of_the_loop_changes_nothing():
  """sample(hoist_weights=True): the quantized layers' int8 weights and other weight-only
  operands computed once before the jitted loop give the same latents as at every step, on
  the kernels (interpret mode)."""
  from svdq_jax import qlinear

  # f32 layers: the int8 GEMM takes N in steps of 128. Single blocks only: one chain of
  # interpreted kernels, none in flight beside another (tests/conftest.py)
  cfg = dataclasses.replace(TINY, hidden_size=128, axes_dim=(16, 24, 24), depth=0,
                            depth_single_blocks=2)
  model = Flux(cfg, nnx.Rngs(0))
  noise = jax.random.normal(jax.random.key(1), (1, 16, 4, 4))
  args = (jax.random.normal(jax.random.key(2), (1, 3, 16)), jnp.zeros((3, 3)),
          jax.random.normal(jax.random.key(3), (1, 8)), sampling.schedule(1, 4))
  qmodel = w4a8_model(model, sampling.trajectory_inputs(model, noise, *args, guidance=3.5), 4)
  with qlinear.backend("interpret"):
    out = [sampling.sample(qmodel, noise, *args, guidance=3.5, hoist_weights=h)
           for h in (False, True)]
  np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(out[0]))
  assert float(jnp.abs(out[0]).max()) > 0


def _bf16_w4a8(cfg):
  """(a bf16 FLUX model of ``cfg`` with W4A8 attention and MLP linears, calibrated on one
  step's inputs; those inputs (img, img_ids, txt, txt_ids, t, y, guidance): activations in
  bf16, positions as they are)."""
  graph, state = nnx.split(Flux(cfg, nnx.Rngs(0)))
  model = nnx.merge(graph, jax.tree.map(lambda a: a.astype(jnp.bfloat16), state))
  noise = jax.random.normal(jax.random.key(1), (1, 16, 4, 4))
  args = (jax.random.normal(jax.random.key(2), (1, 3, 16)), jnp.zeros((3, 3)),
          jax.random.normal(jax.random.key(3), (1, 8)), sampling.schedule(1, 4))
  (inputs,) = sampling.trajectory_inputs(model, noise, *args, guidance=3.5)
  inputs = tuple(a if i in (1, 3) or a is None else a.astype(jnp.bfloat16)
                 for i, a in enumerate(inputs))
  return w4a8_model(model, [inputs], 4), inputs


def test_single_block_input_parts_reach_the_activation_kernel():
  """FLUX's single blocks hand linear2 ``(attn, Gelu(qkv_mlp, start=3 hidden))``: on the
  kernels (interpret mode, Pallas activation path) the kernel receives the parts unjoined,
  the MLP half GELU'd by linear1's epilogue (or, with set_epilogue_gelu(False), still to be
  GELU'd; with set_epilogue_row_max, with linear2's token maxima over it from linear1's
  epilogue), as an array of its own (linear1 in two launches, ``set_split_gelu``) or the
  tail of linear1's output (one launch), and the model's output equals the one with the
  parts joined by XLA first, bit for bit."""
  from svdq_jax import qlinear
  from svdq_jax.pallas_kernels import act_rowscaled, w4a4

  # bf16, so that the GELU's every operation is rounded alike in kernel and XLA; single
  # blocks only: one chain of interpreted kernels (tests/conftest.py)
  cfg = dataclasses.replace(TINY, hidden_size=128, axes_dim=(16, 24, 24), depth=0,
                            depth_single_blocks=1)
  qmodel, inputs = _bf16_w4a8(cfg)
  seen = []
  kernel = act_rowscaled.quantize_rows_folded

  def spy(x, *a, **kw):
    seen.append([(p.x.shape, p.start, p.applied) + (("row_max",) if p.row_max is not None
                                                    else ())
                 if isinstance(p, qlinear.Gelu) else p.shape
                 for p in (x if isinstance(x, tuple) else (x,))])
    return kernel(x, *a, **kw)

  default_act, outs = w4a4.act_kernel(), []
  act_rowscaled.quantize_rows_folded = spy
  w4a4.set_act_kernel("pallas")
  try:
    with qlinear.backend("interpret"):
      for parts, epilogue, row_max, split in (
          (True, True, False, True), (True, False, False, True), (False, True, False, True),
          (True, True, True, True), (True, True, True, False)):
        w4a4.set_input_parts(parts)
        w4a4.set_epilogue_gelu(epilogue)
        w4a4.set_epilogue_row_max(row_max)
        w4a4.set_split_gelu(split)
        outs.append(np.asarray(jax.jit(lambda *a: qmodel(*a))(*inputs)))
  finally:
    act_rowscaled.quantize_rows_folded = kernel
    w4a4.set_act_kernel(default_act)
    w4a4.set_input_parts(True)
    w4a4.set_epilogue_gelu(True)
    w4a4.set_epilogue_row_max(True)
    w4a4.set_split_gelu(True)
  mlp = cfg.mlp_dim
  tokens = 3 + 4
  # linear2, unjoined: GELU'd by linear1 (its own array: two launches) or still to be
  assert [(tokens, 128), ((tokens, mlp), 0, True)] in seen
  assert [(tokens, 128), ((tokens, 3 * 128 + mlp), 3 * 128, False)] in seen
  assert [(tokens, 128 + mlp)] in seen                                 # linear2, joined
  assert [(tokens, 128), ((tokens, mlp), 0, True, "row_max")] in seen
  assert [(tokens, 128), ((tokens, 3 * 128 + mlp), 3 * 128, True, "row_max")] in seen  # one
  for out in outs:
    np.testing.assert_array_equal(out, outs[2])
  assert np.abs(outs[0].astype(np.float32)).max() > 0


def test_gated_residuals_keep_the_expressions_values():
  """FLUX's blocks hand their gated residuals to the branch's last linear (``residual=``): a
  bf16 W4A8 model on the CPU gives the same output, bit for bit, as with each such linear's
  output summed as ``x + gate * out`` by the caller, XLA's fusions of the sums into the
  LayerNorms after them included (a residual spelled out as an f32 sum cast to bf16 moved
  the CPU demo's values, 2026-12-06)."""
  from svdq_jax import layers

  qmodel, inputs = _bf16_w4a8(dataclasses.replace(TINY, hidden_size=128, axes_dim=(16, 24, 24)))
  given = jax.jit(lambda *a: qmodel(*a))(*inputs)
  real, summed = layers.apply, []

  def by_the_caller(kernel, x, bias=None, gelu_from=None, feeds=None, residual=None):
    if residual is None:
      return real(kernel, x, bias, gelu_from, feeds)
    summed.append(kernel.out_features)
    r, gate = residual
    return r + gate * real(kernel, x, bias, gelu_from, feeds)

  layers.apply = by_the_caller
  try:
    caller = jax.jit(lambda *a: qmodel(*a))(*inputs)
  finally:
    layers.apply = real
  assert len(summed) == 5   # proj, fc2 of both streams; linear2
  np.testing.assert_array_equal(np.asarray(given, np.float32), np.asarray(caller, np.float32))


@pytest.mark.parametrize("quantized", [False, True])
def test_hoisting_the_modulations_out_of_the_loop(quantized):
  """sample(hoist_modulation=True): every step's modulations computed before the loop as one
  batch (``Flux.modulations`` of ``Flux.conditioning`` over [steps, B]) give the latents of
  the per-step ones, for a float model and a quantized one (W4A16 modulation linears, the
  rest W4A8; reference numerics). ``mods`` given to the model equal its own, bit for bit."""
  import svdq_jax
  from svdq_jax.models import flux

  model = Flux(dataclasses.replace(TINY, depth=2, depth_single_blocks=2), nnx.Rngs(0))
  noise = jax.random.normal(jax.random.key(1), (2, 16, 4, 4))
  txt = jax.random.normal(jax.random.key(2), (2, 3, 16))
  y = jax.random.normal(jax.random.key(3), (2, 8))
  args = (txt, jnp.zeros((3, 3)), y, sampling.schedule(4, 4))
  if quantized:
    steps = sampling.trajectory_inputs(model, noise, *args, guidance=3.5)
    calib = svdq_jax.calibrate(lambda a: model(*a), steps, model=model, progress=False)
    graph, state = nnx.split(model)
    config = flux.quant_config("svdquant", "int4_2l", rank=4, act_fmt="int8", alpha_grid=1,
                               lowrank_iters=1)
    model = nnx.merge(graph, svdq_jax.quantize(state, calib, config, progress=False))
  out = [np.asarray(sampling.sample(model, noise, *args, guidance=3.5, hoist_modulation=h))
         for h in (False, True)]
  np.testing.assert_array_equal(out[1], out[0])   # bit for bit on the CPU
  assert np.abs(out[0]).max() > 0

  x = sampling.pack_latents(noise)
  ids, t, g = sampling.image_ids(4, 4), jnp.full((2,), 0.5), jnp.full((2,), 3.5)
  mods = model.modulations(model.conditioning(t, y, g, jnp.float32))
  np.testing.assert_array_equal(np.asarray(model(x, ids, *args[:2], t, y, g, mods=mods)),
                                np.asarray(model(x, ids, *args[:2], t, y, g)))
