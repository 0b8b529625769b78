"""Probe (one-off): what the GELU epilogue costs the W4A8 GEMM at linear1 (GELU on part of N)
and fc1 (on all of N), per tiling, with and without the next layer's maxima."""
import json, os
import jax, jax.numpy as jnp
from svdq_jax.pallas_kernels import act_rowscaled, w4a8_hopper
from svdq_jax.timing import median_seconds
from bench_w4a4 import activations, make_layer

M, K, R = 4608, 3072, 32
out = {}
for n, gfs in ((21504, (None, 9216, 0)), (12288, (None, 0))):
  key = jax.random.key(n)
  x = activations(M, K, key)
  layer = make_layer(K, n, R, jax.random.key(1), "int4_2l", "int8")
  a, sa, lr = act_rowscaled.reference(x, layer.smooth, layer.lora_down, "int8")
  lr16 = lr.astype(jnp.bfloat16)
  up = layer.lora_up.T.astype(jnp.bfloat16)
  sw = layer.wcscale.astype(jnp.float32)
  mult_t = layer.wscale.T
  bias = layer.bias
  out[f"xla_int8_{n}"] = median_seconds(jax.jit(lambda a, w: jax.lax.dot_general(
      a, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)), a,
      jnp.ones((n, K), jnp.int8), reps=20, rounds=5) * 1e3
  tilings = {"w3": dict(tile_m=192, steps=3, compute_wgs=3), "wide": dict(tile_m=256, steps=3)}
  for tname, t in tilings.items():
    for gf in gfs:
      for rmax in ((False, True) if gf is not None else (False,)):
        inv = (jax.random.uniform(key, (n - gf,), minval=0.5, maxval=2.0) if rmax else None)
        f = jax.jit(lambda a, sa, q, m, sw, lr, up, b, inv, gf=gf, t=t: w4a8_hopper.w4a8_gemm_t(
            a, sa, q, m, sw, lr, up, b, inv, gelu_from=gf, **t))
        try:
          ms = median_seconds(f, a, sa, layer.qweight, mult_t, sw, lr16, up, bias, inv,
                              reps=20, rounds=5) * 1e3
        except Exception as e:
          ms = None
          print(n, tname, gf, rmax, type(e).__name__, str(e)[:200], flush=True)
        key_ = f"{n}_{tname}_gelu{gf}_rmax{int(rmax)}"
        out[key_] = ms
        print(key_, ms, flush=True)
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(dict(device=jax.devices()[0].device_kind, results=out),
          open(os.path.join(os.environ.get("OUT", "/tmp"), "gelu_mix.json"), "w"), indent=1)
for k, v in out.items():
  print(f"{k:40s} {v if v is None else round(v, 4)}")
