"""Sharded forward and gradients on 8 host devices equal the single-device run."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexolmo_jax.model import FlexOlmo
from flexolmo_jax.parallel import (DEFAULT_RULES, activation_sharding, make_mesh,
                                   param_shardings)
from model_utils import random_ids, random_params, tiny_config

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices (conftest)")


def _loss_and_logits(cfg):
  def fn(params, ids):
    logits, aux, _ = FlexOlmo(cfg).apply({"params": params}, ids)
    logp = jax.nn.log_softmax(logits[:, :-1])
    ce = -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
    return ce + 1e-3 * jnp.mean(jnp.sum(aux["router_z_loss"], axis=0)), logits
  return jax.value_and_grad(fn, has_aux=True)


def _single(cfg, params, ids):
  (loss, logits), grads = jax.jit(_loss_and_logits(cfg))(params, ids)
  return loss, logits, grads


def _sharded(cfg, params, ids, mesh_shape):
  mesh = make_mesh(mesh_shape)
  p_sh = param_shardings(cfg, mesh, DEFAULT_RULES)
  ids_sh = activation_sharding(mesh, ("act_batch", "act_length"), ids.shape)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    params = jax.device_put(params, p_sh)
    ids = jax.device_put(ids, ids_sh)
    step = jax.jit(_loss_and_logits(cfg), in_shardings=(p_sh, ids_sh),
                   out_shardings=((None, None), p_sh))
    (loss, logits), grads = step(params, ids)
  return loss, logits, grads, p_sh


@pytest.mark.parametrize("mesh_shape,mode", [
    ({"data": 2, "fsdp": 2, "expert": 2}, "capacity"),
    ({"data": 2, "fsdp": 2, "expert": 2}, "dropless"),
    ({"fsdp": 2, "tensor": 4}, "dense"),
    ({"fsdp": 2, "tensor": 4}, "capacity"),
])
def test_sharded_equals_single_device(mesh_shape, mode):
  cfg = tiny_config(vocab_size=128, d_model=64, n_heads=4, n_kv_heads=4, ffn_hidden=96,
                    num_experts=4, top_k=2, dispatch=mode, capacity_factor=2.0, n_layers=2)
  params = random_params(cfg, seed=1)
  ids = random_ids(cfg, batch=8, length=16)
  loss1, logits1, grads1 = _single(cfg, params, ids)
  loss8, logits8, grads8, p_sh = _sharded(cfg, params, ids, mesh_shape)
  # The layout really is distributed: expert weights split over expert/fsdp/tensor axes.
  gate_spec = p_sh["decoder"]["layers"]["mlp"]["gate_proj"].spec
  assert tuple(gate_spec) == (None, "expert", "fsdp", "tensor")
  assert len(grads8["embed_tokens"].sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(logits8), np.asarray(logits1), atol=1e-5, rtol=0)
  np.testing.assert_allclose(float(loss8), float(loss1), atol=1e-6)
  flat1, _ = jax.tree_util.tree_flatten_with_path(grads1)
  flat8 = jax.tree_util.tree_leaves(grads8)
  for (path, g1), g8 in zip(flat1, flat8):
    np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), atol=1e-5, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def test_dense_model_sharded():
  cfg = tiny_config(vocab_size=128, d_model=64, n_heads=4, n_kv_heads=4, ffn_hidden=96,
                    num_experts=0)
  params = random_params(cfg)
  ids = random_ids(cfg, batch=8, length=8)
  _, logits1, grads1 = _single(cfg, params, ids)
  _, logits8, grads8, _ = _sharded(cfg, params, ids, {"fsdp": 2, "tensor": 4})
  np.testing.assert_allclose(np.asarray(logits8), np.asarray(logits1), atol=1e-5, rtol=0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
               grads8, grads1)


def test_uneven_dimensions_fall_back_to_replication():
  cfg = tiny_config(vocab_size=97)  # odd vocabulary: cannot split over tensor=4
  mesh = make_mesh({"fsdp": 2, "tensor": 4})
  sh = param_shardings(cfg, mesh)
  assert tuple(sh["embed_tokens"].spec) == (None, "fsdp")
  with pytest.raises(ValueError, match="needs 16 devices"):
    make_mesh({"fsdp": 4, "tensor": 4})
