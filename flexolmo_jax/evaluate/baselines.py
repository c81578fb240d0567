"""Merging baselines of the FlexOlmo paper, for the demo's comparison table.

  model soup  one dense model whose FFN is the average of the public FFN and every expert's
              FFN (all other tensors are shared, hence identical);
  BTM         an output ensemble of the owners' 2-expert models weighted by a domain
              posterior (Li et al. 2022, "Branch-Train-Merge"): the weight of member m at
              position t is P(m | x_<t), Bayes' rule from a uniform prior and each member's
              own likelihood of the row so far, prod_{s<t} p_m(x_s | x_<s); no extra data.
              `weighting="uniform"` gives the plain average of the members' probabilities.
  prompt-based routing
              one member per sequence, chosen by a classifier of the row's first
              `prefix_tokens` tokens (the paper's prompt-routing baseline). The classifier is
              softmax regression over the public model's mean final hidden state of the prefix
              (the `--embedder=self` feature of data/domain_embedding.py, per row), trained
              only on what the coordinator may see: public data and the proxy text sampled from
              each owner's model (python -m flexolmo_jax.proxy_data), never an owner's data.
              The chosen member (an owner's 2-expert model, or the public model) then scores
              the whole row.

The BTX and unrestricted-MoE baselines are training runs, not functions here:
configs/flexmix_mini.py:btx and :unrestricted.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Mapping

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
  fns = [_logprob_fn(cfg, steps.hashable_rules(rules)) for cfg, _ in members]  # compiled once per member
  total = dict.fromkeys(weightings, 0.0)
  count = 0.0
  for local in loader:
    b = steps.global_batch(local)
    lp = jnp.stack([fn(p, b) for fn, (_, p) in zip(fns, members)])  # [M, B, T]
    mask = np.asarray(local["loss_mask"], np.float64)
    for w in weightings:
      mix = _mix_fn(lp, b["loss_mask"], weighting=w)
      total[w] += float(np.sum(-np.asarray(mix, np.float64) * mask))
    count += float(mask.sum())
  return {w: total[w] / count if count else float("nan") for w in weightings}


def ensemble_loss(members: list[tuple[ModelConfig, dict]], loader, rules=(),
                  weighting: str = "posterior") -> float:
  """Mean token loss of one mixture (`ensemble_losses` with one weighting)."""
  return ensemble_losses(members, loader, rules, (weighting,))[weighting]


def model_loss(cfg: ModelConfig, params, loader, rules=()) -> float:
  """Mean token loss of one model over a loader (exact over the split): the loss step."""
  return steps.mean_loss(_loss_fn(cfg, steps.hashable_rules(rules)), params, loader)


# The jitted steps are kept per (config, rules): every evaluation domain (and every call of
# the demo's baselines) reuses one compilation instead of tracing and compiling anew.
_mix_fn = jax.jit(mixture_log_prob, static_argnames="weighting")


@functools.lru_cache(maxsize=16)
def _loss_fn(cfg: ModelConfig, rules):
  return jax.jit(steps.make_loss_fn(cfg, rules, routing=False))


@functools.lru_cache(maxsize=16)
def _logprob_fn(cfg: ModelConfig, rules):
  """The jitted logprob step of a member (kept: each evaluation domain reuses it)."""
  return jax.jit(steps.make_logprob_fn(cfg, rules))


# --- prompt-based routing ----------------------------------------------------------------


def _prefix_feature_fn(cfg: ModelConfig):
  """jitted (params, ids [B, P], valid [B, P]) -> [B, d] fp32: the mean final hidden state
  (before the last norm) over each row's valid prefix positions. The model is causal, so a
  prefix's hidden states do not depend on what follows it."""
  from flexolmo_jax.model import FlexOlmo
  model = FlexOlmo(cfg)

  def fn(params, ids, valid):
    h = model.apply({"params": params}, ids, return_hidden=True).astype(jnp.float32)
    w = valid.astype(jnp.float32)[..., None]
    return jnp.sum(h * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)

  return jax.jit(fn)


def _rows(local):
  """(ids [B, T], valid [B, T], row has a scored token [B]) of a host batch."""
  valid = np.asarray(local["loss_mask"]) > 0
  return np.asarray(local["input_ids"]), valid, valid.any(axis=1)


@dataclasses.dataclass
class PromptRouter:
  """Softmax regression over standardised prefix features: label = argmax((f - mean) / scale
  @ weights + bias). `public` is the (cfg, params) the features come from (held by reference);
  `trained_on` records {label: rows} of the coordinator data it was fitted to."""
  labels: tuple[str, ...]
  prefix_tokens: int
  mean: np.ndarray
  scale: np.ndarray
  weights: np.ndarray  # [d, C]
  bias: np.ndarray  # [C]
  trained_on: dict[str, int]
  public: tuple[ModelConfig, Any] = dataclasses.field(repr=False, default=None)
  _features: Any = dataclasses.field(repr=False, default=None, compare=False)

  def features(self, ids, valid, prefix_tokens: int | None = None) -> np.ndarray:
    """[B, d] features of token rows ids, valid [B, T] from their first `prefix_tokens`
    positions (default: the router's own)."""
    if self._features is None:
      self._features = _prefix_feature_fn(self.public[0])
    p = self.prefix_tokens if prefix_tokens is None else int(prefix_tokens)
    ids = np.asarray(ids)[:, :p]
    valid = np.asarray(valid)[:, :p]
    return np.asarray(self._features(self.public[1], jnp.asarray(ids, jnp.int32),
                                     jnp.asarray(valid)), np.float64)

  def logits(self, features) -> np.ndarray:
    z = (np.asarray(features, np.float64) - self.mean) / self.scale
    return z @ self.weights + self.bias

  def predict(self, features) -> np.ndarray:
    """[B] indices into `labels`."""
    return np.argmax(self.logits(features), axis=-1)


def _as_loader(source, tokenizer, seq_len, batch_size, split):
  if isinstance(source, (str, pathlib.Path)):
    if not tokenizer or not seq_len:
      raise ValueError(f"coordinator data {source} is a directory: pass tokenizer= and seq_len=")
    from flexolmo_jax.data import make_eval_loader
    return make_eval_loader(str(source), str(tokenizer), int(seq_len), batch_size, 0, 1,
                            split=split)
  return source


def fit_softmax_regression(x, y, num_classes: int, l2: float = 1e-3, fit_steps: int = 500,
                           lr: float = 0.1):
  """(mean, scale, W, b) of a class-balanced, L2-regularised softmax regression on
  standardised x [N, d], fitted by full-batch Adam in numpy (small, convex: no compilation)."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.int64)
  mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
  z = np.concatenate([(x - mean) / scale, np.ones((len(x), 1))], axis=1)  # last column: bias
  counts = np.bincount(y, minlength=num_classes)
  if np.any(counts == 0):
    raise ValueError(f"every class needs rows; counts {counts.tolist()}")
  # Each class weighs the same whatever its row count (proxy sets are small).
  row_w = 1.0 / (num_classes * counts[y])
  onehot = np.eye(num_classes)[y]
  w = np.zeros((z.shape[1], num_classes))
  m = v = np.zeros_like(w)
  b1, b2 = 0.9, 0.999
  for t in range(1, fit_steps + 1):
    logits = z @ w
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    g = z.T @ ((p - onehot) * row_w[:, None])
    g[:-1] += 2 * l2 * w[:-1]  # the bias is not regularised
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    w -= lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + 1e-8)
  return mean, scale, w[:-1], w[-1]


def train_prompt_router(cfg: ModelConfig, public_params, coordinator_data: Mapping[str, Any],
                        prefix_tokens: int = 32, *, tokenizer=None, seq_len: int | None = None,
                        batch_size: int = 8, split: str = "train", max_rows: int = 512,
                        l2: float = 1e-3, fit_steps: int = 500) -> PromptRouter:
  """Fits the prompt router on the coordinator's data only.

  cfg, public_params: the dense public model (the feature extractor).
  coordinator_data: {label: loader or dataset directory}; a label names the member a row of
    that data should be routed to: "public" -> the public data, "<domain>" -> the proxy data
    sampled from that owner's model ($D/proxy_<domain>). Never an owner's own data: the
    router must be buildable by the coordinator. Directories are read with tokenizer=,
    seq_len= and batch_size= (their `split`, "train" by default).
  prefix_tokens: how many leading tokens of a row the router sees.
  max_rows: at most this many rows per label (the first ones, in the loader's order).
  l2, fit_steps: the regression's L2 weight and full-batch Adam steps.
  Returns a PromptRouter whose `labels` are the keys of `coordinator_data` in order.
  """
  if not coordinator_data:
    raise ValueError("train_prompt_router needs coordinator data for at least two labels")
  if cfg.is_moe:
    raise ValueError("the prompt router's features come from the dense public model")
  if prefix_tokens < 1:
    raise ValueError(f"prefix_tokens {prefix_tokens} must be >= 1")
  labels = tuple(coordinator_data)
  if len(labels) < 2:
    raise ValueError(f"prompt routing needs at least two labels, got {labels}")
  router = PromptRouter(labels, int(prefix_tokens), None, None, None, None, {},
                        public=(cfg, public_params))
  feats, ys = [], []
  for y, label in enumerate(labels):
    loader = _as_loader(coordinator_data[label], tokenizer, seq_len, batch_size, split)
    n = 0
    for local in loader:
      ids, valid, keep = _rows(local)
      keep &= valid[:, :prefix_tokens].any(axis=1)
      if not keep.any():
        continue
      f = router.features(ids, valid)[keep][:max_rows - n]
      feats.append(f)
      ys += [y] * len(f)
      n += len(f)
      if n >= max_rows:
        break
    if n == 0:
      raise ValueError(f"coordinator data {label!r} gave no rows")
    router.trained_on[label] = n
  mean, scale, w, b = fit_softmax_regression(np.concatenate(feats), np.asarray(ys), len(labels),
                                             l2, fit_steps)
  router.mean, router.scale, router.weights, router.bias = mean, scale, w, b
  return router


def prompt_routing_scores(router: PromptRouter, members: Mapping[str, tuple[ModelConfig, Any]],
                          loader, prefix_tokens: int | None = None, rules=()) -> dict:
  """Routes each row of `loader` to one member from its first `prefix_tokens` tokens (default:
  what the router was trained with), and scores the whole row with that member.

  members: {label: (cfg, params)} covering every router label ("public": the public model,
    "<domain>": that owner's 2-expert model).
  Returns {"loss": mean token loss over all scored tokens, "routed": {label: share of rows},
  "rows": rows scored}.
  """
  missing = [l for l in router.labels if l not in members]
  if missing:
    raise ValueError(f"router labels {missing} have no member; members {sorted(members)}")
  p = router.prefix_tokens if prefix_tokens is None else int(prefix_tokens)
  fns = {l: _logprob_fn(members[l][0], steps.hashable_rules(rules)) for l in router.labels}
  total = count = 0.0
  routed = np.zeros(len(router.labels), np.int64)
  for local in loader:
    ids, valid, keep = _rows(local)
    if not keep.any():
      continue
    choice = router.predict(router.features(ids, valid, p))
    mask = np.asarray(local["loss_mask"], np.float64)
    b = None
    for c in np.unique(choice[keep]):
      label = router.labels[c]
      b = b if b is not None else steps.global_batch(local)
      lp = np.asarray(fns[label](members[label][1], b), np.float64)  # [B, T]
      rows = keep & (choice == c)
      total += float(np.sum(-lp[rows] * mask[rows]))
      routed[c] += int(rows.sum())
    count += float(mask[keep].sum())
  n = int(routed.sum())
  return {"loss": total / count if count else float("nan"),
          "routed": {l: (routed[i] / n if n else 0.0) for i, l in enumerate(router.labels)},
          "rows": n}


def prompt_routing_losses(router: PromptRouter, members: Mapping[str, tuple[ModelConfig, Any]],
                          loader, prefix_tokens: int | None = None, rules=()) -> float:
  """Mean token loss of prompt routing over `loader` (`prompt_routing_scores`)."""
  return prompt_routing_scores(router, members, loader, prefix_tokens, rules)["loss"]


def prompt_routing(work_dir, data_dir, domains=("code", "math", "legal"),
                   eval_domains=None, seq_len: int = 128, prefix_tokens: int = 32,
                   batch_size: int = 8, max_rows: int = 512) -> dict:
  """The prompt-routing baseline on the demo's layout.

  work_dir: holds public/export (the public model) and expert_<domain>/export (each owner's
    2-expert model); data_dir: the FlexMix-mini directory with public/, <domain>/ (evaluation
    only: their validation split), proxy_<domain>/ (sampled by the demo's router-tuning step)
    and tokenizer.json.
  The router trains on the train split of public/ and proxy_<domain>/ only.
  Returns {"loss": {eval domain: mean token loss}, "routing_accuracy": {eval domain: share of
  its rows routed to its own member ("public" for public)}, "routed": {eval domain: {label:
  share of rows}}, "trained_on": {label: rows}}; eval_domains default ("public", *domains).
  """
  from flexolmo_jax.data import make_eval_loader
  work, data = pathlib.Path(work_dir), pathlib.Path(data_dir)
  eval_domains = tuple(eval_domains or ("public",) + tuple(domains))
  tok = data / "tokenizer.json"
  pub = work / "public" / "export"
  pub_cfg = model_io.read_config(pub)
  members = {"public": (pub_cfg, model_io.load_params(pub, pub_cfg))}
  for d in domains:
    path = work / f"expert_{d}" / "export"
    cfg = model_io.read_config(path)
    members[d] = (cfg, model_io.load_params(path, cfg))
  coordinator = {"public": data / "public"}
  for d in domains:
    proxy = data / f"proxy_{d}"
    if not proxy.exists():
      raise FileNotFoundError(f"{proxy} not found: sample it with python -m "
                              f"flexolmo_jax.proxy_data --model={work / f'expert_{d}'} "
                              f"--name=proxy_{d} --out={data} --tokenizer={tok}")
    coordinator[d] = proxy
  router = train_prompt_router(*members["public"], coordinator, prefix_tokens, tokenizer=tok,
                               seq_len=seq_len, batch_size=batch_size, max_rows=max_rows)
  out = {"loss": {}, "routing_accuracy": {}, "routed": {}, "trained_on": dict(router.trained_on)}
  for d in eval_domains:
    loader = make_eval_loader(str(data / d), str(tok), seq_len, batch_size, 0, 1)
    r = prompt_routing_scores(router, members, loader)
    out["loss"][d] = r["loss"]
    out["routed"][d] = r["routed"]
    out["routing_accuracy"][d] = r["routed"].get(d, 0.0)
  return out
