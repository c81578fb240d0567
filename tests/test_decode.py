"""Prefill + KV-cache decoding gives the same logits as one full forward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexolmo_jax.model import FlexOlmo, expert_mask, init_cache
from model_utils import random_ids, random_params, tiny_config


@pytest.mark.parametrize("kw", [
    dict(num_experts=0),
    dict(num_experts=4, top_k=2, dispatch="dropless"),
    dict(num_experts=3, top_k=3, dispatch="dense", n_kv_heads=1, scan_layers=False),
])
def test_prefill_then_decode_matches_full_forward(kw):
  cfg = tiny_config(**kw)
  params = random_params(cfg)
  ids = random_ids(cfg, batch=2, length=12)
  mask = None
  if cfg.is_moe:
    mask = jnp.asarray(expert_mask(cfg.names, [[cfg.names[1]], []]))
  model = FlexOlmo(cfg)
  full, _, _ = model.apply({"params": params}, ids, expert_mask=mask)

  step = jax.jit(lambda p, x, c: model.apply({"params": p}, x, expert_mask=mask, cache=c))
  cache = init_cache(cfg, batch=2, max_len=20)
  logits, _, cache = step(params, ids[:, :5], cache)  # prefill 5 tokens
  pieces = [logits]
  for t in range(5, 12):  # then one token at a time
    logits, _, cache = step(params, ids[:, t:t + 1], cache)
    pieces.append(logits)
  assert int(cache.index) == 12
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), np.asarray(full), atol=1e-5, rtol=0)


def test_padding_slots_are_ignored():
  """A prompt written with invalid (padding) slots attends only to its valid tokens."""
  cfg = tiny_config(num_experts=0)
  params = random_params(cfg)
  ids = random_ids(cfg, batch=1, length=6)
  model = FlexOlmo(cfg)
  # Reference: the 4 real tokens alone.
  ref, _, _ = model.apply({"params": params}, ids[:, 2:])
  # Left-padded: two pad slots first, positions restart at 0 for the first real token.
  cache = init_cache(cfg, batch=1, max_len=8)
  valid = jnp.asarray([[False, False, True, True, True, True]])
  positions = jnp.asarray([[0, 0, 0, 1, 2, 3]])
  out, _, _ = model.apply({"params": params}, ids, positions=positions, cache=cache,
                          input_valid=valid)
  np.testing.assert_allclose(np.asarray(out[:, 2:]), np.asarray(ref), atol=1e-5, rtol=0)
