"""Expert-parallel dropless MoE (model/expert_parallel.py) equals the dense dispatch.

XLA:CPU has no ragged-all-to-all kernel, so the `ragged` transport runs here on an emulation
built from all_gather (same semantics as jax.lax.ragged_all_to_all's docstring): it checks
this module's offset bookkeeping both ways, forward and backward; the real collective is
only compiled, for TPU, by the AOT planner.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexolmo_jax.model import FlexOlmo, expert_parallel
from flexolmo_jax.model import grouped_matmul as grouped_matmul_module
from flexolmo_jax.model.grouped_matmul import grouped_matmul
from flexolmo_jax.model.moe import MoE, route
from flexolmo_jax.parallel import DEFAULT_RULES, activation_sharding, make_mesh, param_shardings
from flexolmo_jax.parallel.sharding import logical_shardings
from model_utils import random_ids, random_params, tiny_config

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices (conftest)")

EP4 = {"data": 2, "expert": 4}
EP2_FSDP_TP = {"fsdp": 2, "expert": 2, "tensor": 2}


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name, axis_index_groups=None):
  """jax.lax.ragged_all_to_all from all_gathers: every device reads the slices sent to it."""
  del recv_sizes, axis_index_groups
  ops = jax.lax.all_gather(operand, axis_name)  # [src, M, ...]
  in_off, sizes, out_off = (jax.lax.all_gather(a, axis_name)
                            for a in (input_offsets, send_sizes, output_offsets))  # [src, dst]
  me = jax.lax.axis_index(axis_name)
  start, size, read = out_off[:, me], sizes[:, me], in_off[:, me]
  r = jnp.arange(output.shape[0])
  inside = (r[None] >= start[:, None]) & (r[None] < (start + size)[:, None])  # [src, R]
  src = jnp.argmax(inside, axis=0)
  row = jnp.clip(read[src] + r - start[src], 0, operand.shape[0] - 1)
  vals = ops[src, row]
  covered = jnp.any(inside, axis=0).reshape((-1,) + (1,) * (output.ndim - 1))
  return jnp.where(covered, vals, output)


@pytest.fixture
def transport(request, monkeypatch):
  if request.param == "ragged":
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
  return request.param


def _moe_setup(E, k, seed=0):
  cfg = tiny_config(num_experts=E, top_k=k, expert_bias=True, dispatch="dense")
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(4, 6, cfg.d_model)), jnp.float32)
  variables = MoE(cfg).init(jax.random.key(seed), h)
  params = nn.meta.unbox(variables["params"])
  # A sharp router (so tokens spread over experts and shards) and a non-zero bias.
  params = dict(params, router=params["router"] * 20,
                router_bias=jnp.asarray(rng.normal(size=E), jnp.float32))
  # Per-example opt-outs; every row keeps at least k experts (and the public one).
  mask = np.ones((4, E), bool)
  mask[0, 3] = mask[1, [1, 3]] = mask[2, 5 % E] = False
  return cfg, params, nn.get_partition_spec(variables)["params"], h, jnp.asarray(mask)


def _poison(params, j):
  return {n: (v.at[j].set(jnp.nan) if n in ("gate_proj", "up_proj", "down_proj") else v)
          for n, v in params.items()}


def _moe_fn(cfg):
  """(y, d(sum(y * c))/d(params, h)): forward and gradients in one compiled function."""
  def fn(params, h, mask, c):
    y = MoE(cfg).apply({"params": params}, h, mask)[0]
    grads = jax.grad(lambda p, x: jnp.sum(MoE(cfg).apply({"params": p}, x, mask)[0] * c),
                     argnums=(0, 1))(params, h)
    return y, grads
  return fn


@pytest.mark.parametrize("mesh_shape,k,transport,gmm", [
    (EP4, 1, "all_to_all", "auto"), (EP4, 2, "ragged", "auto"),
    (EP2_FSDP_TP, 2, "all_to_all", "auto"), (EP2_FSDP_TP, 1, "ragged", "auto"),
    # Megablox (interpret mode) leaves NaN in rows past the last group, both passes.
    (EP2_FSDP_TP, 2, "ragged", "megablox"),
], indirect=["transport"])
def test_moe_layer_equals_dense_and_ignores_excluded_nan_experts(mesh_shape, k, transport, gmm):
  cfg, params, specs, h, mask = _moe_setup(E=8, k=k)
  c = jnp.asarray(np.random.default_rng(1).normal(size=h.shape), jnp.float32)
  ref, ref_grads = jax.jit(_moe_fn(cfg))(params, h, mask, c)
  ep_cfg = cfg.replace(dispatch="dropless", moe_transport=transport, grouped_matmul=gmm)
  mesh = make_mesh(mesh_shape)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    assert expert_parallel.layout(ep_cfg, 8, cfg.d_model, cfg.ffn_hidden) is not None
    sh = logical_shardings(specs, params, mesh, DEFAULT_RULES)
    h_sh = activation_sharding(mesh, ("act_batch", "act_length", "act_embed"), h.shape)
    fn = jax.jit(_moe_fn(ep_cfg), in_shardings=(sh, h_sh, None, h_sh))
    y, grads = fn(jax.device_put(params, sh), h, mask, c)
    poisoned = np.asarray(fn(jax.device_put(_poison(params, 3), sh), h, mask, c)[0])
  y = np.asarray(y)
  np.testing.assert_allclose(y, ref, atol=1e-5, rtol=0)
  flat_ref, _ = jax.tree_util.tree_flatten_with_path(ref_grads)
  for (path, g1), g8 in zip(flat_ref, jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), atol=2e-5, rtol=0,
                               err_msg=jax.tree_util.keystr(path))
  # Exactly the tokens routed to expert 3 go NaN; every other token is bitwise unchanged
  # (rows 0 and 1 exclude expert 3 altogether).
  _, _, _, top_i, valid = route(h, params["router"], params["router_bias"], mask, k, False)
  uses = np.asarray(jnp.any((top_i == 3) & valid, axis=-1))
  assert uses.any() and not uses[:2].any()
  np.testing.assert_array_equal(np.isnan(poisoned).any(-1), uses)
  np.testing.assert_array_equal(poisoned[~uses], y[~uses])


@pytest.mark.parametrize("mesh_shape,k,transport", [
    (EP4, 2, "all_to_all"), (EP2_FSDP_TP, 1, "ragged"),
], indirect=["transport"])
def test_model_logits_equal_dense(mesh_shape, k, transport):
  # Whole-model gradients through this path: tests/test_sharding.py's dropless case.
  cfg = tiny_config(vocab_size=128, d_model=64, n_heads=4, n_kv_heads=4, ffn_hidden=96,
                    num_experts=8, top_k=k, n_layers=2, dispatch="dense")
  params = random_params(cfg, seed=1)
  ids = random_ids(cfg, batch=8, length=8)
  mask = np.ones((8, 8), bool)
  mask[0, 2] = mask[3, [1, 5]] = mask[6, 7] = False
  mask = jnp.asarray(mask)

  def logits_fn(cfg):
    return lambda p, i: FlexOlmo(cfg).apply({"params": p}, i, expert_mask=mask)[0]

  ref = jax.jit(logits_fn(cfg))(params, ids)
  ep_cfg = cfg.replace(dispatch="dropless", moe_transport=transport)
  mesh = make_mesh(mesh_shape)
  p_sh = param_shardings(ep_cfg, mesh, DEFAULT_RULES)
  ids_sh = activation_sharding(mesh, ("act_batch", "act_length"), ids.shape)
  assert p_sh["decoder"]["layers"]["mlp"]["gate_proj"].spec[1] == "expert"
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    logits = jax.jit(logits_fn(ep_cfg), in_shardings=(p_sh, ids_sh))(
        jax.device_put(params, p_sh), jax.device_put(ids, ids_sh))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["megablox", "tiled", "select"])
def test_grouped_matmuls_equal_ragged_dot(impl, monkeypatch):
  # megablox in interpret mode (its TPU kernel, on CPU); tiled with several row tiles.
  monkeypatch.setattr(grouped_matmul_module, "TILE_ROWS", 8)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(37, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 32, 48)), jnp.float32)
  sizes = jnp.asarray([10, 0, 3, 17], jnp.int32)  # 7 rows past the last group: unspecified

  def run(impl):
    def f(x, w):
      return grouped_matmul(x, w, sizes, impl, interpret=True)[:30]
    y, vjp = jax.vjp(f, x, w)
    dx, dw = vjp(jnp.cos(y))
    return y, dx[:30], dw

  for a, b in zip(jax.jit(lambda: run(impl))(), jax.jit(lambda: run("ragged_dot"))()):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-5)
  if impl != "megablox":  # a NaN group leaves every other group's rows bitwise unchanged
    y = grouped_matmul(x, w, sizes, impl)
    poisoned = grouped_matmul(x, w.at[2].set(jnp.nan), sizes, impl)
    r = np.arange(37)
    np.testing.assert_array_equal(np.isnan(poisoned).any(-1), (r >= 10) & (r < 13))
    rows = np.r_[0:10, 13:30]
    np.testing.assert_array_equal(np.asarray(poisoned)[rows], np.asarray(y)[rows])


def test_layout_only_with_an_expert_axis_that_splits_the_experts():
  cfg = tiny_config(num_experts=8, top_k=2, dispatch="dropless")
  assert expert_parallel.layout(cfg, 8, 32, 48) is None  # no mesh
  with jax.set_mesh(make_mesh({"fsdp": 8})):
    assert expert_parallel.layout(cfg, 8, 32, 48) is None  # no expert axis
  with jax.set_mesh(make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})), \
      nn.logical_axis_rules(DEFAULT_RULES):
    lay = expert_parallel.layout(cfg, 8, 32, 48)
    assert (lay.tokens, lay.embed, lay.mlp) == (("data", "fsdp", "expert"), ("fsdp",), ("tensor",))
    assert lay.token_shards == 4
  with jax.set_mesh(make_mesh({"data": 2, "expert": 4})):
    assert expert_parallel.layout(cfg, 6, 32, 48) is None  # 6 experts do not split over 4
    assert expert_parallel.layout(cfg, 8, 32, 48).embed == ()
  assert expert_parallel.moe_transport(cfg.replace(platform="cpu")) == "all_to_all"
  assert expert_parallel.moe_transport(cfg.replace(platform="tpu")) == "ragged"
  with pytest.raises(ValueError, match="moe_transport"):
    cfg.replace(moe_transport="ring")


def test_stitched_model_dispatch_follows_its_size():
  from flexolmo_jax.stitch.writer import merged_dispatch
  assert merged_dispatch(8, 4) == "dropless"  # not the 2-expert sources' dense
  assert merged_dispatch(4, 4) == "dense"
