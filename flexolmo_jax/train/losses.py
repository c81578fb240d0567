"""Training objective: cross-entropy + router z-loss + output z-loss (+ optional load balance)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_losses(logits, targets):
  """Per-token cross-entropy and logsumexp (fp32)."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - target_logit, lse


def objective(logits, aux, batch, tc):
  """Returns (loss, metrics). tc: the config's train block (loss weights)."""
  mask = batch["loss_mask"].astype(jnp.float32)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  ce, lse = token_losses(logits, batch["targets"])
  ce = jnp.sum(ce * mask) / n
  output_z = jnp.sum(jnp.square(lse) * mask) / n
  router_z = jnp.mean(aux["router_z_loss"])
  balance = jnp.mean(aux["load_balance_loss"])
  loss = ce + tc.router_z_loss * router_z + tc.output_z_loss * output_z + tc.load_balance * balance
  metrics = {"loss": loss, "ce": ce, "router_z_loss": router_z, "output_z_loss": output_z,
             "load_balance_loss": balance, "tokens": n,
             "expert_prob": jnp.mean(aux["expert_prob"], axis=0),
             "expert_fraction": jnp.mean(aux["expert_fraction"], axis=0),
             "dropped": jnp.sum(aux["dropped"])}
  return loss, metrics
