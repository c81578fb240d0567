"""Training objective: cross-entropy + router z-loss + output z-loss (+ optional load balance).

Per-token losses come from full logits (`token_losses`) or, when `cfg.logits_chunk > 0`, from
the normed hidden state one block of `logits_chunk` positions at a time
(`chunked_token_losses`): [B, T, V] fp32 logits never exist, forward or backward.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flexolmo_jax.model.head import head_logits, lm_head_weight


def token_losses(logits, targets):
  """Per-token cross-entropy and logsumexp (fp32)."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - target_logit, lse


def _block_losses(x, lm_head, targets, cfg, argmax: bool):
  """One block: x [B, c, d] -> (ce, lse[, argmax]) [B, c]; its logits die inside."""
  logits = head_logits(x, lm_head, cfg)  # [B, c, V] fp32, vocab axis sharded
  lse = jax.nn.logsumexp(logits, axis=-1)
  # The target logit and the argmax as masked reductions, not a gather along the vocab axis:
  # with the vocabulary sharded each shard reduces its own slice and only [B, c] values are
  # all-reduced (a gather would all-gather the block's logits).
  # [1, 1, V]: broadcasts inside the fusions (no [B, c, V] int buffer) and each vocab shard
  # makes its own slice of it (a 1-D arange got all-gathered).
  vocab = jax.lax.broadcasted_iota(jnp.int32, (1, 1, logits.shape[-1]), 2)
  target_logit = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
  out = (lse - target_logit, lse)
  if argmax:  # first index of the maximum, as jnp.argmax
    top = jnp.max(logits, axis=-1, keepdims=True)
    out += (jnp.min(jnp.where(logits == top, vocab, logits.shape[-1]), axis=-1),)
  return out


def chunked_token_losses(x, lm_head, targets, cfg, argmax: bool = False):
  """Per-token (ce, lse) [B, T] fp32 (and the greedy token [B, T] int32 with `argmax`) from
  the normed hidden state x [B, T, d] and the head [d, V], in blocks of [B, cfg.logits_chunk]
  positions.

  Blocks run in a loop; each is rematerialised (jax.checkpoint), so the backward pass
  recomputes a block's logits instead of storing them: peak memory O(B * chunk * V), not
  O(B * T * V). Blocks run along T (the batch axis stays whole and sharded in every block).
  T not a multiple of the chunk is zero-padded; the padded positions are cut off the outputs,
  so they carry no loss and no gradient.
  """
  B, T, d = x.shape
  c = min(cfg.logits_chunk, T)
  n = -(-T // c)
  pad = n * c - T
  if pad:
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  xs = x.reshape(B, n, c, d).swapaxes(0, 1)  # [n, B, c, d]: loop over axis 0
  ts = targets.reshape(B, n, c).swapaxes(0, 1)
  block = jax.checkpoint(lambda a: _block_losses(a[0], lm_head, a[1], cfg, argmax))
  outs = jax.lax.map(block, (xs, ts))
  return tuple(o.swapaxes(0, 1).reshape(B, n * c)[:, :T] for o in outs)


def model_token_losses(cfg, params, out, targets, argmax: bool = False):
  """Per-token (ce, lse[, argmax]) [B, T] of a FlexOlmo(cfg) output `out`, run with
  `return_logits=not cfg.logits_chunk`: full logits, or the normed hidden state (chunked)."""
  if cfg.logits_chunk:
    return chunked_token_losses(out, lm_head_weight(params), targets, cfg, argmax)
  ce, lse = token_losses(out, targets)
  return (ce, lse, jnp.argmax(out, axis=-1).astype(jnp.int32)) if argmax else (ce, lse)


def objective(logits, aux, batch, tc):
  """Returns (loss, metrics). tc: the config's train block (loss weights)."""
  ce, lse = token_losses(logits, batch["targets"])
  return objective_from_token_losses(ce, lse, aux, batch, tc)


def objective_from_token_losses(ce, lse, aux, batch, tc):
  """`objective` from per-token cross-entropy and logsumexp [B, T] (full or chunked)."""
  mask = batch["loss_mask"].astype(jnp.float32)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  ce = jnp.sum(ce * mask) / n
  output_z = jnp.sum(jnp.square(lse) * mask) / n
  # Router terms as OLMo-core combines them (nn/moe/loss.py, train_module.py): each layer's
  # z-loss is its sum of logsumexp^2 over tokens divided by the batch's loss tokens (here:
  # over loss tokens only, as the cross-entropy), and every layer's term is added to the
  # loss: a sum over layers, as is the load-balance term's.
  router_z = jnp.sum(aux["router_z_loss"] * mask) / n
  balance = jnp.sum(aux["load_balance_loss"])
  loss = ce + tc.router_z_loss * router_z + tc.output_z_loss * output_z + tc.load_balance * balance
  metrics = {"loss": loss, "ce": ce, "router_z_loss": router_z, "output_z_loss": output_z,
             "load_balance_loss": balance, "tokens": n,
             "expert_prob": jnp.mean(aux["expert_prob"], axis=0),
             "expert_fraction": jnp.mean(aux["expert_fraction"], axis=0),
             "dropped": jnp.sum(aux["dropped"])}
  return loss, metrics
