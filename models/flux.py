"""FLUX.1 transformer in Flax NNX (BFL layout: fused qkv, single-block linear1/linear2).

Every linear layer is ``svdq_jax.layers.Linear``: its kernel may be a float [K, N] array or a
``QuantizedLinear`` from ``svdq_jax.quantize``, so a quantized parameter tree runs in this code.
The MLPs hand their GELU (and the single blocks their concatenation) to the linear after them
as input parts (``Gelu``, from ``gelu_from``): a quantized layer on Hopper computes the GELU in
its GEMM's epilogue and the next one reads the parts where they lie while it quantizes them;
every other layer joins them first (the same values).
Shapes: B batch, L_img image tokens (2x2 latent patches), L_txt text tokens, h hidden size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from svdq_jax.attention import (cudnn_fp8_attention, cudnn_fp8_kernel, cudnn_fp8_params,
                                e4m3_operands, fp8_attention, int8_attention, pow2_scale,
                                rms_norm_bound, sample_stride, sample_v_bound)
from svdq_jax.pallas_kernels import attention_fp8, attention_int8
from svdq_jax.config import QuantConfig, Rule, method_spec
from svdq_jax.layers import Linear
from svdq_jax.parallel import token_mesh
from svdq_jax.qlinear import Scaled, join


@dataclasses.dataclass(frozen=True)
class FluxConfig:
  in_channels: int = 64           # 16 latent channels x 2x2 patch
  out_channels: int = 64
  vec_in_dim: int = 768           # CLIP pooled
  context_in_dim: int = 4096      # T5 token embeddings
  hidden_size: int = 3072
  mlp_ratio: float = 4.0
  num_heads: int = 24
  depth: int = 19                 # double-stream blocks
  depth_single_blocks: int = 38
  axes_dim: tuple[int, ...] = (16, 56, 56)
  theta: int = 10_000
  guidance_embed: bool = True     # dev: True, schnell: False

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")
    if sum(self.axes_dim) != self.head_dim:
      raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")


FLUX_DEV = FluxConfig()
FLUX_SCHNELL = FluxConfig(guidance_embed=False)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding of t [..., B] (scaled by 1000) -> f32 [..., B, dim] as [cos, sin]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (1000.0 * t.astype(jnp.float32))[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope(ids: jax.Array, axes_dim: tuple[int, ...], theta: int) -> tuple[jax.Array, jax.Array]:
  """Position ids [L, n_axes] -> (cos, sin) f32 [L, head_dim // 2], one frequency per pair."""
  cos, sin = [], []
  for i, d in enumerate(axes_dim):
    freqs = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = ids[:, i].astype(jnp.float32)[:, None] * freqs[None]
    cos.append(jnp.cos(angles))
    sin.append(jnp.sin(angles))
  return jnp.concatenate(cos, -1), jnp.concatenate(sin, -1)


def apply_rope(x: jax.Array, pe: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotates consecutive pairs (re, im) = (x[2i], x[2i+1]) of x [B, L, H, D] by the position
  angles: (re cos - im sin, im cos + re sin), each pair times (cos, cos) plus the swapped pair
  (im, re) times (-sin, sin), f32, so that no stack of the two halves is materialized."""
  cos, sin = (p[None, :, None, :, None] for p in pe)
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  out = xf * cos + xf[..., ::-1] * (sin * jnp.array([-1.0, 1.0], jnp.float32))
  return out.reshape(x.shape).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters, computed in f32."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


class MLPEmbedder(nnx.Module):
  def __init__(self, in_dim: int, hidden: int, rngs: nnx.Rngs):
    self.in_layer = Linear(in_dim, hidden, rngs=rngs)
    self.out_layer = Linear(hidden, hidden, rngs=rngs)

  def __call__(self, x):
    return self.out_layer(jax.nn.silu(self.in_layer(x)))


class QKNorm(nnx.Module):
  def __init__(self, head_dim: int):
    self.query_norm = RMSNorm(head_dim)
    self.key_norm = RMSNorm(head_dim)

  def norms(self) -> tuple[RMSNorm, RMSNorm]:
    return self.query_norm, self.key_norm


_attention_implementation: str | None = None
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "int8", "int8qk", "fp8", "cudnn_fp8")


def set_attention_implementation(name: str | None) -> None:
  """Chooses the attention of models traced from now on: None (the default: 'cudnn' on NVIDIA
  GPUs for bf16/fp16 activations, else 'xla'), 'xla',
  'cudnn' (``jax.nn.dot_product_attention``'s fused flash attention on NVIDIA GPUs,
  bf16/fp16 inputs), 'int8' (INT8 q k^T, FP8 P V), 'int8qk' (INT8 q k^T, bf16 P V) (these
  two on Hopper GPUs by the ``pallas_kernels.attention_int8`` kernel where it applies), 'fp8'
  (FP8 throughout, as cuDNN's FP8 flash attention computes it): ``svdq_jax.attention``'s
  reference numerics, for measuring their quality; or 'cudnn_fp8', that cuDNN kernel (NVIDIA
  GPUs). ``sampling.sample`` recompiles when it changes."""
  global _attention_implementation
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                     f"got {name!r}")
  _attention_implementation = name


def attention_implementation() -> str | None:
  return _attention_implementation


def attention_settings() -> tuple:
  """Every attention switch read while the model is traced (the implementation,
  ``set_fused_fp8_operands``, ``set_fp8_output_part``): a jitted
  loop takes it as a static argument, so that changing one retraces it."""
  return _attention_implementation, _fused_fp8, _fp8_output_part


@contextlib.contextmanager
def attention_as(name: str | None):
  """Context manager form of ``set_attention_implementation``."""
  previous = _attention_implementation
  set_attention_implementation(name)
  try:
    yield
  finally:
    set_attention_implementation(previous)


def attention(q, k, v, pe, norms=()):
  """q, k, v [B, L, H, D] -> [B, L, H*D]: RoPE, then softmax(q k^T / sqrt(D)) v. norms: the
  RMSNorms that made q and k; they bound |q|, |k|, so FP8 attention scales them statically
  (``attention.rms_norm_bound``) and their quantization fuses into RoPE."""
  q, k = apply_rope(q, pe), apply_rope(k, pe)
  fp8 = _attention_implementation in ("fp8", "cudnn_fp8")
  bound = (rms_norm_bound(q.shape[-1], *(n.scale[...] for n in norms)) if fp8 and norms
           else None)
  if _attention_implementation in ("int8", "int8qk"):
    pv = "fp8" if _attention_implementation == "int8" else "bf16"
    out = (attention_int8.int8qk_attention(q, k, v, pv) if attention_int8.supports(q)
           else int8_attention(q, k, v, pv=pv))
  elif _attention_implementation == "fp8":
    out = fp8_attention(q, k, v, bound)
  elif _attention_implementation == "cudnn_fp8":
    out = cudnn_fp8_attention(q, k, v, bound)
  else:
    out = jax.nn.dot_product_attention(q, k, v, implementation=_default_attention(q)
                                       if _attention_implementation is None
                                       else _attention_implementation)
  return out.reshape(*out.shape[:2], -1)


def joint_attention(streams, pe, num_heads, as_part=False):
  """Attention over the streams' tokens joined in order -> [B, sum Ls, h]. streams: ((x [B,
  Ls, >= 3h] with q | k | v in its first 3h columns, the stream's QKNorm), ...). On cuDNN's
  FP8 attention one kernel pass per stream makes the E4M3 operands (``fp8_operands``; XLA's
  passes instead after ``set_fused_fp8_operands(False)``); there ``as_part`` (unless
  ``set_fp8_output_part(False)``) returns the E4M3 output [B, L, h] and its scale as a
  ``qlinear.Scaled`` part, for a linear layer to descale as it reads it."""
  if not (_attention_implementation == "cudnn_fp8" and _fused_fp8_operands(streams)):
    return attention(*_joined_heads(streams, num_heads), pe, norms=_qk_norms(streams))
  q8, k8, v8, (sq, sk, sv) = fp8_operands(streams, pe, num_heads)
  out = cudnn_fp8_kernel(q8, k8, v8, cudnn_fp8_params(sq, sk, sv))
  out = Scaled(out.reshape(*out.shape[:2], -1), sv)
  return out if as_part and _fp8_output_part else join(out)


def _joined_heads(streams, num_heads):
  """``joint_attention``'s q, k (through their streams' RMSNorms) and v, [B, sum Ls, H, D]."""
  return tuple(jnp.concatenate(t, axis=1) if len(t) > 1 else t[0]
               for t in zip(*(_normed_heads(x, qk, num_heads) for x, qk in streams)))


def _qk_norms(streams) -> list:
  """The streams' q and k RMSNorms, whose scales bound q and k (``rms_norm_bound``)."""
  return [n for _, qk in streams for n in qk.norms()]


def _normed_heads(x, qk, num_heads):
  """x [B, L, >= 3h] -> q, k through qk's RMSNorms and v, [B, L, H, D] each."""
  q, k, v = split_heads(x[..., :3 * num_heads * qk.query_norm.scale.shape[0]], num_heads)
  return qk.query_norm(q), qk.key_norm(k), v


# On an H200 (2026-12-04) the kernel took 0.077-0.089 ms a FLUX block, XLA's unfused passes
# 0.11-0.12 ms, and 1.4 ms less of the step's fusions (docs/benchmarks/README.md).
_fused_fp8 = True


def set_fused_fp8_operands(on: bool) -> None:
  """Whether cuDNN FP8 attention takes its operands from ``fp8_operands``' one kernel pass
  per stream (the default) instead of XLA's passes."""
  global _fused_fp8
  _fused_fp8 = bool(on)


# H200, 2026-12-04: bit-exact, linear2's activation kernel 0.224 against 0.239 ms with XLA's
# descale first, 0.35 ms less device time a step (docs/benchmarks/README.md).
_fp8_output_part = True


def set_fp8_output_part(on: bool) -> None:
  """Whether ``joint_attention(as_part=True)`` (the single blocks') leaves cuDNN FP8
  attention's output in E4M3 for linear2 to descale as it reads it (``qlinear.Scaled``)."""
  global _fp8_output_part
  _fp8_output_part = bool(on)


def _fused_fp8_operands(streams) -> bool:
  """Whether ``fp8_operands``' kernel runs: switched on, on a GPU (not under sequence
  parallelism), for bf16 projections and a power-of-two head dimension."""
  d = streams[0][1].query_norm.scale.shape[0]
  return (_fused_fp8 and jax.default_backend() == "gpu" and token_mesh() is None and d >= 16
          and d & (d - 1) == 0 and all(x.dtype == jnp.bfloat16 for x, _ in streams))


def fp8_operands(streams, pe, num_heads, interpret=False):
  """``joint_attention``'s FP8 operands from its streams in one kernel pass each
  (``pallas_kernels.attention_fp8``): q8, k8, v8 E4M3 [B, L, H, D] and their scales (sq, sk,
  sv). The same as ``fp8_operands_reference``: k's mean and v's bound come from the joint
  sequence's ``token_sample``, normed and rotated here."""
  d = streams[0][1].query_norm.scale.shape[0]
  norms = _qk_norms(streams)
  eps = {n.eps for n in norms}
  if len(eps) != 1:
    raise ValueError(f"the streams' RMSNorms must share one epsilon, got {sorted(eps)}")
  eps = eps.pop()
  kmean, v_bound = _sample_statistics(streams, pe, num_heads)
  bound = rms_norm_bound(d, *(n.scale[...] for n in norms))
  scales = (pow2_scale(bound), pow2_scale(2.0 * bound), pow2_scale(v_bound))
  q8, k8, v8 = attention_fp8.fp8_operands(
      [(x, qk.query_norm.scale[...], qk.key_norm.scale[...]) for x, qk in streams], *pe,
      kmean, 1.0 / jnp.stack(scales), num_heads, eps, interpret=interpret)
  return q8, k8, v8, scales


def _sample_rows(streams, pe):
  """Per stream, (its token sample's rows as a slice, the positions' (cos, sin) there): the
  joint sequence's ``token_sample`` split at the streams' boundaries."""
  stride = sample_stride(sum(x.shape[1] for x, _ in streams))
  out, off = [], 0
  for x, _ in streams:
    first = -off % stride
    out.append((slice(first, None, stride),
                tuple(p[off + first:off + x.shape[1]:stride] for p in pe)))
    off += x.shape[1]
  return out


def _sample_statistics(streams, pe, num_heads):
  """(k's mean over the joint token sample after the RMSNorms and RoPE, f32 [B, H, D];
  ``sample_v_bound`` of v's sample), by XLA: ``fp8_operands``' statistics."""
  k_sample, v_sample = [], []
  for (x, qk), (rows, pe_rows) in zip(streams, _sample_rows(streams, pe)):
    _, k, v = _normed_heads(x[:, rows], qk, num_heads)
    k_sample.append(apply_rope(k, pe_rows))
    v_sample.append(v)
  kmean = jnp.mean(jnp.concatenate(k_sample, 1).astype(jnp.float32), axis=1)
  return kmean, sample_v_bound(jnp.concatenate(v_sample, 1))


def fp8_operands_reference(streams, pe, num_heads):
  """``fp8_operands``' definition, the unfused path's operands: the streams' heads joined,
  RoPE, then ``attention.e4m3_operands`` with the norms' bound. Same outputs."""
  q, k, v = _joined_heads(streams, num_heads)
  bound = rms_norm_bound(q.shape[-1], *(n.scale[...] for n in _qk_norms(streams)))
  (q8, sq), (k8, sk), (v8, sv) = e4m3_operands(apply_rope(q, pe), apply_rope(k, pe), v, bound)
  return q8, k8, v8, (sq, sk, sv)


def _default_attention(q) -> str:
  """cuDNN's flash attention where it runs (NVIDIA GPU, bf16/fp16): jax's own default is
  XLA's, which writes the [B, H, L, L] scores to memory (4x cuDNN's time at FLUX.1's 1024x1024
  shape on an H200, docs/benchmarks/2026-12-02-attention-h200.json). Not under sequence
  parallelism (``parallel.tokens_over``): cuDNN's partitioner refuses a sequence-sharded query."""
  fused = (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
           and token_mesh() is None)
  return "cudnn" if fused else "xla"


def split_heads(x, num_heads):
  """[B, L, 3h] -> three [B, L, H, D]."""
  q, k, v = jnp.split(x, 3, axis=-1)
  return tuple(t.reshape(*t.shape[:2], num_heads, -1) for t in (q, k, v))


class Modulation(nnx.Module):
  """SiLU(vec) -> chunks of (shift, scale, gate), one set (single) or two (double)."""

  def __init__(self, hidden: int, sets: int, rngs: nnx.Rngs):
    self.lin = Linear(hidden, 3 * sets * hidden, rngs=rngs)
    self.sets = sets

  def __call__(self, vec):
    """vec [..., B, hidden] -> 3 * sets arrays [..., B, 1, hidden]."""
    out = self.lin(jax.nn.silu(vec))[..., None, :]
    return jnp.split(out, 3 * self.sets, axis=-1)


class StreamAttention(nnx.Module):
  """The attention projections of one stream of a double block."""

  def __init__(self, hidden: int, head_dim: int, rngs: nnx.Rngs):
    self.qkv = Linear(hidden, 3 * hidden, rngs=rngs)
    self.norm = QKNorm(head_dim)
    self.proj = Linear(hidden, hidden, rngs=rngs)


class StreamMLP(nnx.Module):
  def __init__(self, hidden: int, mlp_dim: int, rngs: nnx.Rngs):
    self.fc1 = Linear(hidden, mlp_dim, rngs=rngs)
    self.fc2 = Linear(mlp_dim, hidden, rngs=rngs)

  def __call__(self, x, residual=None):
    # fc2(gelu(fc1(x))): a Gelu part; residual (r, gate): r + gate * fc2(...)
    return self.fc2(self.fc1(x, gelu_from=0, feeds=self.fc2), residual=residual)


class DoubleStreamBlock(nnx.Module):
  """Image and text streams with their own weights, joint attention over [txt, img]."""

  def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.num_heads = cfg.num_heads
    self.img_mod = Modulation(h, 2, rngs)
    self.img_attn = StreamAttention(h, cfg.head_dim, rngs)
    self.img_mlp = StreamMLP(h, cfg.mlp_dim, rngs)
    self.txt_mod = Modulation(h, 2, rngs)
    self.txt_attn = StreamAttention(h, cfg.head_dim, rngs)
    self.txt_mlp = StreamMLP(h, cfg.mlp_dim, rngs)

  def _qkv(self, x, mod, attn):
    """(the stream's q | k | v [B, L, 3h], its QKNorm): a ``joint_attention`` stream."""
    shift, scale = mod[0], mod[1]
    return attn.qkv((1 + scale) * layer_norm(x) + shift), attn.norm

  def modulation(self, vec):
    return self.img_mod(vec), self.txt_mod(vec)

  def __call__(self, img, txt, mod, pe):
    """mod: ``modulation(vec)``, each stream's (shift, scale, gate) x (attention, MLP)."""
    img_mod, txt_mod = mod
    joint = joint_attention((self._qkv(txt, txt_mod, self.txt_attn),
                             self._qkv(img, img_mod, self.img_attn)), pe, self.num_heads)
    txt_out, img_out = joint[:, :txt.shape[1]], joint[:, txt.shape[1]:]
    # x + gate * branch(...) as the branch's last linear's residual, which a quantized
    # layer on Hopper sums in its GEMM's epilogue
    img = self.img_attn.proj(img_out, residual=(img, img_mod[2]))
    img = self.img_mlp((1 + img_mod[4]) * layer_norm(img) + img_mod[3],
                       residual=(img, img_mod[5]))
    txt = self.txt_attn.proj(txt_out, residual=(txt, txt_mod[2]))
    txt = self.txt_mlp((1 + txt_mod[4]) * layer_norm(txt) + txt_mod[3],
                       residual=(txt, txt_mod[5]))
    return img, txt


class SingleStreamBlock(nnx.Module):
  """One stream over [txt, img]: attention and MLP side by side (linear1 -> qkv | mlp)."""

  def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.num_heads, self.hidden = cfg.num_heads, h
    self.modulation = Modulation(h, 1, rngs)
    self.linear1 = Linear(h, 3 * h + cfg.mlp_dim, rngs=rngs)
    self.linear2 = Linear(h + cfg.mlp_dim, h, rngs=rngs)
    self.norm = QKNorm(cfg.head_dim)

  def __call__(self, x, mod, pe):
    """mod: ``self.modulation(vec)``, (shift, scale, gate)."""
    shift, scale, gate = mod
    # qkv | gelu(mlp): a Gelu part whose columns from 3 hidden on feed the GELU (on Hopper
    # written as two arrays: q | k | v is ``before_gelu`` either way)
    qkv_mlp = self.linear1((1 + scale) * layer_norm(x) + shift, gelu_from=3 * self.hidden,
                           feeds=self.linear2)
    attn = joint_attention(((qkv_mlp.before_gelu, self.norm),), pe, self.num_heads,
                           as_part=True)
    # x + gate * linear2(concatenate([attn, gelu(mlp)])): the parts and the residual left to
    # linear2
    return self.linear2((attn, qkv_mlp), residual=(x, gate))


class LastLayer(nnx.Module):
  def __init__(self, hidden: int, out_dim: int, rngs: nnx.Rngs):
    self.adaLN_modulation = Linear(hidden, 2 * hidden, rngs=rngs)
    self.linear = Linear(hidden, out_dim, rngs=rngs)

  def modulation(self, vec):
    return jnp.split(self.adaLN_modulation(jax.nn.silu(vec))[..., None, :], 2, axis=-1)

  def __call__(self, x, mod):
    """mod: ``modulation(vec)``, (shift, scale)."""
    shift, scale = mod
    return self.linear((1 + scale) * layer_norm(x) + shift)


class Flux(nnx.Module):
  """The FLUX.1 transformer: predicts the flow velocity of packed image latents."""

  def __init__(self, cfg: FluxConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    h = cfg.hidden_size
    self.img_in = Linear(cfg.in_channels, h, rngs=rngs)
    self.time_in = MLPEmbedder(256, h, rngs)
    self.vector_in = MLPEmbedder(cfg.vec_in_dim, h, rngs)
    self.guidance_in = MLPEmbedder(256, h, rngs) if cfg.guidance_embed else None
    self.txt_in = Linear(cfg.context_in_dim, h, rngs=rngs)
    self.double_blocks = nnx.List([DoubleStreamBlock(cfg, rngs) for _ in range(cfg.depth)])
    self.single_blocks = nnx.List(
        [SingleStreamBlock(cfg, rngs) for _ in range(cfg.depth_single_blocks)])
    self.final_layer = LastLayer(h, cfg.out_channels, rngs)

  def __call__(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, mods=None):
    """
    Args:
      img: [B, L_img, in_channels] packed latents. img_ids: [L_img, 3] positions.
      txt: [B, L_txt, context_in_dim] T5 embeddings. txt_ids: [L_txt, 3] (zeros).
      timesteps: [B] in [0, 1]. y: [B, vec_in_dim] CLIP pooled. guidance: [B] (dev only).
      mods: ``modulations`` of these timesteps, y and guidance, computed ahead (then
        timesteps, y and guidance are not read); None: computed here.
    Returns:
      [B, L_img, out_channels].
    """
    cfg = self.cfg
    img = self.img_in(img)
    if mods is None:
      mods = self.modulations(self.conditioning(timesteps, y, guidance, img.dtype))
    double, single, final = mods
    txt = self.txt_in(txt)
    pe = rope(jnp.concatenate([txt_ids, img_ids], axis=0), cfg.axes_dim, cfg.theta)
    for block, mod in zip(self.double_blocks, double):
      img, txt = block(img, txt, mod, pe)
    x = jnp.concatenate([txt, img], axis=1)
    for block, mod in zip(self.single_blocks, single):
      x = block(x, mod, pe)
    return self.final_layer(x[:, txt.shape[1]:], final)

  def conditioning(self, timesteps, y, guidance=None, dtype=jnp.bfloat16) -> jax.Array:
    """[..., B] timesteps, [..., B, vec_in_dim] y, [..., B] guidance -> vec [..., B, hidden]:
    what the modulations read."""
    vec = self.time_in(timestep_embedding(timesteps, 256).astype(dtype))
    if self.cfg.guidance_embed:
      if guidance is None:
        raise ValueError("this FLUX config embeds guidance (dev): pass guidance=[B] values")
      vec = vec + self.guidance_in(timestep_embedding(guidance, 256).astype(dtype))
    return vec + self.vector_in(y)

  def modulations(self, vec: jax.Array):
    """vec [..., B, hidden] -> (per double block, per single block, final layer) the shifts,
    scales and gates [..., B, 1, hidden] of ``__call__``'s ``mods``. The modulation linears
    read only vec: a sampler can compute them for all its steps at once (one weight read
    instead of one per step)."""
    return ([b.modulation(vec) for b in self.double_blocks],
            [b.modulation(vec) for b in self.single_blocks],
            self.final_layer.modulation(vec))


EMBEDDERS = r"img_in|txt_in|(time_in|vector_in|guidance_in|final_layer)/.*"
MODULATION = r".*(_mod|modulation)/lin"


def default_formats(method: str) -> tuple[str, str | None]:
  """(weight format, activation format or None) for ``method`` when none is asked for.

  W4A8 (``int4_2l`` weights, per-token ``int8`` activations) for a method that quantizes
  activations when the default device is a Hopper GPU: there it runs on the int8 tensor cores
  (FLUX.1-dev 1024x1024 step 1.26-1.29x of bf16, 28-step loop 1.35x, where exact INT4's step
  ran 0.68x; H200) and it
  measured closer to 16-bit than exact INT4 (demo 38.2 vs 37.3 dB PSNR, one FLUX-sized layer
  31.7 vs 28.2 dB SQNR; docs/benchmarks, docs/demo, docs/example). Elsewhere the paper's INT4
  (activations in the weight format), whose Triton kernels run on any GPU.
  """
  from svdq_jax.pallas_kernels.w4a4_hopper import on_hopper
  quantizes_acts = method_spec(method, "int4", False, None).act_format is not None
  return ("int4_2l", "int8") if quantizes_acts and on_hopper() else ("int4", None)


def quant_config(method: str, fmt: str | None = None, rank: int = 32,
                 act_fmt: str | None = None, **search) -> QuantConfig:
  """FLUX layers as SVDQuant treats them: embedders and the final layer stay 16-bit; with a
  method that quantizes activations, the modulation linears (their input is one vector per
  image, so activation quantization saves nothing) are W4A16 with AWQ-style scales; every
  other linear (attention, MLP) gets ``method`` (with activations in ``act_fmt``, None: the
  weight format). ``fmt`` None: ``default_formats(method)`` (W4A8 on Hopper, else INT4), its
  activation format unless ``act_fmt`` is given. ``search`` goes to QuantConfig."""
  if fmt is None:
    fmt, default_act = default_formats(method)
    act_fmt = act_fmt or default_act
  rules = [Rule(EMBEDDERS, "skip")]
  if method_spec(method, fmt, False, act_fmt).act_format is not None:
    rules.append(Rule(MODULATION, "w4a16", fmt))
  rules.append(Rule(".*", method, fmt, rank=rank, act_fmt=act_fmt))
  return QuantConfig(rules=tuple(rules), **search)
