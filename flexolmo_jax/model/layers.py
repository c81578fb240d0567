"""Dense building blocks: RMSNorm, rotary embeddings, attention with QK-norm, SwiGLU.

Numerics follow OLMo 2: norms in fp32 then cast, RoPE in fp32 (rotate-half), matmuls with
compute-dtype operands (bf16 by default) and fp32 accumulation.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flexolmo_jax.model.attention import attend, attend_cached
from flexolmo_jax.model.config import ModelConfig

Array = jax.Array


def dtype_of(name: str):
  return jnp.dtype(name)


def param_with_axes(module: nn.Module, name: str, shape, axes, init, cfg: ModelConfig):
  """A parameter annotated with logical axis names (mapped to the mesh by config rules)."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                      dtype_of(cfg.param_dtype))


def _einsum_grad_specs(spec: str):
  """(d_lhs spec, d_rhs spec) of a two-operand einsum "ab,bc->ac", or None when a gradient
  is not itself an einsum of the other two (an index summed within one operand, '...')."""
  if "..." in spec or "->" not in spec:
    return None
  ins, out = spec.replace(" ", "").split("->")
  parts = ins.split(",")
  if len(parts) != 2:
    return None
  a, b = parts
  if any(len(set(t)) != len(t) for t in (a, b, out)):
    return None
  if any(i not in out + b for i in a) or any(i not in out + a for i in b):
    return None
  return f"{out},{b}->{a}", f"{a},{out}->{b}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _mixed_einsum(spec: str, dt, grads, x: Array, w: Array) -> Array:
  return jnp.einsum(spec, x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)


def _mixed_einsum_fwd(spec, dt, grads, x, w):
  xc, wc = x.astype(dt), w.astype(dt)
  # Zero-size markers carry the operands' own dtypes to the backward pass.
  marks = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
  return jnp.einsum(spec, xc, wc, preferred_element_type=jnp.float32), (xc, wc, marks)


def _mixed_einsum_bwd(spec, dt, grads, res, g):
  # Plain autodiff of a bf16 x bf16 -> f32 einsum multiplies the f32 cotangent with the
  # upcast other operand: both backward matmuls run in f32 (on XLA:CPU ~3x slower than
  # bf16 with f32 accumulation, FLEXOLMO.md section 7). Mixed-precision training (torch
  # autocast, MaxText) runs them on compute-dtype operands with f32 accumulation instead.
  xc, wc, (mx, mw) = res
  gc = g.astype(dt)
  dx = jnp.einsum(grads[0], gc, wc, preferred_element_type=jnp.float32).astype(mx.dtype)
  dw = jnp.einsum(grads[1], xc, gc, preferred_element_type=jnp.float32).astype(mw.dtype)
  return dx, dw


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def dot(spec: str, x: Array, w: Array, cfg: ModelConfig, out_dtype=None) -> Array:
  """einsum with compute-dtype operands and fp32 accumulation, forward and backward.

  With a compute dtype narrower than fp32 the two gradient einsums also take compute-dtype
  operands (the cotangent cast down) and accumulate in fp32, as mixed-precision training
  does; the weight gradient comes back in the weight's own dtype (fp32 params: fp32)."""
  dt = dtype_of(cfg.dtype)
  grads = _einsum_grad_specs(spec)
  if dt == jnp.dtype(jnp.float32) or grads is None:
    y = jnp.einsum(spec, x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)
  else:
    y = _mixed_einsum(spec, dt, grads, x, w)
  return y.astype(out_dtype or dt)


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
  """Logical sharding constraint on an activation (no-op outside a mesh/rules context)."""
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  """RMSNorm over the trailing `len(axes)` dimensions, computed in fp32, weight only."""
  cfg: ModelConfig
  axes: tuple[str, ...] = ("norm",)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n = len(self.axes)
    shape = x.shape[-n:]
    scale = param_with_axes(self, "scale", shape, self.axes, nn.initializers.ones, self.cfg)
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=tuple(range(-n, 0)), keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.cfg.norm_eps)
    return (scale.astype(jnp.float32) * y).astype(dtype_of(self.cfg.dtype))


def rotary(x: Array, positions: Array, theta: float) -> Array:
  """Rotate-half RoPE. x: [B, T, H, D]; positions: [B, T]. Computed in fp32."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class KVCache(NamedTuple):
  """Decode cache for all layers. k, v: [L, B, S, Hkv, D]; valid: [B, S]; index: next slot."""
  k: Array
  v: Array
  valid: Array
  index: Array


class LayerCache(NamedTuple):
  k: Array  # [B, S, Hkv, D]
  v: Array


class Attention(nn.Module):
  """Causal self-attention with full-width QK-norm (before RoPE) and optional GQA.

  The attention maths itself is `model.attention` (kernel chosen by cfg.attention).
  segment_ids: optional [B, T] document ids; keys of other documents are masked.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, cache: LayerCache | None = None,
               key_valid: Array | None = None, cache_index: Array | None = None,
               segment_ids: Array | None = None):
    cfg = self.cfg
    H, K, D, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    init = nn.initializers.normal(cfg.init_std)
    wq = param_with_axes(self, "q_proj", (d, H, D), ("embed", "q_heads", "head_dim"), init, cfg)
    wk = param_with_axes(self, "k_proj", (d, K, D), ("embed", "kv_heads", "head_dim"), init, cfg)
    wv = param_with_axes(self, "v_proj", (d, K, D), ("embed", "kv_heads", "head_dim"), init, cfg)
    wo = param_with_axes(self, "o_proj", (H, D, d), ("q_heads", "head_dim", "embed"), init, cfg)

    # QK-norm over the full projection width (all heads together), as OLMo 2 does.
    q = RMSNorm(cfg, ("q_heads", "head_dim"), name="q_norm")(dot("btd,dhk->bthk", x, wq, cfg))
    k = RMSNorm(cfg, ("kv_heads", "head_dim"), name="k_norm")(dot("btd,dhk->bthk", x, wk, cfg))
    v = dot("btd,dhk->bthk", x, wv, cfg)
    q = rotary(q, positions, cfg.rope_theta)
    k = rotary(k, positions, cfg.rope_theta)
    q = constrain(q, ("act_batch", "act_length", "act_heads", None))
    k = constrain(k, ("act_batch", "act_length", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))

    if cache is None:
      new_cache = None
      out = attend(q, k, v, cfg, segment_ids=segment_ids)
    else:
      # This chunk's keys/values go back to the caller, which writes all layers' chunks into
      # the cache in one in-place update at slots [index, index + T).
      if segment_ids is not None:
        raise ValueError("segment_ids are not supported with a KV cache (use input_valid)")
      k = k.astype(cache.k.dtype)
      v = v.astype(cache.v.dtype)
      new_cache = LayerCache(k, v)
      out = attend_cached(q, k, v, cache.k, cache.v, key_valid, cache_index, cfg)
    out = constrain(out, ("act_batch", "act_length", "act_heads", None))
    y = dot("bthk,hkd->btd", out, wo, cfg)
    return y, new_cache


class MLP(nn.Module):
  """SwiGLU feed-forward: w2(silu(w1 x) * (w3 x)); HF names gate/up/down."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    init = nn.initializers.normal(cfg.init_std)
    d, f = cfg.d_model, cfg.ffn_hidden
    w1 = param_with_axes(self, "gate_proj", (d, f), ("embed", "mlp"), init, cfg)
    w3 = param_with_axes(self, "up_proj", (d, f), ("embed", "mlp"), init, cfg)
    w2 = param_with_axes(self, "down_proj", (f, d), ("mlp", "embed"), init, cfg)
    g = dot("btd,df->btf", x, w1, cfg, jnp.float32)
    u = dot("btd,df->btf", x, w3, cfg, jnp.float32)
    a = constrain(nn.silu(g) * u, ("act_batch", "act_length", "act_mlp"))
    return dot("btf,fd->btd", a, w2, cfg)
