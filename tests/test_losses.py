"""Chunked LM head + cross-entropy (cfg.logits_chunk > 0) is the full-logits maths, in fp32:
per-token losses, the training objective and its gradients, the eval steps, a vocab-parallel
mesh; and it really does not hold [B, T, V] logits (compiled temp memory)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flexolmo_jax.config_base import STAGE_TRAINABLE, add_training
from flexolmo_jax.evaluate import steps
from flexolmo_jax.model import FlexOlmo, ModelConfig, abstract_params, param_logical_axes
from flexolmo_jax.model.head import head_logits
from flexolmo_jax.parallel import DEFAULT_RULES, activation_sharding, make_mesh, param_shardings
from flexolmo_jax.train.losses import (chunked_token_losses, model_token_losses, objective,
                                       objective_from_token_losses, token_losses)
from flexolmo_jax.train.optim import make_optimizer
from flexolmo_jax.train.partition import make_partition
from flexolmo_jax.train.step import init_state, make_step_fn
from model_utils import random_params, tiny_config

RTOL = 1e-6


def _tc(**kw):
  tc = add_training(ml_collections.ConfigDict(), "public", steps=100, warmup_steps=10).train
  tc.update(router_z_loss=1e-3, output_z_loss=1e-2, load_balance=1e-2, **kw)
  return tc


def _batch(cfg, B, T, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, cfg.vocab_size, (B, T + 1))
  mask = (rng.random((B, T)) > 0.3).astype(np.float32)  # zeros inside rows and at row ends
  mask[0, -3:] = 0.0
  return {"input_ids": jnp.asarray(ids[:, :-1], jnp.int32),
          "targets": jnp.asarray(ids[:, 1:], jnp.int32), "loss_mask": jnp.asarray(mask)}


def _close(a, b, rtol=RTOL, what=""):
  """Relative to the array's scale (elementwise rtol is meaningless at zero crossings)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.max(np.abs(b)), 1e-30)
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=what)


def _model_loss(cfg, tc):
  """The training loss of train/step.py's loss_fn, on the full params tree."""
  def fn(params, batch):
    with nn.logical_axis_rules(DEFAULT_RULES):
      out, aux, _ = FlexOlmo(cfg).apply({"params": params}, batch["input_ids"],
                                        return_logits=not cfg.logits_chunk)
      ce, lse = model_token_losses(cfg, params, out, batch["targets"])
    return objective_from_token_losses(ce, lse, aux, batch, tc)
  return fn


@pytest.mark.parametrize("chunk", [1, 5, 13, 64])  # 13 = T (one block), 64 > T
def test_chunked_token_losses_equal_full(chunk):
  B, T, d, V = 3, 13, 32, 97  # 5 divides neither T nor B * T
  cfg = ModelConfig(vocab_size=V, d_model=d, n_layers=1, n_heads=4, dtype="float32",
                    logits_chunk=chunk)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (B, T, d))
  w = 0.3 * jax.random.normal(k2, (d, V))
  t = jax.random.randint(k3, (B, T), 0, V)
  logits = head_logits(x, w, cfg)
  ce, lse, top = jax.jit(lambda x, w, t: chunked_token_losses(x, w, t, cfg, argmax=True))(x, w, t)
  ce0, lse0 = token_losses(logits, t)
  _close(ce, ce0, what="ce")
  _close(lse, lse0, what="lse")
  np.testing.assert_array_equal(top, jnp.argmax(logits, axis=-1))

  mask = jnp.asarray(np.random.default_rng(1).random((B, T)) > 0.4, jnp.float32)
  tc = _tc()
  aux = {"router_z_loss": jnp.zeros((1, B, T)), "load_balance_loss": jnp.zeros(()),
         "expert_prob": jnp.zeros((1, 1)), "expert_fraction": jnp.zeros((1, 1)),
         "dropped": jnp.zeros(())}
  batch = {"targets": t, "loss_mask": mask}

  def chunked(x, w):
    return objective_from_token_losses(*chunked_token_losses(x, w, t, cfg), aux, batch, tc)

  def full(x, w):
    return objective(head_logits(x, w, cfg), aux, batch, tc)

  (l1, m1), g1 = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(x, w)
  (l0, m0), g0 = jax.jit(jax.value_and_grad(full, argnums=(0, 1), has_aux=True))(x, w)
  assert set(m1) == set(m0)
  for k in m0:
    _close(m1[k], m0[k], what=k)
  _close(g1[0], g0[0], what="d hidden")
  _close(g1[1], g0[1], what="d lm_head")
  assert float(jnp.max(jnp.abs(g1[0][mask == 0]))) == 0.0  # masked tokens: no gradient


def _moe_config(**kw):  # small enough to compile quickly, MoE so every aux term is live
  return tiny_config(vocab_size=97, n_layers=1, num_experts=2, top_k=2, dispatch="dense",
                     expert_bias=True, **kw)


def test_model_objective_and_param_grads_equal_full():
  cfg = _moe_config()
  params = random_params(cfg)
  batch = _batch(cfg, B=2, T=11)
  tc = _tc()
  grad = lambda c: jax.jit(jax.value_and_grad(_model_loss(c, tc), has_aux=True))(params, batch)
  (l0, m0), g0 = grad(cfg)
  (l1, m1), g1 = grad(cfg.replace(logits_chunk=4))
  for k in m0:
    _close(m1[k], m0[k], what=k)
  flat0, _ = jax.tree_util.tree_flatten_with_path(g0)
  for (path, a0), a1 in zip(flat0, jax.tree_util.tree_leaves(g1)):
    _close(a1, a0, rtol=2e-6, what=jax.tree_util.keystr(path))


def test_train_step_chunked_equals_full():
  """train/step.py's step (expert stage: expert 1 trains, slot 0 and the head are frozen):
  same metrics and updated params with and without chunking."""
  cfg = _moe_config()
  patterns, experts = STAGE_TRAINABLE["expert"]
  tc = _tc()
  partition = make_partition(abstract_params(cfg), param_logical_axes(cfg), patterns, experts)
  trainable, frozen = partition.split(random_params(cfg))
  tx, schedule = make_optimizer(tc)
  batch = _batch(cfg, B=2, T=11, seed=3)
  out = []
  for c in (cfg, cfg.replace(logits_chunk=3)):
    step = jax.jit(make_step_fn(c, partition, tx, schedule, tc, DEFAULT_RULES))
    out.append(step(init_state(trainable, tx), frozen, batch))
  (s0, m0), (s1, m1) = out
  assert set(m1) == set(m0)
  for k in ("loss", "ce", "router_z_loss", "output_z_loss", "load_balance_loss", "tokens",
            "grad_norm"):
    _close(m1[k], m0[k], rtol=2e-6, what=k)
  # Adam's first update is ~ lr * sign(g): compare at the scale of the update itself.
  jax.tree.map(lambda a, b: _close(a, b, rtol=1e-4), s1["params"], s0["params"])


def test_eval_steps_equal_full():
  cfg = _moe_config()
  chunked = cfg.replace(logits_chunk=4)
  params = random_params(cfg)
  batch = _batch(cfg, B=3, T=10, seed=5)
  em = jnp.array([[True, True], [True, False], [True, True]])
  # A target that is the greedy token, so `greedy` is not trivially all-False.
  with nn.logical_axis_rules(()):
    logits, _, _ = FlexOlmo(cfg).apply({"params": params}, batch["input_ids"], expert_mask=em)
  targets = batch["targets"].at[1].set(jnp.argmax(logits[1], axis=-1))
  batch = dict(batch, targets=targets)
  makes = (steps.make_loss_fn, steps.make_score_fn, steps.make_logprob_fn)
  run = lambda c: jax.jit(lambda p, b, m: [make(c, ())(p, b, m) for make in makes])(
      params, batch, em)  # the three steps in one program: one compile per config
  r0, r1 = run(cfg), run(chunked)
  jax.tree.map(lambda a, b: _close(a, b), r1, r0)
  np.testing.assert_array_equal(r1[1]["greedy"], r0[1]["greedy"])
  assert bool(r1[1]["greedy"][1]) and not bool(r1[1]["greedy"][0])


def _all_gather_shapes(hlo: str):
  return [tuple(int(d) for d in dims.split(",") if d)
          for dims in re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather\(", hlo)]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 host devices (conftest)")
@pytest.mark.parametrize("mesh_shape", [{"fsdp": 2, "tensor": 4},
                                        {"data": 2, "fsdp": 2, "tensor": 2}])
def test_vocab_parallel_chunked_loss_equals_single_device(mesh_shape):
  V = 512
  cfg = tiny_config(vocab_size=V, d_model=64, n_heads=4, n_kv_heads=4, ffn_hidden=96,
                    num_experts=0, n_layers=1)
  chunked = cfg.replace(logits_chunk=12)  # T = 32: three blocks, the last one padded
  params = random_params(cfg, seed=2)
  batch = _batch(cfg, B=8, T=32, seed=7)
  tc = _tc()
  fn = lambda c: jax.value_and_grad(_model_loss(c, tc), has_aux=True)
  (l0, _), g0 = jax.jit(fn(cfg))(params, batch)

  mesh = make_mesh(mesh_shape)
  p_sh = param_shardings(cfg, mesh, DEFAULT_RULES)
  assert tuple(p_sh["lm_head"].spec) == ("fsdp", "tensor")  # the vocabulary is split
  b_sh = {k: activation_sharding(mesh, ("act_batch", "act_length"), v.shape)
          for k, v in batch.items()}
  params, batch = jax.device_put(params, p_sh), jax.device_put(batch, b_sh)
  with jax.set_mesh(mesh):
    step = jax.jit(fn(chunked), in_shardings=(p_sh, b_sh), out_shardings=((None, None), p_sh))
    compiled = step.lower(params, batch).compile()
    (l1, _), g1 = compiled(params, batch)
  _close(l1, l0, rtol=2e-6, what="loss")
  jax.tree.map(lambda a, b: _close(a, b, rtol=1e-5), g1, g0)
  # Vocab-parallel: each vocab shard reduces its slice of a block's logits and only [B, c]
  # values are all-reduced. Nothing is all-gathered along the vocabulary (logits, their
  # gradient or lm_head's vocab axis), nor is a block of logits gathered over the batch.
  v_shard = V // mesh.shape["tensor"]
  gathers = _all_gather_shapes(compiled.as_text())
  bad = [g for g in gathers if g[-1] == V or (len(g) == 3 and g[-1] == v_shard)]
  assert gathers and not bad, gathers


def test_chunked_loss_grad_memory():
  """Compiled loss + grad at B*T = 8192 tokens, d 256, V 32768: full logits are 1 GiB fp32;
  blocks of [8, 128] positions (1024 tokens, 128 MiB of logits) need a fraction of that."""
  B, T, d, V = 8, 1024, 256, 32768
  temp = {}
  for chunk in (0, 128):
    cfg = ModelConfig(vocab_size=V, d_model=d, n_layers=1, n_heads=4, logits_chunk=chunk)

    def loss(x, w, t, m):
      if chunk:
        ce, lse = chunked_token_losses(x, w, t, cfg)
      else:
        ce, lse = token_losses(head_logits(x, w, cfg), t)
      return jnp.sum(ce * m) / jnp.sum(m) + 1e-5 * jnp.sum(jnp.square(lse) * m) / jnp.sum(m)

    shape = jax.ShapeDtypeStruct
    args = (shape((B, T, d), jnp.bfloat16), shape((d, V), jnp.float32),
            shape((B, T), jnp.int32), shape((B, T), jnp.float32))
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    temp[chunk] = compiled.memory_analysis().temp_size_in_bytes
  print(f"loss+grad temp: full {temp[0] / 2**20:.0f} MiB, chunked {temp[128] / 2**20:.0f} MiB")
  assert temp[0] > B * T * V * 4  # the full path does hold the logits
  assert temp[128] < temp[0] / 4
