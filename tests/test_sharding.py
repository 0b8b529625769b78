"""Data-parallel sampling over a device mesh (issue 17), on 4 fake CPU devices in a fresh
process (the device count is fixed when jax starts)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from svdq_jax.models import sampling
    from svdq_jax.models.flux import Flux, FluxConfig
    assert len(jax.devices()) == 4, jax.devices()
    cfg = FluxConfig(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                     hidden_size=64, num_heads=2, depth=1, depth_single_blocks=1,
                     axes_dim=(8, 12, 12), guidance_embed=True)
    model = Flux(cfg, nnx.Rngs(0))
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
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "max rel diff" in proc.stdout
