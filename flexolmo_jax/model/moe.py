"""Mixture-of-experts FFN: FlexOlmo router plus three interchangeable dispatch strategies.

Router (FLEXOLMO.md section 3): logits = h @ W_r.T (+ min(b, 0) on non-public experts),
softmax over all experts in fp32 (excluded experts get -inf), top-k, no renormalisation
unless `norm_topk_prob`.

An excluded expert must have no influence at all, even if its weights were NaN: every
combine step *selects* (jnp.where) instead of multiplying by a zero weight, because
0 * NaN is NaN.

Dispatch strategies (same maths, different cost):
  dense     every expert on every token; right when top_k == num_experts (expert training).
  capacity  einsum dispatch/combine into [batch, E, C] buffers, C = ceil(cf * T * k / E);
            overflowing assignments are dropped and counted (CPU-friendly, static shapes).
  dropless  sort assignments by expert and run grouped matmuls (the TPU path); expert-parallel
            (tokens exchanged over the mesh's expert axis) when that axis is > 1.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from flexolmo_jax.model import expert_slots
from flexolmo_jax.model import expert_parallel
from flexolmo_jax.model.config import ModelConfig
from flexolmo_jax.model.grouped_matmul import (grouped_matmul, grouped_matmul_impl,
                                               interpret_kernels)
from flexolmo_jax.model.layers import Array, constrain, dot, dtype_of, param_with_axes


def route(h: Array, w_router: Array, bias: Array | None, expert_mask: Array | None,
          top_k: int, norm_topk_prob: bool):
  """Returns (logits [B,T,E] f32, probs [B,T,E] f32, top_w [B,T,k], top_i [B,T,k], valid [B,T,k]).

  `valid` marks assignments to allowed experts; a top-k slot that lands on an excluded expert
  (possible when k exceeds the number of allowed experts) carries weight 0 and is ignored.
  """
  logits = jnp.einsum("btd,ed->bte", h.astype(jnp.float32), w_router.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
  E = w_router.shape[0]
  if bias is not None:
    # Slot 0 is the public expert: it never gets a bias.
    non_public = jnp.arange(E) > 0
    logits = logits + jnp.where(non_public, jnp.minimum(bias.astype(jnp.float32), 0.0), 0.0)
  if expert_mask is None:
    allowed = jnp.ones((h.shape[0], E), bool)
  else:
    allowed = expert_mask.astype(bool)
  logits = jnp.where(allowed[:, None, :], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  top_w, top_i = jax.lax.top_k(probs, top_k)
  if norm_topk_prob:
    top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
  valid = jnp.take_along_axis(jnp.broadcast_to(allowed[:, None, :], probs.shape), top_i, axis=-1)
  return logits, probs, top_w, top_i, valid


def _swiglu_experts(x: Array, w1, w3, w2, cfg: ModelConfig, spec_in: str, spec_out: str,
                    x_per_expert: bool = False) -> Array:
  """SwiGLU of every expert, expert axis first. Weights split into groups (ExpertSlots: the
  expert stage's frozen and trainable slots) run one einsum per group, so a frozen group has
  no weight gradient; `x_per_expert`: x has a leading expert axis, cut per group too."""
  def swiglu(a, b, c, xs=x):
    g = dot(spec_in, xs, a, cfg, jnp.float32)
    u = dot(spec_in, xs, b, cfg, jnp.float32)
    return dot(spec_out, nn.silu(g) * u, c, cfg, jnp.float32)
  return expert_slots.run_groups(swiglu, (w1, w3, w2), (x,) if x_per_expert else ())


def dispatch_dense(h, w1, w3, w2, top_w, top_i, valid, cfg):
  E = cfg.num_experts
  onehot = jax.nn.one_hot(top_i, E, dtype=bool) & valid[..., None]  # [B,T,k,E]
  routed = jnp.any(onehot, axis=2)  # [B,T,E]
  weight = jnp.sum(jnp.where(onehot, top_w[..., None], 0.0), axis=2)  # [B,T,E]
  # Expert-major [E,B,T,d] (XLA:CPU lacks bf16->f32 batched dots with a middle batch dim).
  out = _swiglu_experts(h, w1, w3, w2, cfg, "btd,edf->ebtf", "ebtf,efd->ebtd")
  out = constrain(out, ("act_exp", "act_batch", "act_length", "act_embed"))
  routed, weight = jnp.moveaxis(routed, -1, 0), jnp.moveaxis(weight, -1, 0)
  y = jnp.sum(jnp.where(routed[..., None], weight[..., None] * out, 0.0), axis=0)
  return y, jnp.zeros((), jnp.int32)


def capacity(cfg: ModelConfig, tokens_per_group: int) -> int:
  c = math.ceil(cfg.capacity_factor * tokens_per_group * cfg.top_k / cfg.num_experts)
  return max(1, min(c, tokens_per_group))


def _capacity_slots(top_i, valid, C: int, E: int):
  """Buffer slot of every assignment, GShard priority: all top-1 picks claim slots before any
  top-2 pick, then token order. Returns (pos [B,T,k] int, keep [B,T,k] bool)."""
  B, T, k = top_i.shape
  onehot = jax.nn.one_hot(top_i, E, dtype=jnp.int32) * valid[..., None]  # [B,T,k,E]
  prio = jnp.swapaxes(onehot, 1, 2).reshape(B, k * T, E)
  pos = (jnp.cumsum(prio, axis=1) - 1).reshape(B, k, T, E).swapaxes(1, 2)  # [B,T,k,E]
  pos = jnp.take_along_axis(pos, top_i[..., None], axis=-1)[..., 0]
  return pos, valid & (pos < C)


def dispatch_capacity(h, w1, w3, w2, top_w, top_i, valid, cfg):
  """Static-shape expert buffers [E, B, C, d], one group per batch row; overflow is dropped.

  Two formulations of the same maths: `einsum` (one-hot dispatch/combine tensors, GShard
  style: dense MXU work, the TPU choice) and `gather` (index the same slots; far cheaper on
  CPU/GPU where the one-hot einsums cost ~2 * B * T * E * C * d FLOPs each).
  """
  B, T, k = top_i.shape
  E, d = cfg.num_experts, h.shape[-1]
  C = capacity(cfg, T)
  pos, keep = _capacity_slots(top_i, valid, C, E)
  dt = dtype_of(cfg.dtype)
  impl = cfg.capacity_impl
  if impl == "auto":
    impl = "einsum" if cfg.kernel_platform == "tpu" else "gather"
  b_idx = jnp.arange(B)[:, None, None]
  if impl == "einsum":
    slot = jax.nn.one_hot(jnp.where(keep, pos, -1), C, dtype=bool)[..., None, :]  # [B,T,k,1,C]
    slot = slot & jax.nn.one_hot(top_i, E, dtype=bool)[..., None]  # [B,T,k,E,C]
    dispatch = jnp.any(slot, axis=2)  # [B,T,E,C] (the k experts of a token are distinct)
    combine = jnp.sum(jnp.where(slot, top_w[..., None, None], 0.0), axis=2)
    # Expert-major buffers: XLA:CPU has no bf16->f32 batched dot with the batch (expert)
    # dimension in the middle, and expert-major is the natural all-to-all layout.
    x_in = jnp.einsum("btec,btd->ebcd", dispatch.astype(dt), h.astype(dt))
    used = jnp.any(dispatch, axis=1).transpose(1, 0, 2)  # [E,B,C]
  else:
    token = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :, None], (B, T, k))
    slot_token = jnp.full((E, B, C), T, jnp.int32).at[
        jnp.where(keep, top_i, E), jnp.broadcast_to(b_idx, (B, T, k)), jnp.minimum(pos, C - 1)
    ].set(token, mode="drop")  # dropped assignments scatter out of range and vanish
    h_pad = jnp.concatenate([h.astype(dt), jnp.zeros((B, 1, d), dt)], axis=1)  # row T = empty
    x_in = h_pad[jnp.arange(B)[None, :, None], slot_token]  # [E,B,C,d]
    used = slot_token < T
  x_in = constrain(x_in, ("act_exp", "act_batch", None, "act_embed"))
  out = _swiglu_experts(x_in, w1, w3, w2, cfg, "ebcd,edf->ebcf", "ebcf,efd->ebcd",
                        x_per_expert=True)
  out = jnp.where(used[..., None], out, 0.0)  # empty slots (and excluded experts) contribute 0
  if impl == "einsum":
    y = jnp.einsum("btec,ebcd->btd", combine, out)
  else:
    picked = out[top_i, b_idx, jnp.minimum(pos, C - 1)]  # [B,T,k,d]
    y = jnp.sum(jnp.where(keep[..., None], top_w[..., None] * picked, 0.0), axis=2)
  dropped = jnp.sum(valid) - jnp.sum(keep)
  return y, dropped.astype(jnp.int32)


def dispatch_dropless(h, w1, w3, w2, top_w, top_i, valid, cfg):
  """Sort token assignments by expert and run grouped matmuls; nothing is dropped.

  On a mesh with an expert axis > 1 the experts stay where they are and tokens travel
  (model/expert_parallel.py); otherwise the assignments of the whole batch are sorted here.
  """
  E, d, f = w1.shape
  lay = expert_parallel.layout(cfg, E, d, f)
  if lay is not None:
    return expert_parallel.dispatch(h, w1, w3, w2, top_w, top_i, valid, cfg, lay), \
        jnp.zeros((), jnp.int32)
  B, T, k = top_i.shape
  dt = dtype_of(cfg.dtype)
  expert = jnp.where(valid, top_i, E).reshape(-1)  # excluded assignments -> sentinel group E
  order = jnp.argsort(expert, stable=True)
  sorted_expert = expert[order]
  used = sorted_expert < E
  # Rows of the sentinel group read a zero row: kernels leave rows past the last group
  # unspecified (megablox: NaN in both passes), so they must not alias a real token.
  x = jnp.concatenate([h.reshape(B * T, d).astype(dt), jnp.zeros((1, d), dt)])
  x_sorted = x[jnp.where(used, order // k, B * T)]
  group_sizes = jnp.bincount(expert, length=E + 1)[:E].astype(jnp.int32)
  impl, interpret = grouped_matmul_impl(cfg), interpret_kernels(cfg)

  def gmm(a, w):
    return grouped_matmul(a.astype(dt), w.astype(dt), group_sizes, impl, interpret=interpret)

  a = nn.silu(gmm(x_sorted, w1)) * gmm(x_sorted, w3)
  o = gmm(a, w2)
  o = jnp.where(used[:, None], o, 0.0)  # rows of the sentinel group are unused
  out = jnp.zeros_like(o).at[order].set(o).reshape(B, T, k, d)
  y = jnp.sum(jnp.where(valid[..., None], top_w[..., None] * out, 0.0), axis=2)
  return y, jnp.zeros((), jnp.int32)


DISPATCH = {"dense": dispatch_dense, "capacity": dispatch_capacity, "dropless": dispatch_dropless}


class MoE(nn.Module):
  """FlexOlmo MoE FFN with experts stacked on a leading [E] axis.

  Returns (y [B,T,d], aux) where aux holds router z-loss, load-balance statistics and the
  number of dropped assignments for this layer.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h: Array, expert_mask: Array | None = None):
    cfg = self.cfg
    E, d, f = cfg.num_experts, cfg.d_model, cfg.ffn_hidden
    init = nn.initializers.normal(cfg.init_std)

    def weight(name, shape, axes, init):
      # The training step may hand a stacked weight over as separate slot groups (frozen
      # public expert, trainable expert): see model/expert_slots.py.
      if self.has_variable(expert_slots.COLLECTION, name):
        return expert_slots.ExpertSlots(
            self.get_variable(expert_slots.COLLECTION, name).parts,
            self.get_variable(expert_slots.COLLECTION, name).slots, axis=0)
      return param_with_axes(self, name, shape, axes, init, cfg)

    w_router = expert_slots.stacked(weight("router", (E, d), ("exp", "embed"), init))
    bias = (expert_slots.stacked(weight("router_bias", (E,), ("exp",), nn.initializers.zeros))
            if cfg.expert_bias else None)
    w1 = weight("gate_proj", (E, d, f), ("exp", "embed", "mlp"), init)
    w3 = weight("up_proj", (E, d, f), ("exp", "embed", "mlp"), init)
    w2 = weight("down_proj", (E, f, d), ("exp", "mlp", "embed"), init)

    logits, probs, top_w, top_i, valid = route(h, w_router, bias, expert_mask, cfg.top_k,
                                               cfg.norm_topk_prob)
    if cfg.dispatch not in ("dense", "capacity"):  # these two run slot groups separately
      w1, w3, w2 = (expert_slots.stacked(w) for w in (w1, w3, w2))
    y, dropped = DISPATCH[cfg.dispatch](h, w1, w3, w2, top_w, top_i, valid, cfg)

    # Per-token routing [B,T,E] for analysis tools: only kept when the caller makes the
    # "intermediates" collection mutable (otherwise sow is a no-op and XLA drops it).
    self.sow("intermediates", "routed",
             jnp.any(jax.nn.one_hot(top_i, E, dtype=bool) & valid[..., None], axis=2))
    self.sow("intermediates", "router_probs", probs)  # [B,T,E] fp32, e.g. the bias's effect
    n_tokens = h.shape[0] * h.shape[1]
    assigned = jnp.sum(jax.nn.one_hot(top_i, E) * valid[..., None], axis=(0, 1, 2)) / n_tokens
    mean_prob = jnp.mean(probs, axis=(0, 1))
    aux = {
        # per token [B, T]: logsumexp(router logits)^2 (excluded experts' -inf terms vanish);
        # the objective takes its mean over loss tokens (train/losses.py)
        "router_z_loss": jnp.square(jax.nn.logsumexp(logits, axis=-1)),
        # Switch-style E * sum_e f_e * p_e with f_e the share of assignments
        "load_balance_loss": E * jnp.sum(assigned / cfg.top_k * mean_prob),
        "expert_fraction": assigned,  # share of tokens sent to each expert (sums to ~k)
        "expert_prob": mean_prob,
        "dropped": dropped,
    }
    return y.astype(dtype_of(cfg.dtype)), aux


def empty_aux(cfg: ModelConfig, tokens_shape: tuple[int, int]):
  E = max(cfg.num_experts, 1)
  z = jnp.zeros((), jnp.float32)
  return {"router_z_loss": jnp.zeros(tokens_shape, jnp.float32), "load_balance_loss": z,
          "expert_fraction": jnp.zeros((E,)),
          "expert_prob": jnp.zeros((E,)), "dropped": jnp.zeros((), jnp.int32)}
