"""Causal self-attention kernels, chosen by `ModelConfig.attention`.

`attend(q, k, v, cfg, segment_ids=None)` is the no-cache path (training, evaluation, a forward
without a KV cache); q: [B, T, H, D], k/v: [B, T, K, D] (RoPE applied, not yet scaled by
1/sqrt(D)), H a multiple of K (GQA); it returns [B, T, H, D] in the compute dtype.

  xla      the reference: f32 scores [B, K, G, T, S] materialised, f32 softmax (quadratic memory).
  chunked  pure-JAX blockwise online softmax (flash style) under a custom VJP: blocks of
           `attention_chunk` queries x keys, f32 running max / sum / accumulator, key blocks
           above the diagonal skipped, K/V never repeated for GQA. Memory is linear in T
           (residuals: q, k, v, out and a [B, H, T] log-sum-exp); runs anywhere, CPU included.
  splash   the Pallas TPU splash-attention kernel under `jax.shard_map` (batch over the mesh axes
           the logical rules give `act_batch`, heads over those of `act_heads`; sequence and
           head_dim whole on each shard). Interpret mode (no config field) is derived:
           `interpret = cfg.kernel_platform != "tpu"`, so CPU tests run the same kernel code
           while a config with platform="tpu" (the AOT planner's) compiles the Mosaic kernel.
  cudnn    `jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)`; GPU only
           (bf16/fp16), a clear error elsewhere.

segment_ids: optional int [B, T]. None keeps the reference behaviour (a packed row attends
across document boundaries); given, a query attends only to earlier keys with the same id.
xla / chunked mask, splash uses its SegmentIds, cudnn a boolean [B, 1, T, T] mask (which cuDNN
turns into a materialised bias: correct, but quadratic memory).

The decode path (`attend_cached`, a KV cache) always uses the xla maths whatever
`cfg.attention` says: its queries are a short chunk (T small) against S cached slots, so the
[B, K, G, T, S] scores are small, and it needs per-slot validity masks the kernels lack.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from flexolmo_jax.model.config import ModelConfig

Array = jax.Array
NEG = float(jnp.finfo(jnp.float32).min)


def _dt(cfg: ModelConfig):
  return jnp.dtype(cfg.dtype)


def _dot(spec: str, a: Array, b: Array, cfg: ModelConfig, out_dtype=None) -> Array:
  """layers.dot: compute-dtype operands and f32 accumulation, in the backward pass too."""
  from flexolmo_jax.model.layers import dot  # lazy: layers imports this module
  return dot(spec, a, b, cfg, out_dtype)


def attend(q: Array, k: Array, v: Array, cfg: ModelConfig, *,
           segment_ids: Array | None = None) -> Array:
  """Causal attention, q [B, T, H, D], k/v [B, T, K, D] -> [B, T, H, D] (compute dtype)."""
  impl = {"xla": _xla, "chunked": _chunked, "splash": _splash, "cudnn": _cudnn}[cfg.attention]
  return impl(q, k, v, segment_ids, cfg)


def _mask(T: int, S: int, segment_ids: Array | None) -> Array:
  """Causal (and same-segment) mask, [1 or B, T, S]."""
  mask = (jnp.arange(T)[:, None] >= jnp.arange(S)[None, :])[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


# ---------------------------------------------------------------------------------------- xla

def _xla(q, k, v, segment_ids, cfg):
  B, T, H, D = q.shape
  K = k.shape[2]
  qg = q.reshape(B, T, K, H // K, D)
  mask = _mask(T, T, segment_ids)
  scores = _dot("btkgd,bskd->bkgts", qg, k, cfg, out_dtype=jnp.float32) * D ** -0.5
  scores = jnp.where(mask[:, None, None], scores, NEG)
  probs = jax.nn.softmax(scores, axis=-1)
  return _dot("bkgts,bskd->btkgd", probs, v, cfg).reshape(B, T, H, D)


def attend_cached(q: Array, k: Array, v: Array, cache_k: Array, cache_v: Array,
                  key_valid: Array, cache_index: Array, cfg: ModelConfig) -> Array:
  """Attention of a T-token chunk (k/v: its own keys) over S cached slots plus itself.

  Reads the cached slots before `cache_index` and this chunk separately: the same keys as
  attending over the updated cache, without copying it. key_valid: [B, S] (this chunk's
  slots included, at [cache_index, cache_index + T)).
  """
  B, T, H, D = q.shape
  K = k.shape[2]
  qg = q.reshape(B, T, K, H // K, D)
  scale = D ** -0.5
  S = cache_k.shape[1]
  old_mask = (jnp.arange(S) < cache_index)[None, :] & key_valid  # [B, S]
  chunk_valid = jax.lax.dynamic_slice_in_dim(key_valid, cache_index, T, axis=1)
  causal = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
  new_mask = causal[None] & chunk_valid[:, None, :]  # [B, T, T]
  s_old = _dot("btkgd,bskd->bkgts", qg, cache_k, cfg, out_dtype=jnp.float32) * scale
  s_new = _dot("btkgd,bskd->bkgts", qg, k, cfg, out_dtype=jnp.float32) * scale
  s_old = jnp.where(old_mask[:, None, None, None, :], s_old, NEG)
  s_new = jnp.where(new_mask[:, None, None], s_new, NEG)
  probs = jax.nn.softmax(jnp.concatenate([s_old, s_new], axis=-1), axis=-1)
  out = (_dot("bkgts,bskd->btkgd", probs[..., :S], cache_v, cfg, jnp.float32)
         + _dot("bkgts,bskd->btkgd", probs[..., S:], v, cfg, jnp.float32))
  return out.astype(_dt(cfg)).reshape(B, T, H, D)


# ------------------------------------------------------------------------------------ chunked

def _chunked(q, k, v, segment_ids, cfg):
  B, T, H, D = q.shape
  K = k.shape[2]
  C = min(cfg.attention_chunk, T)
  n = -(-T // C)
  pad = n * C - T
  dt = _dt(cfg)
  # Padded keys sit after every real query, so causality hides them; padded queries (sliced
  # off below) see their own key, so no softmax row is ever empty.
  widths = ((0, 0), (0, pad), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x.astype(dt), widths) for x in (q, k, v))
  if segment_ids is not None:
    segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
    segment_ids = segment_ids.reshape(B, n, C).transpose(1, 0, 2)  # [n, B, C]
  # Block-major layouts: [n, B, C, K, G, D] for queries, [n, B, C, K, D] for keys/values.
  qb = q.reshape(B, n, C, K, H // K, D).transpose(1, 0, 2, 3, 4, 5)
  kb = k.reshape(B, n, C, K, D).transpose(1, 0, 2, 3, 4)
  vb = v.reshape(B, n, C, K, D).transpose(1, 0, 2, 3, 4)
  out = _flash(qb, kb, vb, segment_ids, D ** -0.5)
  return out.transpose(1, 0, 2, 3, 4, 5).reshape(B, n * C, H, D)[:, :T]


def _block_mask(i, j, C, seg):
  """[B or 1, 1, 1, C, C] mask of query block i against key block j."""
  pos = jnp.arange(C)
  mask = ((i * C + pos)[:, None] >= (j * C + pos)[None, :])[None]
  if seg is not None:
    mask = mask & (seg[i][:, :, None] == seg[j][:, None, :])
  return mask[:, None, None]


def _scores(qi, kj, scale):
  return jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(qb, kb, vb, seg, scale):
  return _flash_fwd(qb, kb, vb, seg, scale)[0]


def _flash_fwd(qb, kb, vb, seg, scale):
  n, B, C, K, G, D = qb.shape
  dt = qb.dtype

  def q_block(_, xs):
    qi, i = xs

    def kv_step(j, carry):
      m, l, acc = carry
      kj, vj = kb[j], vb[j]
      mask = _block_mask(i, j, C, seg)
      s = jnp.where(mask, _scores(qi, kj, scale), NEG)
      m_new = jnp.maximum(m, s.max(-1))
      # where(): a row with no visible key in this block adds nothing (rather than exp(0)).
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      alpha = jnp.exp(m - m_new)
      l = alpha * l + p.sum(-1)
      pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(dt), vj, preferred_element_type=jnp.float32)
      return m_new, l, alpha[..., None] * acc + pv

    init = (jnp.full((B, K, G, C), NEG, jnp.float32), jnp.zeros((B, K, G, C), jnp.float32),
            jnp.zeros((B, K, G, C, D), jnp.float32))
    # Key blocks 0..i only: those above the diagonal are fully masked.
    m, l, acc = jax.lax.fori_loop(0, i + 1, kv_step, init)
    out = (acc / l[..., None]).transpose(0, 3, 1, 2, 4).astype(dt)  # [B, C, K, G, D]
    return None, (out, m + jnp.log(l))

  _, (out, lse) = jax.lax.scan(q_block, None, (qb, jnp.arange(n)))
  return out, (qb, kb, vb, seg, out, lse)


def _flash_bwd(scale, res, dout):
  qb, kb, vb, seg, out, lse = res
  n, B, C, K, G, D = qb.shape
  dt = qb.dtype
  dout = dout.astype(dt)
  # delta_i = rowsum(dO * O): the softmax-Jacobian term of FlashAttention-2.
  delta = jnp.einsum("nbqkgd,nbqkgd->nbkgq", dout.astype(jnp.float32), out.astype(jnp.float32))

  def kv_block(dq, xs):
    kj, vj, j = xs

    def q_step(i, carry):
      dk, dv, dq = carry
      qi, doi = qb[i], dout[i]
      mask = _block_mask(i, j, C, seg)
      p = jnp.where(mask, jnp.exp(_scores(qi, kj, scale) - lse[i][..., None]), 0.0)
      dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(dt), doi,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta[i][..., None])).astype(dt)
      dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi, preferred_element_type=jnp.float32)
      dqi = jnp.einsum("bkgqs,bskd->bqkgd", ds, kj, preferred_element_type=jnp.float32)
      return dk, dv, dq.at[i].add(dqi * scale)

    zeros = jnp.zeros((B, C, K, D), jnp.float32)
    # Query blocks j..n-1 only: earlier ones cannot see key block j.
    dk, dv, dq = jax.lax.fori_loop(j, n, q_step, (zeros, zeros, dq))
    return dq, ((dk * scale).astype(kb.dtype), dv.astype(vb.dtype))

  dq0 = jnp.zeros(qb.shape, jnp.float32)
  dq, (dk, dv) = jax.lax.scan(kv_block, dq0, (kb, vb, jnp.arange(n)))
  return dq.astype(qb.dtype), dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------- splash

def _shard_axes(mesh, B: int, K: int):
  """(batch axes, head axes) of the mesh for [B, T, H, D] activations, as `constrain` sees them.

  From the logical rules in context ("act_batch", "act_heads"); axes that do not divide B (or
  the K kv heads, which split alike with the q heads) are dropped, i.e. that dim replicated.
  """
  import flax.linen as nn
  spec = nn.logical_to_mesh_axes(("act_batch", "act_length", "act_heads", None))

  def fit(axes, size):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    names = tuple(a for a in names if a in mesh.shape)
    if not names or size % math.prod(mesh.shape[a] for a in names):
      return None
    return names
  return fit(spec[0], B), fit(spec[2], K)


def _splash_kernel(heads: int, length: int, block: int, interpret: bool):
  """A causal splash kernel over [heads, length, D].

  Built afresh in every trace: it holds the mask-info arrays, which must belong to the trace
  that uses them (a cached kernel leaks tracers). The numpy mask processing behind it is
  lru-cached by the library, so rebuilding is cheap.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(heads)])
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def _splash(q, k, v, segment_ids, cfg):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.sharding import PartitionSpec as P
  B, T, H, D = q.shape
  K = k.shape[2]
  dt = _dt(cfg)
  lanes = 128  # the kernel's q/kv blocks must be multiples of the TPU lane width
  block = min(-(-cfg.attention_chunk // lanes) * lanes, -(-T // lanes) * lanes)
  Tp = -(-T // block) * block
  pad = Tp - T
  # The kernel does not scale the logits: fold 1/sqrt(D) into q (in f32, then cast).
  q = (q.astype(jnp.float32) * D ** -0.5).astype(dt)
  # [B, heads, T, D], padded like the chunked path (padded keys are causally hidden).
  q, k, v = (jnp.pad(x.astype(dt), ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
             for x in (q, k, v))
  if segment_ids is not None:
    segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
  interpret = cfg.kernel_platform != "tpu"

  def local(q, k, v, seg):
    kernel = _splash_kernel(q.shape[1], Tp, block, interpret)
    if seg is None:
      return jax.vmap(kernel)(q, k, v)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s)))(
        q, k, v, seg)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:  # no mesh in context: one device (or whatever GSPMD makes of the call)
    out = local(q, k, v, segment_ids)
  else:
    batch, heads = _shard_axes(mesh, B, K)
    spec = P(batch, heads, None, None)
    seg_spec = None if segment_ids is None else P(batch, None)
    out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec),
                        out_specs=spec, check_vma=False)(q, k, v, segment_ids)
  return out.transpose(0, 2, 1, 3)[:, :T]


# -------------------------------------------------------------------------------------- cudnn

def _cudnn(q, k, v, segment_ids, cfg):
  if cfg.kernel_platform != "gpu":
    raise ValueError(f"attention='cudnn' runs only on GPU (kernel platform is "
                     f"{cfg.kernel_platform!r}); use 'chunked', 'splash' (TPU) or 'xla'")
  dt = _dt(cfg)
  if dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"attention='cudnn' needs dtype bfloat16 or float16, got {cfg.dtype}")
  mask = None
  if segment_ids is not None:  # [B, 1, T, S]; cuDNN turns it into an additive bias
    mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  return jax.nn.dot_product_attention(q.astype(dt), k.astype(dt), v.astype(dt), mask=mask,
                                      scale=q.shape[-1] ** -0.5, is_causal=True,
                                      implementation="cudnn")
