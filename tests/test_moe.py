"""MoE dispatch strategies, run-time expert masks and the 'no influence at all' guarantee."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexolmo_jax.model import FlexOlmo, expert_mask
from flexolmo_jax.model.expert_mask import UnknownExpertError
from flexolmo_jax.model.moe import capacity
from model_utils import forward, random_ids, random_params, tiny_config

MODES = ("dense", "capacity", "dropless")
CAPACITY_IMPLS = ("einsum", "gather")


@pytest.mark.parametrize("E,k,norm", [(4, 2, False), (3, 3, True), (5, 1, False), (8, 3, True)])
def test_dispatch_modes_agree(E, k, norm):
  # capacity_factor E/k makes the per-row capacity equal to the sequence: nothing can drop.
  cfg = tiny_config(num_experts=E, top_k=k, norm_topk_prob=norm, capacity_factor=E / k)
  params = random_params(cfg, seed=E)
  ids = random_ids(cfg, batch=3, length=13)
  out = {m: forward(cfg.replace(dispatch=m), params, ids) for m in MODES}
  ref, _ = out["dense"]
  for m in ("capacity", "dropless"):
    logits, aux = out[m]
    np.testing.assert_allclose(logits, ref, atol=2e-5, rtol=0)
    assert int(np.sum(aux["dropped"])) == 0
  # The router must actually spread tokens (otherwise the comparison proves little).
  frac = np.asarray(out["dense"][1]["expert_fraction"]).mean(0)
  assert (frac > 0).sum() >= min(E, 2)


def test_capacity_drops_are_counted_and_change_output():
  cfg = tiny_config(num_experts=4, top_k=2, dispatch="capacity", capacity_factor=0.25)
  params = random_params(cfg)
  ids = random_ids(cfg, batch=2, length=16)
  logits, aux = forward(cfg, params, ids)
  C = capacity(cfg, 16)
  assert C == 2
  dropped = np.asarray(aux["dropped"])
  # Each row offers 16 * 2 assignments to 4 experts of C slots: at most 8 can be kept.
  assert dropped.shape == (cfg.n_layers,)
  assert np.all(dropped >= 2 * (32 - 4 * C))
  ref, _ = forward(cfg.replace(dispatch="dense"), params, ids)
  assert np.abs(logits - ref).max() > 1e-4


def _nan_expert(params, j):
  def poison(path, x):
    keys = [getattr(p, "key", "") for p in path]
    if "mlp" in keys and keys[-1] in ("gate_proj", "up_proj", "down_proj", "router", "router_bias"):
      return x.at[:, j].set(jnp.nan)
    return x
  return jax.tree_util.tree_map_with_path(poison, params)


@pytest.mark.parametrize("mode", MODES)
def test_excluded_expert_has_no_influence_even_if_nan(mode):
  cfg = tiny_config(num_experts=4, top_k=2, dispatch=mode, capacity_factor=2.0, expert_bias=True)
  params = random_params(cfg)
  ids = random_ids(cfg, batch=3, length=9)
  # Row 0 excludes expert2, row 1 excludes public+expert2, row 2 excludes expert3 only.
  mask = jnp.asarray(expert_mask(cfg.names, [["expert2"], ["public", "expert2"], ["expert3"]], 3))
  ref, _ = forward(cfg, params, ids, expert_mask=mask)
  poisoned, _ = forward(cfg, _nan_expert(params, 2), ids, expert_mask=mask)
  # Rows that exclude expert2 are bitwise identical; row 2 uses expert2 and goes NaN.
  np.testing.assert_array_equal(poisoned[:2], ref[:2])
  assert not np.isnan(ref).any()
  assert np.isnan(poisoned[2]).any()


@pytest.mark.parametrize("mode", MODES)
def test_mask_equals_physically_removing_the_expert(mode):
  cfg = tiny_config(num_experts=4, top_k=2, dispatch=mode, capacity_factor=2.0)
  params = random_params(cfg, seed=3)
  ids = random_ids(cfg, batch=2, length=10)
  masked, _ = forward(cfg, params, ids,
                      expert_mask=jnp.asarray(expert_mask(cfg.names, ["expert1"], 2)))
  keep = np.array([0, 2, 3])
  def drop(path, x):
    keys = [getattr(p, "key", "") for p in path]
    if "mlp" in keys:
      return x[:, keep]
    return x
  small_cfg = cfg.replace(num_experts=3, expert_names=("public", "expert2", "expert3"),
                          capacity_factor=1.5)
  pruned, _ = forward(small_cfg, jax.tree_util.tree_map_with_path(drop, params), ids)
  np.testing.assert_allclose(masked, pruned, atol=1e-5, rtol=0)
  unmasked, _ = forward(cfg, params, ids)
  assert np.abs(unmasked - masked).max() > 1e-4


def test_expert_mask_helpers():
  names = ["public", "math", "code"]
  m = expert_mask(names, ["math"], batch=2)
  assert m.shape == (2, 3) and m.dtype == bool
  np.testing.assert_array_equal(m, [[True, False, True]] * 2)
  m = expert_mask(names, [[], ["public", "code"]])
  np.testing.assert_array_equal(m, [[True, True, True], [False, True, False]])
  with pytest.raises(UnknownExpertError, match="news"):
    expert_mask(names, ["news"])
  with pytest.raises(ValueError, match="no expert"):
    expert_mask(names, ["public", "math", "code"])
  with pytest.raises(ValueError, match="batch"):
    expert_mask(names, [["math"]], batch=2)


def test_mask_shape_is_checked():
  cfg = tiny_config()
  params = random_params(cfg)
  with pytest.raises(ValueError, match="expert_mask shape"):
    FlexOlmo(cfg).apply({"params": params}, random_ids(cfg), expert_mask=jnp.ones((2, 3), bool))


def test_router_aux_outputs_match_numpy():
  from flexolmo_jax.model.moe import MoE
  cfg = tiny_config(num_experts=4, top_k=2, expert_bias=True)
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, 8, cfg.d_model)), jnp.float32)
  variables = MoE(cfg).init(jax.random.key(0), h)
  params = nn.meta.unbox(variables["params"])
  params = dict(params, router_bias=jnp.asarray([0.7, -0.5, 0.3, -1.0]))
  _, aux = MoE(cfg).apply({"params": params}, h)
  W = np.asarray(params["router"], np.float64)
  logits = np.asarray(h, np.float64) @ W.T + np.array([0.0, -0.5, 0.0, -1.0])  # min(b, 0), not slot 0
  lse = np.log(np.exp(logits).sum(-1))
  probs = np.exp(logits - lse[..., None])
  top = np.argsort(-probs, axis=-1)[..., :2]
  frac = np.stack([(top == e).any(-1).mean() for e in range(4)])
  np.testing.assert_allclose(aux["router_z_loss"], lse ** 2, rtol=1e-5)  # per token [B, T]
  np.testing.assert_allclose(aux["expert_prob"], probs.mean((0, 1)), rtol=1e-5)
  np.testing.assert_allclose(aux["expert_fraction"], frac, rtol=1e-6)
  np.testing.assert_allclose(aux["load_balance_loss"], 4 * np.sum(frac / 2 * probs.mean((0, 1))),
                             rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_compute_forward_and_grad_close_to_fp32(mode):
  """The default bf16-operand path compiles (forward and backward) and tracks fp32."""
  cfg32 = tiny_config(num_experts=4, top_k=2, dispatch=mode, capacity_factor=2.0,
                      n_kv_heads=2, remat_policy="full")
  cfg16 = cfg32.replace(dtype="bfloat16")
  params = random_params(cfg32)
  ids = random_ids(cfg32, batch=2, length=8)

  def loss(cfg):
    def fn(p):
      logits = FlexOlmo(cfg).apply({"params": p}, ids)[0]
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])
    return jax.jit(jax.value_and_grad(fn))(params)

  (l32, g32), (l16, g16) = loss(cfg32), loss(cfg16)
  assert g16["lm_head"].dtype == jnp.float32  # fp32 master weights, fp32 gradients
  assert abs(float(l16) - float(l32)) < 0.05 * abs(float(l32)) + 1e-2
  cos = np.vdot(g16["lm_head"], g32["lm_head"]) / (
      np.linalg.norm(g16["lm_head"]) * np.linalg.norm(g32["lm_head"]))
  assert cos > 0.99
