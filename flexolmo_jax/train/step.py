"""The jitted training step: only the trainable part is differentiated and updated.

    state  = {"step", "params" (trainable, flat), "opt_state", "skipped"}   (donated)
    frozen = flat dict of frozen params: a plain, non-differentiated input

A step whose loss or gradient is not finite leaves the state unchanged and counts itself in
`skipped`; the trainer stops at the next check and never checkpoints such a state.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flexolmo_jax.model import FlexOlmo
from flexolmo_jax.train.losses import model_token_losses, objective_from_token_losses


def init_state(trainable, tx):
  return {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": tx.init(trainable),
          "skipped": jnp.zeros((), jnp.int32)}


def make_step_fn(cfg, partition, tx, schedule, tc, rules):
  model = FlexOlmo(cfg)

  def loss_fn(trainable, frozen, batch):
    variables = partition.model_variables(trainable, frozen)
    with nn.logical_axis_rules(rules):
      # logits_chunk > 0: the model returns the normed hidden state and the head + loss run
      # in blocks, so [B, T, V] logits never exist (nor their gradient).
      out, aux, _ = model.apply(variables, batch["input_ids"], return_logits=not cfg.logits_chunk)
      ce, lse = model_token_losses(cfg, variables["params"], out, batch["targets"])
    return objective_from_token_losses(ce, lse, aux, batch, tc)

  accum = int(tc.get("grad_accum_steps", 1) or 1)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulated(params, frozen, batch):
    """Gradient of the whole batch from `accum` micro-batches, one at a time (a scan), so
    activation memory is that of one micro-batch.

    Token-mean terms (cross-entropy, output and router z-loss) are weighted by each
    micro-batch's share of the batch's loss tokens: the sum is then the full-batch loss and
    gradient exactly, except the load-balance term (a product of batch means), which becomes
    the mean of the micro-batches' terms.
    """
    B = batch["input_ids"].shape[0]
    if B % accum:
      raise ValueError(f"global_batch_size {B} is not a multiple of grad_accum_steps {accum}")
    # Micro-batch i takes rows i, i + accum, ...: every data shard holds rows of every
    # micro-batch, so no rows move between devices.
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(B // accum, accum, *x.shape[1:]), 0, 1),
                         batch)
    with nn.logical_axis_rules(rules):
      micro = jax.tree.map(
          lambda x: nn.with_logical_constraint(x, (None, "act_batch", "act_length")), micro)
    total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

    def micro_loss(p, mb):
      _, m = loss_fn(p, frozen, mb)
      token_terms = (m["ce"] + tc.output_z_loss * m["output_z_loss"]
                     + tc.router_z_loss * m["router_z_loss"])
      balance = tc.load_balance * m["load_balance_loss"]
      return token_terms * (m["tokens"] / total_tokens) + balance / accum, m

    def one(acc, mb):
      (part, m), g = jax.value_and_grad(micro_loss, has_aux=True)(params, mb)
      w = m["tokens"] / total_tokens
      acc_g, acc_m = acc
      acc_g = jax.tree.map(jnp.add, acc_g, g)
      # loss: the surrogate's parts sum to the batch loss; token means weighted by tokens;
      # counts summed; every other metric (load balance, expert shares) averaged.
      weight = {"loss": None, "ce": w, "output_z_loss": w, "router_z_loss": w, "tokens": 1,
                "dropped": 1}
      acc_m = {k: acc_m[k] + (part if k == "loss" else
                              (m[k] * weight[k] if k in weight else m[k] / accum).astype(acc_m[k].dtype))
               for k in acc_m}
      return (acc_g, acc_m), None

    shapes = jax.eval_shape(lambda mb: loss_fn(params, frozen, mb)[1],
                            jax.tree.map(lambda x: x[0], micro))
    zeros = (jax.tree.map(jnp.zeros_like, params),
             jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes))
    (grads, metrics), _ = jax.lax.scan(one, zeros, micro)
    return (metrics["loss"], metrics), grads

  def step(state, frozen, batch):
    if accum == 1:
      (loss, metrics), grads = grad_fn(state["params"], frozen, batch)
    else:
      (loss, metrics), grads = accumulated(state["params"], frozen, batch)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    update_norm = optax.tree.norm(updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = {"step": state["step"] + 1, "params": keep(params, state["params"]),
                 "opt_state": keep(opt_state, state["opt_state"]),
                 "skipped": state["skipped"] + (~ok).astype(jnp.int32)}
    metrics = dict(metrics, grad_norm=grad_norm, update_norm=update_norm,
                   lr=schedule(state["step"]), finite=ok)
    return new_state, metrics

  return step
