"""Probe (one-off): linear1's W4A8 GEMM (GELU from column 9216, the next layer's maxima) with
the maxima in the GELU branch (default) or on every tile (uniform_row_max): times, equality."""
import json, os
import jax, jax.numpy as jnp, numpy as np
from svdq_jax.pallas_kernels import act_rowscaled, w4a8_hopper
from svdq_jax.timing import median_seconds
from bench_w4a4 import activations, make_layer

M, K, R, N, GF = 4608, 3072, 32, 21504, 9216
out = {}
x = activations(M, K, jax.random.key(N))
layer = make_layer(K, N, R, jax.random.key(1), "int4_2l", "int8")
a, sa, lr = act_rowscaled.reference(x, layer.smooth, layer.lora_down, "int8")
ops = (a, sa, layer.qweight, layer.wscale.T, layer.wcscale.astype(jnp.float32),
       lr.astype(jnp.bfloat16), layer.lora_up.T.astype(jnp.bfloat16), layer.bias,
       jax.random.uniform(jax.random.key(3), (N - GF,), minval=0.5, maxval=2.0))
for tname, t in {"w3": dict(tile_m=192, steps=3, compute_wgs=3),
                 "wide": dict(tile_m=256, steps=3)}.items():
  ref = None
  for uni in (False, True):
    f = jax.jit(lambda *o, t=t, u=uni: w4a8_hopper.w4a8_gemm_t(*o, gelu_from=GF,
                                                                uniform_row_max=u, **t))
    y, rmax = f(*ops)
    y, rmax = np.asarray(y, np.float32), np.asarray(rmax)
    if ref is None:
      ref = (y, rmax)
    else:
      out[f"{tname}_uniform_y_mismatches"] = int((y != ref[0]).sum())
      out[f"{tname}_uniform_rmax_mismatches"] = int(
          (~((rmax == ref[1]) | (np.isnan(rmax) & np.isnan(ref[1])))).sum())
    out[f"{tname}_uniform{int(uni)}_ms"] = median_seconds(f, *ops, reps=20, rounds=5) * 1e3
    print(tname, uni, out, flush=True)
json.dump(dict(device=jax.devices()[0].device_kind, results=out),
          open(os.path.join(os.environ.get("OUT", "/tmp"), "gelu_uniform.json"), "w"), indent=1)
for k, v in out.items():
  print(f"{k:40s} {v}")
