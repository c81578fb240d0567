"""Merging baselines of the FlexOlmo paper, for the demo's comparison table.

  model soup  one dense model whose FFN is the average of the public FFN and every expert's
              FFN (all other tensors are shared, hence identical);
  BTM         an output ensemble of the owners' 2-expert models: the mixture's probability
              of a token is the uniform average of the members' probabilities (the paper's
              BTM weights members by a domain posterior; the uniform mixture is the simplest
              member of that family and needs no extra data).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.storage import model_io
from flexolmo_jax.evaluate import steps
from flexolmo_jax.model import ModelConfig

FFN = ("gate_proj", "up_proj", "down_proj")


def model_soup(public_dir, expert_dirs) -> tuple[ModelConfig, dict]:
  """Dense params: shared tensors from the public model, FFN = mean of all FFNs."""
  pub_cfg = model_io.read_config(public_dir)
  pub = jax.device_get(model_io.load_params(public_dir, pub_cfg))
  ffns = [[pub["decoder"]["layers"]["mlp"][k] for k in FFN]]
  for d in expert_dirs:
    cfg = model_io.read_config(d)
    p = jax.device_get(model_io.load_params(d, cfg))
    ffns.append([p["decoder"]["layers"]["mlp"][k][:, 1] for k in FFN])  # slot 1 = the expert
    del p
  mlp = {k: np.mean([f[i] for f in ffns], axis=0).astype(ffns[0][i].dtype)
         for i, k in enumerate(FFN)}
  layers = dict(pub["decoder"]["layers"], mlp=mlp)
  return pub_cfg, dict(pub, decoder=dict(pub["decoder"], layers=layers))


def ensemble_loss(members: list[tuple[ModelConfig, dict]], loader, rules=()) -> float:
  """Mean token loss of the uniform mixture of the members' next-token distributions.

  Each member is scored by the evaluation step every other evaluation uses
  (`steps.make_logprob_fn`); the mixture is formed per token in fp32.
  """
  fns = [jax.jit(steps.make_logprob_fn(cfg, rules)) for cfg, _ in members]
  total = count = 0.0
  for local in loader:
    b = steps.global_batch(local)
    lp = jnp.stack([fn(p, b) for fn, (_, p) in zip(fns, members)])  # [M, B, T]
    mix = jax.nn.logsumexp(lp, axis=0) - np.log(len(members))
    mask = np.asarray(local["loss_mask"], np.float64)
    total += float(np.sum(-np.asarray(mix, np.float64) * mask))
    count += float(mask.sum())
  return total / count if count else float("nan")


def model_loss(cfg: ModelConfig, params, loader, rules=()) -> float:
  """Mean token loss of one model over a loader (exact over the split): the loss step."""
  return steps.mean_loss(jax.jit(steps.make_loss_fn(cfg, rules, routing=False)), params, loader)
