"""The one evaluation step, and the jitted functions built on it.

Every evaluation in the project goes through `token_scores` (the forward pass + per-token
cross-entropy of the targets): training's validation loss, `python -m flexolmo_jax.evaluate`,
the merging baselines, the demo and the AOT planner (which lowers the same loss step for TPU).
With `cfg.logits_chunk > 0` the head + cross-entropy run in blocks (train/losses.py), so no
step here materialises [B, T, V] logits; none of them returns logits.

    loss step      (params, batch, expert_mask) -> summed token loss, token count, and the
                   number of (valid) tokens each expert received in each layer [L, E]
    score step     (params, batch, expert_mask) -> per-row summed log-likelihood of the masked
                   targets, and whether greedy decoding reproduces them (multiple choice)
    logprob step   (params, batch, expert_mask) -> per-token log-probability of the targets
                   [B, T] (output ensembles, e.g. BTM, mix these across models)

`batch` is {"input_ids", "targets", "loss_mask"} [B, T]; `expert_mask` is bool [B, E]
(None for a dense model). Inputs are global arrays sharded over the mesh's batch axes.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from flexolmo_jax.model import FlexOlmo, ModelConfig
from flexolmo_jax.parallel import activation_sharding
from flexolmo_jax.train.losses import model_token_losses

BATCH_KEYS = ("input_ids", "targets", "loss_mask")
BATCH_DTYPES = {"input_ids": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32}


def routed_tokens(state, cfg: ModelConfig):
  """[L, B, T, E] bool from the "intermediates" the MoE layers sow (scanned or unrolled)."""
  inter = state["intermediates"]["decoder"]
  if cfg.scan_layers:
    return inter["layers"]["mlp"]["routed"][0]
  return jnp.stack([inter[f"layers_{i}"]["mlp"]["routed"][0] for i in range(cfg.n_layers)])


def _apply(cfg, params, ids, expert_mask, routing: bool):
  """(logits, or the normed hidden state when cfg.logits_chunk > 0; routed or None)."""
  model = FlexOlmo(cfg)
  kw = dict(expert_mask=expert_mask, return_logits=not cfg.logits_chunk)
  if routing and cfg.is_moe:
    (out, _, _), state = model.apply({"params": params}, ids, mutable=["intermediates"], **kw)
    return out, routed_tokens(state, cfg)
  out, _, _ = model.apply({"params": params}, ids, **kw)
  return out, None


def token_scores(cfg: ModelConfig, rules, params, batch, expert_mask=None,
                 routing: bool = False, argmax: bool = False):
  """(per-token cross-entropy [B, T] fp32, the greedy token [B, T] int32 with `argmax` (else
  None), routed [L, B, T, E] or None)."""
  with nn.logical_axis_rules(rules):  # the chunked head's constraints need the rules too
    out, routed = _apply(cfg, params, batch["input_ids"], expert_mask, routing)
    ce, _, *top = model_token_losses(cfg, params, out, batch["targets"], argmax)
  return ce, (top[0] if argmax else None), routed


def make_loss_fn(cfg: ModelConfig, rules, routing: bool = True):
  E = max(cfg.num_experts, 1)

  def fn(params, batch, expert_mask=None):
    ce, _, routed = token_scores(cfg, rules, params, batch, expert_mask, routing)
    mask = batch["loss_mask"].astype(jnp.float32)
    counts = (jnp.einsum("lbte,bt->le", routed.astype(jnp.float32), mask)
              if routed is not None else jnp.zeros((cfg.n_layers, E), jnp.float32))
    return {"loss_sum": jnp.sum(ce * mask), "tokens": jnp.sum(mask), "routed": counts}

  return fn


def make_score_fn(cfg: ModelConfig, rules):
  def fn(params, batch, expert_mask=None):
    ce, top, _ = token_scores(cfg, rules, params, batch, expert_mask, argmax=True)
    mask = batch["loss_mask"] > 0
    loglik = jnp.sum(jnp.where(mask, -ce, 0.0), axis=1)
    greedy = jnp.all(~mask | (top == batch["targets"]), axis=1)
    return {"loglik": loglik, "greedy": greedy}

  return fn


def make_logprob_fn(cfg: ModelConfig, rules):
  def fn(params, batch, expert_mask=None):
    ce, _, _ = token_scores(cfg, rules, params, batch, expert_mask)
    return -ce

  return fn


def global_batch(local: dict, shardings: dict | None = None) -> dict:
  """A process's rows of a global batch -> global arrays (`shardings`: one per batch key;
  None on one process: plain device arrays)."""
  if shardings is None:
    return {k: jnp.asarray(local[k]) for k in BATCH_KEYS}
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(local[k]))
          for k in BATCH_KEYS}


def mean_loss(step, params, batches, expert_mask=None, shardings=None) -> float:
  """Token-weighted mean loss of a loss step over batches (exact over a split: every token
  counted once, in float64 on the host)."""
  total = count = 0.0
  for local in batches:
    r = jax.device_get(step(params, global_batch(local, shardings), expert_mask))
    total += float(r["loss_sum"])
    count += float(r["tokens"])
  return total / count if count else float("nan")


def batch_shardings(mesh, rules, batch: int, seq_len: int) -> dict:
  return {k: activation_sharding(mesh, ("act_batch", "act_length"), (batch, seq_len), rules)
          for k in BATCH_KEYS}


def jit_step(fn, param_shardings, mesh, rules, batch: int, seq_len: int):
  """`fn` jitted with explicit shardings: params as given, batch over the batch axes, the
  expert mask and every output replicated (small)."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(fn, in_shardings=(param_shardings, batch_shardings(mesh, rules, batch, seq_len),
                                   replicated), out_shardings=replicated)


def abstract_batch(mesh, rules, batch: int, seq_len: int) -> dict:
  sh = batch_shardings(mesh, rules, batch, seq_len)
  return {k: jax.ShapeDtypeStruct((batch, seq_len), BATCH_DTYPES[k], sharding=sh[k])
          for k in BATCH_KEYS}


def hashable_rules(rules) -> tuple:
  """Axis rules as nested tuples, so a jitted step can be cached per (config, rules)."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in rules)
