"""Transformer weight bytes of FLUX.1-dev, bf16 vs SVDQuant INT4 r32, from the layer shapes.

Counts exactly what `svdq_jax.quantize` stores (packed 4-bit [N, K/2], bf16 group scales
[N, K/64], f32 smoothing [K], bf16 rank-32 factors, biases and norms kept): W4A4 for the
attention and MLP linears, W4A16 for the modulation linears, embedders and the final layer in
bf16. It reproduces the GPU measurement of bench_flux_full.py to the byte (2+4 blocks:
2,620,309,632 / 815,005,824; 19+38: 23,802,816,640 / 6,652,430,464).

    python3 scripts/flux_weight_bytes.py
"""

H, MLP, R = 3072, 12288, 32
def lin_bf16(k, n): return k*n*2 + n*2
def w4a4(k, n, shared_down=False): return n*k//2 + n*(k//64)*2 + k*4 + k*R*2 + R*n*2 + n*2
def w4a16(k, n): return n*k//2 + n*(k//64)*2 + k*4 + n*2
def norms(): return 2*128*2
embed_bf16 = lin_bf16(64, H) + lin_bf16(4096, H) + 2*(lin_bf16(256, H) + lin_bf16(H, H)) + lin_bf16(768, H) + lin_bf16(H, H) + lin_bf16(H, 2*H) + lin_bf16(H, 64)
def double(q):
  per = (w4a16(H, 6*H) if q else lin_bf16(H, 6*H))
  per += sum((w4a4 if q else lin_bf16)(k, n) for k, n in ((H, 3*H), (H, H), (H, MLP), (MLP, H)))
  return 2*(per + norms())
def single(q):
  return (w4a16(H, 3*H) if q else lin_bf16(H, 3*H)) + sum((w4a4 if q else lin_bf16)(k, n) for k, n in ((H, 3*H+MLP), (H+MLP, H))) + norms()
for d, s in ((2, 4), (19, 38)):
  b = embed_bf16 + d*double(False) + s*single(False)
  q = embed_bf16 + d*double(True) + s*single(True)
  print(d, s, "bf16", b, f"{b/1e9:.3f} GB", "svdquant", q, f"{q/1e9:.3f} GB", f"ratio {q/b:.3f}")
