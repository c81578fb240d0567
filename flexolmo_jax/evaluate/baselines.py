"""Merging baselines of the FlexOlmo paper, for the demo's comparison table.

  model soup  one dense model whose FFN is the average of the public FFN and every expert's
              FFN (all other tensors are shared, hence identical);
  BTM         an output ensemble of the owners' 2-expert models weighted by a domain
              posterior (Li et al. 2022, "Branch-Train-Merge"): the weight of member m at
              position t is P(m | x_<t), Bayes' rule from a uniform prior and each member's
              own likelihood of the row so far, prod_{s<t} p_m(x_s | x_<s); no extra data.
              `weighting="uniform"` gives the plain average of the members' probabilities.
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


WEIGHTINGS = ("posterior", "uniform")


def mixture_log_prob(lp, mask, weighting: str = "posterior"):
  """log p_mix(x_t | x_<t) [B, T] from the members' log-probabilities lp [M, B, T].

  posterior: log w_m(t) = c_m(t) - logsumexp_m c_m(t), c_m(t) = sum_{s<t} mask_s lp_m(s)
  (the log-likelihood of the row's scored tokens before t); uniform: w_m = 1 / M.
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting {weighting!r} not in {WEIGHTINGS}")
  lp = jnp.asarray(lp, jnp.float32)
  if weighting == "uniform":
    return jax.nn.logsumexp(lp, axis=0) - np.log(lp.shape[0])
  scored = lp * jnp.asarray(mask, jnp.float32)[None]
  context = jnp.cumsum(scored, axis=-1) - scored  # exclusive: tokens before t only
  log_w = context - jax.nn.logsumexp(context, axis=0, keepdims=True)
  return jax.nn.logsumexp(log_w + lp, axis=0)


def ensemble_losses(members: list[tuple[ModelConfig, dict]], loader, rules=(),
                    weightings=WEIGHTINGS) -> dict[str, float]:
  """{weighting: mean token loss of that mixture of the members' next-token distributions}
  (see `mixture_log_prob`); the members score each batch once for every weighting.

  Each member is scored by the evaluation step every other evaluation uses
  (`steps.make_logprob_fn`); the mixture is formed per token in fp32.
  """
  fns = [jax.jit(steps.make_logprob_fn(cfg, rules)) for cfg, _ in members]
  mix_fn = jax.jit(mixture_log_prob, static_argnames="weighting")
  total = dict.fromkeys(weightings, 0.0)
  count = 0.0
  for local in loader:
    b = steps.global_batch(local)
    lp = jnp.stack([fn(p, b) for fn, (_, p) in zip(fns, members)])  # [M, B, T]
    mask = np.asarray(local["loss_mask"], np.float64)
    for w in weightings:
      mix = mix_fn(lp, b["loss_mask"], weighting=w)
      total[w] += float(np.sum(-np.asarray(mix, np.float64) * mask))
    count += float(mask.sum())
  return {w: total[w] / count if count else float("nan") for w in weightings}


def ensemble_loss(members: list[tuple[ModelConfig, dict]], loader, rules=(),
                  weighting: str = "posterior") -> float:
  """Mean token loss of one mixture (`ensemble_losses` with one weighting)."""
  return ensemble_losses(members, loader, rules, (weighting,))[weighting]


def model_loss(cfg: ModelConfig, params, loader, rules=()) -> float:
  """Mean token loss of one model over a loader (exact over the split): the loss step."""
  return steps.mean_loss(jax.jit(steps.make_loss_fn(cfg, rules, routing=False)), params, loader)
