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
from flexolmo_jax.train.losses import objective


def init_state(trainable, tx):
  return {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": tx.init(trainable),
          "skipped": jnp.zeros((), jnp.int32)}


def make_step_fn(cfg, partition, tx, schedule, tc, rules):
  model = FlexOlmo(cfg)

  def loss_fn(trainable, frozen, batch):
    params = partition.merge(trainable, frozen)
    with nn.logical_axis_rules(rules):
      logits, aux, _ = model.apply({"params": params}, batch["input_ids"])
    return objective(logits, aux, batch, tc)

  def step(state, frozen, batch):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], frozen,
                                                                      batch)
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
