"""One-off: which roundings of the epilogue GELU must be integer ops (H200)."""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from svdq_jax import qlinear
from svdq_jax.pallas_kernels import int8_hopper
import bench_rowscaled as br

def formula(y, rp, rs, ro):
  f32 = jnp.float32
  r = lambda v: v.astype(jnp.bfloat16).astype(f32)
  c = lambda v: jnp.asarray(v, jnp.bfloat16).astype(f32)
  xf = y.astype(f32)
  inner = rs(xf + rp(c(0.044715) * ro(ro(xf * xf) * xf)))
  cdf = ro(c(0.5) * ro(1.0 + ro(jnp.tanh(ro(c(np.sqrt(2 / np.pi)) * inner)))))
  return (xf * cdf).astype(jnp.bfloat16)

def bits_noguard(v):
  b = jax.lax.bitcast_convert_type(v, jnp.int32)
  b = b + 0x7FFF + (jax.lax.shift_right_logical(b, 16) & 1)
  return jax.lax.bitcast_convert_type(b & -0x10000, jnp.float32)

cast = lambda v: v.astype(jnp.bfloat16).astype(jnp.float32)
B = qlinear.round_bf16_bits
VARIANTS = {
  "casts": lambda y: formula(y, cast, cast, cast),
  "all_bits": lambda y: formula(y, B, B, B),
  "product_bits": lambda y: formula(y, B, cast, cast),
  "product_bits_noguard": lambda y: formula(y, bits_noguard, cast, cast),
  "sum_bits": lambda y: formula(y, cast, B, cast),
}
rows = []
for name, fn in VARIANTS.items():
  int8_hopper._gelu = fn
  jax.clear_caches()
  for prod in br.GELU_PRODUCERS:
    r = br.producer_shape(int(sys.argv[2]), prod, jax.random.key(0), sys.argv[3] == "interpret")
    r["variant"] = name
    rows.append(r)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
print("| variant | producer | head / GELU mismatches | plain ms | epilogue GELU ms |")
for r in rows:
  print(f"| {r['variant']} | {r['layer']} | {r['head_mismatches']} / {r['gelu_mismatches']} | "
        f"{r['fused_ms']:.3f} | {r['fused_epilogue_gelu_ms']:.3f} |")
