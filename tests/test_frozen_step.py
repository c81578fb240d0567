"""Frozen means free: no weight gradient for the frozen expert slot, frozen matmul weights in
the compute dtype, and gradient accumulation equal to the full batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexolmo_jax.aot.jaxpr_flops import matmul_flops
from flexolmo_jax.model import FlexOlmo, init_params
from flexolmo_jax.train.partition import flatten, unflatten
from flexolmo_jax.train.trainer import setup_training
from train_utils import tiny_stage_config


def _config(trainable_experts=(1,), dtype="float32", **train):
  config = tiny_stage_config("expert", "/nonexistent", **train)
  config.train.trainable_experts = list(trainable_experts)
  config.model.dtype = dtype
  config.model.logits_chunk = 0  # the count below assumes one full lm_head matmul
  return config


def _traced_flops(config):
  setup = setup_training(config)
  _, frozen = setup.abstract_trainable_frozen()
  traced = setup.jit_step().trace(setup.abstract_state(), frozen, setup.abstract_batch())
  return setup, matmul_flops(traced.jaxpr)


def test_expert_stage_has_no_frozen_slot_weight_gradient():
  setup, flops_1 = _traced_flops(_config([1]))
  _, flops_01 = _traced_flops(_config([0, 1]))
  cfg, tc = setup.cfg, setup.config.train
  B, T = int(tc.global_batch_size), int(tc.seq_len)
  ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  forward = matmul_flops(jax.make_jaxpr(lambda p, i: FlexOlmo(cfg).apply({"params": p}, i))(
      params, ids))
  # Backward of a matmul: the input gradient always (every layer's input carries a gradient
  # under the layer scan), the weight gradient only for trainable weights. So the step costs
  # 3 x forward minus one forward's worth of every frozen weight's matmul: attention
  # projections, lm_head and the public expert (slot 0) of every layer.
  d, q, kv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  tokens = B * T
  frozen_attention = cfg.n_layers * 2 * d * (2 * q + 2 * kv) * tokens
  frozen_head = 2 * d * cfg.vocab_size * tokens
  one_expert = cfg.n_layers * 3 * 2 * d * cfg.ffn_hidden * tokens
  assert flops_1 == 3 * forward - frozen_attention - frozen_head - one_expert
  assert flops_01 == flops_1 + one_expert  # training slot 0 too costs its weight gradient
  assert flops_1 < flops_01


def _random_state(setup, seed=0):
  params = init_params(setup.cfg, jax.random.key(seed))
  flat = flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(flat))
  flat = {k: v + 0.05 * jax.random.normal(kk, v.shape, v.dtype) for (k, v), kk in zip(flat.items(), keys)}
  trainable, frozen = setup.split_fn()(unflatten(flat))
  return unflatten(flat), trainable, frozen


def _batch(setup, seed=0):
  tc = setup.config.train
  B, T = int(tc.global_batch_size), int(tc.seq_len)
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, setup.cfg.vocab_size, (B, T + 1))
  mask = (rng.random((B, T)) > 0.2).astype(np.float32)
  return {"input_ids": jnp.asarray(ids[:, :-1], jnp.int32),
          "targets": jnp.asarray(ids[:, 1:], jnp.int32), "loss_mask": jnp.asarray(mask)}


def test_slot_operands_equal_the_merged_model():
  from flexolmo_jax.train.losses import model_token_losses
  setup = setup_training(_config([1]))
  full, trainable, frozen = _random_state(setup)
  batch = _batch(setup)
  model = FlexOlmo(setup.cfg)
  slots = jax.jit(lambda t, f: model.apply(setup.partition.model_variables(t, f),
                                           batch["input_ids"])[0])(trainable, frozen)
  merged = jax.jit(lambda t, f: model.apply({"params": setup.partition.merge(t, f)},
                                            batch["input_ids"])[0])(trainable, frozen)
  reference = jax.jit(lambda p: model.apply({"params": p}, batch["input_ids"])[0])(full)
  np.testing.assert_allclose(np.asarray(slots), np.asarray(reference), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(reference), rtol=1e-5, atol=1e-5)

  def grads(variables_fn):
    def loss(t):
      logits = model.apply(variables_fn(t), batch["input_ids"])[0]
      ce, _ = model_token_losses(setup.cfg, None, logits, batch["targets"])
      return jnp.sum(ce * batch["loss_mask"])
    return jax.jit(jax.grad(loss))(trainable)
  g_slots = grads(lambda t: setup.partition.model_variables(t, frozen))
  g_merged = grads(lambda t: {"params": setup.partition.merge(t, frozen)})
  for k in g_slots:
    np.testing.assert_allclose(np.asarray(g_slots[k]), np.asarray(g_merged[k]), rtol=1e-4,
                               atol=1e-5, err_msg=k)


def test_frozen_matmul_weights_are_held_in_the_compute_dtype():
  setup = setup_training(_config([1], dtype="bfloat16"))
  _, frozen = setup.abstract_trainable_frozen()
  dtypes = {k.split("/")[-1]: v.dtype for k, v in frozen.items()}
  for name in ("embed_tokens", "lm_head", "q_proj", "o_proj", "gate_proj", "down_proj"):
    assert dtypes[name] == jnp.bfloat16, name
  for name in ("router", "router_bias", "scale"):  # applied in fp32
    assert dtypes[name] == jnp.float32, name
  full, trainable, frozen_values = _random_state(setup)
  assert all(frozen_values[k].dtype == frozen[k].dtype for k in frozen)
  ids = _batch(setup)["input_ids"]
  model = FlexOlmo(setup.cfg)
  held = jax.jit(lambda t, f: model.apply(setup.partition.model_variables(t, f), ids)[0])(
      trainable, frozen_values)
  reference = jax.jit(lambda p: model.apply({"params": p}, ids)[0])(full)
  # Every matmul casts its operands to bf16 anyway: the same numbers up to summation order.
  np.testing.assert_allclose(np.asarray(held), np.asarray(reference), rtol=2e-2, atol=2e-2)
  assert float(jnp.mean(jnp.abs(held - reference))) < 1e-3


@pytest.mark.parametrize("accum", [4])
def test_gradient_accumulation_equals_the_full_batch(accum):
  base = setup_training(_config([1]))
  split = setup_training(_config([1], grad_accum_steps=accum))
  _, trainable, frozen = _random_state(base)
  batch = _batch(base)
  results = []
  for setup in (base, split):
    state = setup.init_state_fn()(trainable)
    state, metrics = setup.jit_step()(state, frozen, batch)
    results.append((jax.device_get(state["params"]), jax.device_get(metrics)))
  (p1, m1), (p2, m2) = results
  for k in ("loss", "ce", "output_z_loss", "router_z_loss", "tokens", "grad_norm"):
    np.testing.assert_allclose(m2[k], m1[k], rtol=2e-5, err_msg=k)
  for k in p1:
    np.testing.assert_allclose(p2[k], p1[k], rtol=1e-5, atol=1e-7, err_msg=k)
