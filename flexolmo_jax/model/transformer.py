"""The FlexOlmo / OLMo-2 decoder: one module for the dense, 2-expert and N-expert models.

Block ("reordered norm", no pre-norm; the router reads the raw residual h):
    h   = x + post_attention_layernorm(attn(x))
    out = h + post_feedforward_layernorm(ffn(h))      # ffn = SwiGLU or MoE
Layers run under `nn.scan` (one compiled layer body, params stacked on a leading
'layers' axis) with a configurable remat policy.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flexolmo_jax.model.config import ModelConfig
from flexolmo_jax.model.head import head_logits
from flexolmo_jax.model.layers import (Array, Attention, KVCache, LayerCache, MLP, RMSNorm,
                                       constrain, dtype_of, param_with_axes)
from flexolmo_jax.model.moe import MoE, empty_aux

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderLayer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, expert_mask: Array | None,
               key_valid: Array | None, cache_index: Array | None, segment_ids: Array | None,
               cache: LayerCache | None):
    cfg = self.cfg
    x = constrain(x, ("act_batch", "act_length", "act_embed"))
    a, new_cache = Attention(cfg, name="self_attn")(x, positions, cache, key_valid, cache_index,
                                                     segment_ids)
    h = x + RMSNorm(cfg, ("norm",), name="post_attention_layernorm")(a)
    if cfg.is_moe:
      f, aux = MoE(cfg, name="mlp")(h, expert_mask)
    else:
      f, aux = MLP(cfg, name="mlp")(h), empty_aux(cfg, h.shape[:2])
    out = h + RMSNorm(cfg, ("norm",), name="post_feedforward_layernorm")(f)
    out = constrain(out, ("act_batch", "act_length", "act_embed"))
    return out, (new_cache, aux)


class ScannedLayers(nn.Module):
  """Runs cfg.n_layers DecoderLayers; scan carries x, the per-layer cache is scanned over."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, expert_mask, key_valid, cache_index, segment_ids, cache):
    cfg = self.cfg
    layer_cls = DecoderLayer
    if cfg.remat_policy != "none":
      layer_cls = nn.remat(DecoderLayer, policy=REMAT_POLICIES[cfg.remat_policy],
                           prevent_cse=not cfg.scan_layers or cfg.scan_unroll > 1)
    if cfg.scan_layers:
      scanned = nn.scan(
          layer_cls,
          variable_axes={"params": 0, "intermediates": 0, "expert_slots": 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast,) * 5 + (0,),
          length=cfg.n_layers,
          unroll=cfg.scan_unroll,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      return scanned(cfg, name="layers")(x, positions, expert_mask, key_valid, cache_index,
                                         segment_ids, cache)
    # Unrolled (debugging / tiny models): same maths, per-layer parameter names.
    outs = []
    for i in range(cfg.n_layers):
      layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
      x, out = layer_cls(cfg, name=f"layers_{i}")(x, positions, expert_mask, key_valid,
                                                   cache_index, segment_ids, layer_cache)
      outs.append(out)
    return x, jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


class FlexOlmo(nn.Module):
  """Causal LM. __call__(input_ids [B,T]) -> (logits [B,T,V] f32, aux, new_cache).

  return_logits=False returns the final normed hidden state [B,T,d] in place of the logits
  (the head is still a param): the chunked loss applies `model.head.apply_head` per block.

  expert_mask: optional bool [B, E], True = expert allowed for that example (run-time opt-out).
  segment_ids: optional int [B, T] document ids of packed rows: a token attends only to earlier
  tokens with the same id (None: the whole row, as the reference trains, unless
  `cfg.document_mask` derives them from EOS tokens). Not with a cache.
  cache: optional KVCache for prefill/decode (see `init_cache`); positions default to
  cache.index + arange(T) (or arange(T) without a cache).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, input_ids: Array, positions: Array | None = None,
               expert_mask: Array | None = None, cache: KVCache | None = None,
               input_valid: Array | None = None, return_hidden: bool = False,
               return_logits: bool = True, segment_ids: Array | None = None):
    cfg = self.cfg
    B, T = input_ids.shape
    init = nn.initializers.normal(cfg.init_std)
    embedding = param_with_axes(self, "embed_tokens", (cfg.vocab_size, cfg.d_model),
                                ("vocab", "embed"), init, cfg)
    x = jnp.take(embedding, input_ids, axis=0).astype(dtype_of(cfg.dtype))
    x = constrain(x, ("act_batch", "act_length", "act_embed"))

    start = jnp.zeros((), jnp.int32) if cache is None else cache.index
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    if expert_mask is not None and cfg.is_moe and expert_mask.shape != (B, cfg.num_experts):
      raise ValueError(f"expert_mask shape {expert_mask.shape} != (batch={B}, experts={cfg.num_experts})")

    if segment_ids is None and cfg.document_mask and cache is None:
      # Document masking of packed rows: a document ends with its EOS, the next token starts
      # another. Positions are left as they are: RoPE scores depend on differences only.
      eos = (input_ids == cfg.eos_token_id).astype(jnp.int32)
      segment_ids = jnp.cumsum(eos, axis=1) - eos
    if cache is None:
      key_valid = None
      layer_cache = None
    else:
      if input_valid is None:
        input_valid = jnp.ones((B, T), bool)
      key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, input_valid, cache.index, axis=1)
      layer_cache = LayerCache(cache.k, cache.v)

    x, (new_layer_cache, aux) = ScannedLayers(cfg, name="decoder")(
        x, positions, expert_mask, key_valid, cache.index if cache is not None else None,
        segment_ids, layer_cache)

    if return_hidden:  # final residual stream, before the last norm (domain embeddings)
      return x
    x = RMSNorm(cfg, ("norm",), name="norm")(x)
    lm_head = param_with_axes(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                              init, cfg)
    logits = head_logits(x, lm_head, cfg) if return_logits else x
    new_cache = None
    if cache is not None:
      # Every layer's new chunk [L, B, T, Hkv, D] written at slots [index, index + T) in one
      # update (in place when the cache is a loop carry or donated).
      write = lambda full, chunk: jax.lax.dynamic_update_slice_in_dim(
          full, chunk.astype(full.dtype), cache.index, axis=2)
      new_cache = KVCache(write(cache.k, new_layer_cache.k), write(cache.v, new_layer_cache.v),
                          key_valid, cache.index + T)
    return logits, aux, new_cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  dtype = dtype or dtype_of(cfg.dtype)
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), bool),
                 jnp.zeros((), jnp.int32))
