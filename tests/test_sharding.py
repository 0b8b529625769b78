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
                             mesh=mesh, parallel="sequence")
      assert len(four.devices()) == 4
      err = float(jnp.abs(four - one).max() / jnp.abs(one).max())
      print(name, "max rel diff", err, "layers", split)
      assert err < 1e-5, err
      if name == "w4a8":  # every quantized layer over tokens ran on its own tokens per device;
        # the modulation linears (one vector per image) stay whole
        assert sum(done for _, done in split) == 10, split
        assert all(done == (m % 4 == 0) for m, done in split), split
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
