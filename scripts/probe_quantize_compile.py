"""One-off probe: time of quantize_group's first call (compiles) per new weight shape."""
import os, sys, time
import jax, jax.numpy as jnp
from svdq_jax import transforms
from svdq_jax.config import QuantConfig, Rule, method_spec

cfg = QuantConfig(rules=(Rule(".*", "svdquant", "int4_2l", act_fmt="int8"),), alpha_grid=1, lowrank_iters=1)
spec = method_spec("svdquant", "int4_2l", False, "int8")
for k, n in ((3072, 3072), (3072, 12288), (12288, 3072)):
  key = jax.random.PRNGKey(0)
  w = jax.random.normal(key, (k, n)) * 0.02
  xs = jax.random.normal(key, (256, k))
  for call in range(2):
    t0 = time.perf_counter()
    (layer,), rep = transforms.quantize_group([w], spec, 32, None, cfg, key, jnp.max(jnp.abs(xs), 0), xs)
    jax.block_until_ready(layer)
    print(os.environ.get("XLA_FLAGS", "default"), k, n, "call", call, round(time.perf_counter() - t0, 2), "s", flush=True)
