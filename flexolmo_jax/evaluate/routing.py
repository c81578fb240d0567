"""Where the router sends tokens: mean router probability per layer and expert on a dataset.

Used to show what the learned expert bias does: an owner's 2-expert model evaluated on
public and on its own domain's text, with its bias as trained and with the bias removed.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.evaluate import steps
from flexolmo_jax.model import FlexOlmo, ModelConfig


@functools.lru_cache(maxsize=8)  # one compilation per model config, reused across datasets
def _probs_fn(cfg: ModelConfig, rules):
  def fn(params, batch):
    with nn.logical_axis_rules(rules):
      _, state = FlexOlmo(cfg).apply({"params": params}, batch["input_ids"],
                                     return_logits=False, mutable=["intermediates"])
    inter = state["intermediates"]["decoder"]
    probs = (inter["layers"]["mlp"]["router_probs"][0] if cfg.scan_layers else jnp.stack(
        [inter[f"layers_{i}"]["mlp"]["router_probs"][0] for i in range(cfg.n_layers)]))
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.einsum("lbte,bt->le", probs, mask), jnp.sum(mask)
  return jax.jit(fn)


def expert_probability(cfg: ModelConfig, params, loader, rules=()) -> np.ndarray:
  """[L, E]: the router's mean probability of each expert over the loader's loss tokens."""
  if not cfg.is_moe:
    raise ValueError("expert_probability needs an MoE model")
  fn = _probs_fn(cfg, steps.hashable_rules(rules))
  total, count = np.zeros((cfg.n_layers, cfg.num_experts)), 0.0
  for local in loader:
    s, n = fn(params, steps.global_batch(local))
    total += np.asarray(s, np.float64)
    count += float(n)
  if not count:
    raise ValueError("expert_probability: the loader gave no loss tokens")
  return total / count


def without_bias(params):
  """The same params with the expert bias set to 0 (as if it had never been learned)."""
  mlp = params["decoder"]["layers"]["mlp"]
  return dict(params, decoder=dict(params["decoder"], layers=dict(
      params["decoder"]["layers"], mlp=dict(mlp, router_bias=jnp.zeros_like(mlp["router_bias"])))))
