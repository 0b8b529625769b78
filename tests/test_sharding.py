"""Data- and sequence-parallel sampling over a device mesh (issue 17), on 4 fake CPU devices
in a fresh process (the device count is fixed when jax starts)."""

import os
import subprocess
import sys
import textwrap

PREAMBLE = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import svdq_jax
    from svdq_jax import parallel
    from svdq_jax.models import flux, sampling
    from svdq_jax.models.flux import Flux, FluxConfig
    assert len(jax.devices()) == 4, jax.devices()
    cfg = FluxConfig(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                     hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1,
                     axes_dim=(8, 12, 12), guidance_embed=True)
    model = Flux(cfg, nnx.Rngs(0))
    """)


def _run(script: str) -> str:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", PREAMBLE + script], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc.stdout


SCRIPT = textwrap.dedent("""
    b = 3                                    # not a multiple of 4: padded
    noise = jax.random.normal(jax.random.key(0), (b, 4, 8, 8))
    txt = jax.random.normal(jax.random.key(1), (b, 8, 32))
    y = jax.random.normal(jax.random.key(2), (b, 32))
    sigmas = sampling.schedule(3, 16)
    one = sampling.sample(model, noise, txt, jnp.zeros((8, 3)), y, sigmas, guidance=3.5)
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    four = sampling.sample(model, noise, txt, jnp.zeros((8, 3)), y, sigmas, guidance=3.5,
                           mesh=mesh)
    assert four.shape == one.shape
    print("devices", len(four.devices()))
    assert len(four.devices()) == 4          # computed on all four
    err = float(jnp.abs(four - one).max() / jnp.abs(one).max())
    print("max rel diff", err)
    assert err < 1e-5, err
    in_loop = sampling.sample(model, noise, txt, jnp.zeros((8, 3)), y, sigmas, guidance=3.5,
                              mesh=mesh, hoist_modulation=False)   # modulations at every step
    assert len(in_loop.devices()) == 4
    assert float(jnp.abs(in_loop - one).max() / jnp.abs(one).max()) < 1e-5
    """)


def test_data_parallel_sampling_equals_one_device():
  assert "max rel diff" in _run(SCRIPT)


SEQUENCE_SCRIPT = textwrap.dedent("""
    noise = jax.random.normal(jax.random.key(0), (1, 4, 8, 8))   # 16 image tokens
    txt = jax.random.normal(jax.random.key(1), (1, 8, 32))
    y = jax.random.normal(jax.random.key(2), (1, 32))
    sigmas = sampling.schedule(3, 16)
    # a W4A8 SVDQuant model, calibrated on its own trajectory
    steps = sampling.trajectory_inputs(model, noise, txt, jnp.zeros((8, 3)), y, sigmas, 3.5)
    calib = svdq_jax.calibrate(lambda a: model(*a), steps, model=model, progress=False)
    graph, state = nnx.split(model)
    qstate = svdq_jax.quantize(state, calib, flux.quant_config(
        "svdquant", "int4_2l", rank=4, act_fmt="int8", alpha_grid=2, lowrank_iters=1),
        progress=False)
    split = []
    original = parallel.split_tokens
    def counting(fn, layer, x, bias):
      out = original(fn, layer, x, bias)
      split.append((int(np.prod(x.shape[:-1])), out is not None))
      return out
    parallel.split_tokens = counting
    mesh = jax.make_mesh((4,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
    for name, st in (("float", state), ("w4a8", qstate)):
      m = nnx.merge(graph, st)
      one = sampling.sample(m, noise, txt, jnp.zeros((8, 3)), y, sigmas, guidance=3.5)
      split.clear()
      four = sampling.sample(m, noise, txt, jnp.zeros((8, 3)), y, sigmas, guidance=3.5,
                             mesh=mesh, parallel="sequence", hoist_modulation=False)
      assert len(four.devices()) == 4
      err = float(jnp.abs(four - one).max() / jnp.abs(one).max())
      print(name, "max rel diff", err, "layers", split)
      # the two programs' float parts differ by ulps (reassociation; the float model's err
      # ~1e-7); a quantized layer rounds its input (bf16 for the low-rank branch, int8 codes),
      # so now and then an ulp crosses a rounding midpoint and moves one value by a whole
      # bf16 / int8 step (measured: inputs 2.4e-7 apart gave low-rank outputs 1.8e-4 apart
      # with equal codes), which the sampling carries on. Per layer the split is exact (below).
      assert err < (1e-5 if name == "float" else 1e-2), err
      if name == "w4a8":  # every quantized layer over tokens ran on its own tokens per device;
        # the modulation linears (one vector per image) stay whole
        assert sum(done for _, done in split) == 10, split
        assert all(done == (m % 4 == 0) for m, done in split), split
        split.clear()   # modulations computed before the loop (the default): only token
        hoisted = sampling.sample(m, noise, txt, jnp.zeros((8, 3)), y, sigmas,  # layers in it
                                  guidance=3.5, mesh=mesh, parallel="sequence")
        assert float(jnp.abs(hoisted - one).max() / jnp.abs(one).max()) < 1e-2
        assert split and all(done for _, done in split), split
    # each quantized layer on its tokens split over the mesh equals the whole, bit for bit
    from svdq_jax.qlinear import QuantizedLinear, apply
    from svdq_jax.tree import find_kernels
    layers = [k for k in find_kernels(qstate, quantized=True).values()
              if isinstance(k, QuantizedLinear)]
    assert len(layers) > 5, len(layers)
    for layer in layers:
      x = jax.random.normal(jax.random.key(3), (16, layer.in_features))
      whole = jax.jit(lambda l, x: apply(l, x))(layer, x)
      split.clear()
      with parallel.tokens_over(mesh):
        parts = jax.jit(lambda l, x: apply(l, x))(layer, x)
      assert split == [(16, True)], split
      np.testing.assert_array_equal(np.asarray(parts), np.asarray(whole))
    try:
      sampling.sample(m, jax.random.normal(jax.random.key(0), (1, 4, 6, 6)), txt,
                      jnp.zeros((8, 3)), y, sigmas, 3.5, mesh=mesh, parallel="sequence")
      raise SystemExit("9 image tokens over 4 devices should be refused")
    except ValueError as e:
      assert "multiple of the mesh" in str(e), e
    print("ok")
    """)


def test_sequence_parallel_sampling_equals_one_device():
  """One image's tokens over 4 devices: float and W4A8 models equal one device; the
  quantized layers run inside shard_map on each device's tokens."""
  out = _run(SEQUENCE_SCRIPT)
  assert "ok" in out, out


DEVICES_SCRIPT = textwrap.dedent("""
    import tempfile
    from svdq_jax import QuantConfig, Rule
    from svdq_jax.calibrate import LayerStats
    from svdq_jax.convert import load_flux, save_model
    from svdq_jax.qlinear import QuantizedLinear
    devs = jax.devices()
    # six layers of one shape over 4 devices (one compilation per device): equal to one device
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    x[:, :3] *= 30                              # outlier channels: the search has work to do
    params = {f"l{i}": {"kernel": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)}
              for i in range(6)}
    calib = {f"l{i}": LayerStats.from_inputs(x * (1 + i)) for i in range(6)}
    config = QuantConfig(rules=(Rule(".*", "svdquant", "int4_2l", act_fmt="int8", rank=4),),
                         alpha_grid=3, lowrank_iters=2)
    from svdq_jax import tree
    seen, original = set(), tree.quantize_group
    def recording(weights, *a, **k):
      seen.update(weights[0].devices())
      return original(weights, *a, **k)
    tree.quantize_group = recording
    one = svdq_jax.quantize(params, calib, config, progress=False)
    assert seen == {devs[0]}, seen
    seen.clear()
    four = svdq_jax.quantize(params, calib, config, progress=False, devices=devs)
    assert len(seen) > 1, seen                  # the work did spread
    for name in params:
      a, b = one[name]["kernel"], four[name]["kernel"]
      assert isinstance(b, QuantizedLinear)
      for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
        assert v.devices() == {devs[0]}, (name, v.devices())   # back with its kernel
    try:
      bad = dict(calib, l3=LayerStats.from_inputs(x[:, :32]))
      svdq_jax.quantize(params, bad, config, progress=False, devices=devs)
      raise SystemExit("a layer's error on a worker thread must reach the caller")
    except ValueError as e:
      assert "l3" in str(e), e
    # a (quantized) checkpoint restored straight onto a mesh: replicated, equal to one device
    graph, state = nnx.split(model)
    q = nnx.merge(graph, svdq_jax.quantize(state, None, flux.quant_config("w4a16_rtn"),
                                           progress=False))
    with tempfile.TemporaryDirectory() as d:
      save_model(d + "/q", q)
      mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      spread = nnx.state(load_flux(d + "/q", device=parallel.replicated(mesh)))
      single = nnx.state(load_flux(d + "/q"))
    n = 0
    for u, v in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(spread)):
      assert v.sharding == parallel.replicated(mesh), v.sharding
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
      n += 1
    print("ok", n)
    """)


def test_quantize_over_devices_and_restore_onto_a_mesh():
  """svdq_jax.quantize(..., devices=) equals one device bit for bit and returns every layer
  where its kernel was; a worker's error reaches the caller; a saved quantized model loads
  replicated onto a mesh straight from orbax."""
  out = _run(DEVICES_SCRIPT)
  assert "ok" in out, out
