"""One-off probe (not kept): why the one-pass FP8 operand kernel runs at ~1.1 TB/s."""
import json, os, sys
import jax, jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from svdq_jax.pallas_kernels import attention_fp8
from svdq_jax.timing import median_seconds

B, L, H, D = 1, 4608, 24, 128
x = jax.random.normal(jax.random.key(0), (B, L, 7 * H * D), jnp.bfloat16)
inv = jnp.float32(0.25)
rows = {}

def t(name, f, *a):
  try:
    f = jax.jit(f)
    jax.block_until_ready(f(*a))
    rows[name] = round(median_seconds(f, *a, reps=20, rounds=5) * 1e3, 4)
  except Exception as e:
    rows[name] = f"{type(e).__name__}: {str(e)[:200]}"
  print(name, rows[name], flush=True)

def xla_v(x):
  v = x[..., 2 * H * D:3 * H * D].reshape(B, L, H, D).astype(jnp.float32)
  return jnp.clip(v * inv, -448, 448).astype(jnp.float8_e4m3fn)
t("xla_v_copy (read 28 MB, write 14 MB)", xla_v, x)

def xla_all(x):
  t3 = x[..., :3 * H * D].reshape(B, L, 3, H, D).astype(jnp.float32)
  return jnp.clip(t3 * inv, -448, 448).astype(jnp.float8_e4m3fn)
t("xla_qkv_copy (read 85 MB, write 42 MB)", xla_all, x)

def pallas_copy(bm, hp, nw, which=(2,)):
  def kernel(x_ref, *o_refs):
    b, i = pl.program_id(0), pl.program_id(1)
    r = pl.ds(i * bm, bm)
    for g in range(hp):
      h = pl.program_id(2) * hp + g
      for o_ref, w in zip(o_refs, which):
        v = x_ref[b, r, pl.ds((w * H + h) * D, D)].astype(jnp.float32)
        o_ref[b, r, h, :] = jnp.clip(v * 0.25, -448, 448).astype(jnp.float8_e4m3fn)
  shape = jax.ShapeDtypeStruct((B, L, H, D), jnp.float8_e4m3fn)
  return lambda x: pl.pallas_call(kernel, grid=(B, L // bm, H // hp), out_shape=[shape] * len(which),
      compiler_params=plgpu.CompilerParams(num_warps=nw, num_stages=1))(x)
for bm, hp, nw in ((64, 1, 4), (128, 1, 4), (64, 4, 4), (32, 1, 2)):
  t(f"pallas_v_copy {bm}x{hp}w{nw}", pallas_copy(bm, hp, nw), x)
t("pallas_qkv_copy 64x1w4", pallas_copy(64, 1, 4, (0, 1, 2)), x)

from svdq_jax.models import flux
pe_full = flux.rope(jnp.zeros((L, 3)).at[:, 1].set(jnp.arange(L) % 64), (16, 56, 56), 10_000)
def normrope(barrier):
  def norm(t):
    tf = t.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(jnp.square(tf), -1, keepdims=True) + 1e-6)
    if barrier:
      r = jax.lax.optimization_barrier(r)
    return (tf * r * 1.5).astype(jnp.bfloat16)
  def f(x):
    q = x[..., :H * D].reshape(B, L, H, D)
    k = x[..., H * D:2 * H * D].reshape(B, L, H, D)
    return tuple(jnp.clip(flux.apply_rope(norm(t), pe_full).astype(jnp.float32) * inv, -448,
                          448).astype(jnp.float8_e4m3fn) for t in (q, k))
  return f
t("xla norm+rope+e4m3 of q, k", normrope(False), x)
t("xla norm+rope+e4m3 of q, k, rsqrt behind a barrier", normrope(True), x)

scale = jnp.ones(D)
pe = (jnp.ones((L, D // 2)), jnp.zeros((L, D // 2)))
kmean = jnp.zeros((B, H, D))
invs = jnp.array([0.25, 0.25, 0.25])
fused = lambda x: attention_fp8.fp8_operands([(x, scale, scale)], *pe, kmean, invs, H, 1e-6)
t("fused kernel (default)", fused, x)
real_dot = plgpu.dot
plgpu.dot = lambda a, b, **k: a.astype(jnp.float32)
t("fused kernel, no permutation product",
  lambda x: attention_fp8.fp8_operands([(x, scale, scale)], *pe, kmean, invs, H, 1e-6), x)
plgpu.dot = real_dot
print(json.dumps(rows))
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "probe.json"), "w"), indent=1)
