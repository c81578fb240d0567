"""The method as the reference runs it (issue: bias, objective, router tuning).

- The expert bias trains as theta with bias = -softplus(theta): never positive, a gradient
  everywhere, and it learns to hold an expert back on text it should abstain from; the
  reference's min(b, 0) has no gradient once b > 0. Model directories get effective values.
- The router z-loss and load balance combine over layers as OLMo-core does (a sum of
  per-layer terms, each a mean over loss tokens), padded positions left out.
- Router tuning trains exactly the reference's leaves (every router row and the bias) with
  every expert active, and exports the configured inference top-k.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flexolmo_jax import config_base
from flexolmo_jax.model import FlexOlmo, abstract_params, param_logical_axes
from flexolmo_jax.parallel import DEFAULT_RULES
from flexolmo_jax.train.losses import objective_from_token_losses
from flexolmo_jax.train.optim import make_optimizer
from flexolmo_jax.train.partition import bias_to_theta, make_partition, theta_to_bias
from flexolmo_jax.train.step import init_state, make_step_fn
from model_utils import random_params, tiny_config
from train_utils import load_config

BIAS = "decoder/layers/mlp/router_bias"


def test_theta_round_trip_and_never_positive():
  b = jnp.asarray([-5.0, -math.log(2.0), -0.3, -1e-3, 0.0, 0.4])
  theta = bias_to_theta(b)
  back = theta_to_bias(theta)
  np.testing.assert_allclose(back[:4], b[:4], rtol=1e-5)
  assert np.all(np.asarray(back) < 0)  # 0 and positive values map to -1e-6, never above
  np.testing.assert_allclose(back[4:], -1e-6, rtol=1e-3)
  assert float(theta[1]) == pytest.approx(0.0, abs=1e-6)  # the default start: theta = 0
  # The gradient of the effective bias never vanishes, wherever theta goes.
  g = jax.vmap(jax.grad(lambda t: theta_to_bias(t)))(jnp.asarray([-30.0, -5.0, 0.0, 5.0, 30.0]))
  assert np.all(np.asarray(g) < 0)


def _expert_partition(cfg, param):
  return make_partition(abstract_params(cfg), param_logical_axes(cfg),
                        ["mlp/(router|router_bias)$"], [1], bias_parametrization=param)


def test_partition_holds_theta_and_gives_effective_values():
  cfg = tiny_config(num_experts=2, top_k=2, expert_bias=True)
  params = random_params(cfg)
  L = cfg.n_layers
  params["decoder"]["layers"]["mlp"]["router_bias"] = jnp.asarray([[0.0, -0.25]] * L)
  part = _expert_partition(cfg, "softplus")
  trainable, frozen = part.split(params)
  np.testing.assert_allclose(trainable[BIAS], bias_to_theta(jnp.full((L, 1), -0.25)), rtol=1e-6)
  merged = part.merge(trainable, frozen)["decoder"]["layers"]["mlp"]["router_bias"]
  np.testing.assert_allclose(merged, [[0.0, -0.25]] * L, rtol=1e-5)
  variables = part.model_variables(trainable, frozen)
  slots = variables["expert_slots"]["decoder"]["layers"]["mlp"]["router_bias"]
  np.testing.assert_allclose(slots.parts[0], [[-0.25]] * L, rtol=1e-5)  # the trainable slot

  # min: a positive stored b is exported as its effective value min(b, 0) = 0.
  params["decoder"]["layers"]["mlp"]["router_bias"] = jnp.asarray([[0.0, 0.3]] * L)
  part_min = _expert_partition(cfg, "min")
  t, f = part_min.split(params)
  np.testing.assert_array_equal(t[BIAS], np.full((L, 1), 0.3, np.float32))  # trains b itself
  np.testing.assert_array_equal(part_min.merge(t, f)["decoder"]["layers"]["mlp"]["router_bias"],
                                np.zeros((L, 2)))
  with pytest.raises(ValueError, match="bias_parametrization"):
    _expert_partition(cfg, "relu")


def _abstain_task():
  """A 2-expert model whose expert 1 is harmful on this text (its FFN is large noise) and
  whose targets are the public expert's own greedy tokens: the right move is to hold
  expert 1 back, i.e. a negative bias."""
  cfg = tiny_config(num_experts=2, top_k=2, expert_bias=True, n_layers=2)
  params = random_params(cfg, seed=3)
  mlp = params["decoder"]["layers"]["mlp"]
  noise = jax.random.normal(jax.random.key(7), mlp["down_proj"][:, 1].shape)
  mlp["down_proj"] = mlp["down_proj"].at[:, 1].set(2.0 * noise)
  mlp["router"] = jnp.zeros_like(mlp["router"])  # routing decided by the bias alone
  ids = jax.random.randint(jax.random.key(1), (4, 12), 0, cfg.vocab_size)
  public_only = jnp.asarray([[True, False]] * 4)
  logits, _, _ = FlexOlmo(cfg).apply({"params": params}, ids, expert_mask=public_only)
  batch = {"input_ids": ids, "targets": jnp.argmax(logits, -1).astype(jnp.int32),
           "loss_mask": jnp.ones(ids.shape, jnp.float32)}
  return cfg, params, batch


def _train_bias(cfg, params, batch, param: str, b0: float, steps: int = 25):
  mlp = params["decoder"]["layers"]["mlp"]
  mlp["router_bias"] = jnp.asarray([[0.0, b0]] * cfg.n_layers)
  tc = config_base.add_training(ml_collections.ConfigDict(), "expert", steps=100,
                                warmup_steps=1, lr=0.05).train
  part = make_partition(abstract_params(cfg), param_logical_axes(cfg), ["mlp/router_bias$"], [1],
                        bias_parametrization=param)
  tx, schedule = make_optimizer(tc)
  step = jax.jit(make_step_fn(cfg, part, tx, schedule, tc, DEFAULT_RULES))
  trainable, frozen = part.split(params)
  state = init_state(trainable, tx)
  first = None
  grad_fn = jax.grad(lambda t: make_loss(cfg, part, tc)(t, frozen, batch))
  g0 = grad_fn(trainable)[BIAS]
  for _ in range(steps):
    state, m = step(state, frozen, batch)
    first = m if first is None else first
  bias = part.merge(state["params"], frozen)["decoder"]["layers"]["mlp"]["router_bias"][:, 1]
  return np.asarray(bias), np.asarray(g0), first, m


def make_loss(cfg, part, tc):
  def loss(t, frozen, batch):
    variables = part.model_variables(t, frozen)
    with nn.logical_axis_rules(DEFAULT_RULES):
      logits, aux, _ = FlexOlmo(cfg).apply(variables, batch["input_ids"])
    from flexolmo_jax.train.losses import objective
    return objective(logits, aux, batch, tc)[0]
  return loss


def test_bias_learns_to_abstain_and_min_gets_stuck():
  cfg, params, batch = _abstain_task()
  b0 = -math.log(2.0)  # the default start, theta = 0
  bias, g0, first, last = _train_bias(cfg, jax.tree.map(jnp.array, params), batch, "softplus", b0)
  assert np.all(g0 != 0)
  assert np.all(bias < b0 - 0.1), bias  # learned to hold expert 1 back
  assert float(last["ce"]) < float(first["ce"]) - 0.01
  assert float(last["expert_prob"][1]) < float(first["expert_prob"][1]) - 0.1  # routing moved

  # The reference's min(b, 0) from a bias its first updates made positive: no gradient, so
  # the bias (and routing) never moves again.
  stuck, g_min, first_m, last_m = _train_bias(cfg, jax.tree.map(jnp.array, params), batch, "min",
                                              0.01)
  np.testing.assert_array_equal(g_min, 0.0)
  np.testing.assert_array_equal(stuck, 0.0)  # effective value min(0.01, 0)
  np.testing.assert_allclose(last_m["expert_prob"], first_m["expert_prob"], rtol=1e-6)


def test_aux_combination_is_olmo_core_sum_over_layers():
  """Hand computation over 3 layers: router z = sum_l sum_t mask * lse_lt^2 / n_tokens,
  load balance = sum_l lb_l; padded positions have no influence."""
  rng = np.random.default_rng(0)
  L, B, T = 3, 2, 5
  z = rng.random((L, B, T)).astype(np.float32) * 3
  lb = rng.random(L).astype(np.float32)
  mask = np.ones((B, T), np.float32)
  mask[0, 3:] = 0
  mask[1, 4] = 0
  ce = rng.random((B, T)).astype(np.float32)
  lse = rng.random((B, T)).astype(np.float32)
  tc = ml_collections.ConfigDict(dict(router_z_loss=1e-3, output_z_loss=1e-5, load_balance=0.01))
  aux = lambda zz: {"router_z_loss": jnp.asarray(zz), "load_balance_loss": jnp.asarray(lb),
                    "expert_prob": jnp.zeros((L, 2)), "expert_fraction": jnp.zeros((L, 2)),
                    "dropped": jnp.zeros((L,), jnp.int32)}
  batch = {"loss_mask": jnp.asarray(mask)}
  loss, m = objective_from_token_losses(jnp.asarray(ce), jnp.asarray(lse), aux(z), batch, tc)
  n = mask.sum()
  want_z = sum((z[l] * mask).sum() / n for l in range(L))
  np.testing.assert_allclose(m["router_z_loss"], want_z, rtol=1e-6)
  np.testing.assert_allclose(m["load_balance_loss"], lb.sum(), rtol=1e-6)
  want = (ce * mask).sum() / n + 1e-3 * want_z + 1e-5 * (lse ** 2 * mask).sum() / n + 0.01 * lb.sum()
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  z_pad = np.where(mask[None] > 0, z, 1e6).astype(np.float32)
  loss_pad, _ = objective_from_token_losses(jnp.asarray(ce), jnp.asarray(lse), aux(z_pad), batch, tc)
  np.testing.assert_array_equal(loss_pad, loss)


def test_model_aux_per_token_per_layer():
  """The model hands the objective per-layer, per-token z terms ([L, B, T])."""
  cfg = tiny_config(n_layers=3)
  ids = jax.random.randint(jax.random.key(0), (2, 7), 0, cfg.vocab_size)
  _, aux, _ = FlexOlmo(cfg).apply({"params": random_params(cfg)}, ids)
  assert aux["router_z_loss"].shape == (3, 2, 7)
  assert aux["load_balance_loss"].shape == (3,)
  dense = tiny_config(num_experts=0, top_k=1)
  _, aux_d, _ = FlexOlmo(dense).apply({"params": random_params(dense)}, ids)
  np.testing.assert_array_equal(aux_d["router_z_loss"], np.zeros((2, 2, 7)))


def _router_config(**train):
  config = load_config("flexmix_mini", "router,tiny")
  config.train.update(train)
  return config


def test_router_tuning_trains_the_reference_leaves_with_every_expert():
  from flexolmo_jax.train.trainer import setup_training
  config = _router_config()
  setup = setup_training(config)
  E = setup.export_cfg.num_experts
  trainable = setup.partition.describe()
  assert sorted(trainable) == ["decoder/layers/mlp/router"] + (
      ["decoder/layers/mlp/router_bias"] if setup.cfg.expert_bias else [])
  # every row of the router, the public one included: no slot restriction
  assert all(r.slots is None for k, r in setup.partition.rules if r.trainable)
  assert setup.cfg.top_k == E and setup.cfg.dispatch == "dense"
  assert setup.export_cfg.top_k == config.model.top_k < E
  assert float(config.train.weight_decay) == 0.1 and float(config.train.lr) == 2e-3
  # today's variant, by name: tuning at the inference top-k
  setup_k = setup_training(_router_config(tuning_top_k=2))
  assert setup_k.cfg.top_k == 2 and setup_k.cfg.dispatch == config.model.dispatch
  with pytest.raises(ValueError, match="tuning_top_k"):
    setup_training(_router_config(tuning_top_k=E + 1))


def test_posterior_btm_equals_hand_computed_mixture():
  """BTM with domain-posterior weights (uniform prior, each member's likelihood of the row so
  far) on two tiny models, against a per-token numpy computation."""
  from flexolmo_jax.evaluate import baselines, steps
  cfg = tiny_config(num_experts=0, top_k=1)
  members = [(cfg, random_params(cfg, seed=s)) for s in (0, 5)]
  rng = np.random.default_rng(2)
  ids = rng.integers(0, cfg.vocab_size, (2, 9))
  mask = np.ones((2, 8), np.float32)
  mask[1, 5:] = 0
  local = {"input_ids": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
           "loss_mask": mask}
  got = baselines.ensemble_loss(members, [local])
  lp = np.stack([np.asarray(jax.jit(steps.make_logprob_fn(c, ()))(p, steps.global_batch(local)),
                            np.float64) for c, p in members])  # [M, B, T]
  total = count = 0.0
  for b in range(2):
    ctx = np.zeros(2)
    for t in range(8):
      w = np.exp(ctx - ctx.max())
      w /= w.sum()
      p = float(np.sum(w * np.exp(lp[:, b, t])))
      if mask[b, t]:
        total -= math.log(p)
        count += 1
        ctx += lp[:, b, t]
  np.testing.assert_allclose(got, total / count, rtol=1e-5)
  uniform = baselines.ensemble_loss(members, [local], weighting="uniform")
  want_u = -np.sum(np.log(np.exp(lp).mean(0)) * mask) / mask.sum()
  np.testing.assert_allclose(uniform, want_u, rtol=1e-5)
  assert abs(got - uniform) > 1e-4  # the weighting matters on these members
