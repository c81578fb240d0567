"""Helpers shared by model tests: tiny configs, random params, HF reference models."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.model import FlexOlmo, ModelConfig, init_params


def tiny_config(**kw) -> ModelConfig:
  base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
              num_experts=4, top_k=2, dtype="float32", eos_token_id=1, pad_token_id=2,
              max_seq_len=64)
  base.update(kw)
  return ModelConfig(**base)


def random_params(cfg: ModelConfig, seed: int = 0):
  """Random params where every tensor (norms and router too) is non-trivial."""
  params = init_params(cfg, jax.random.key(seed))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed + 1000), len(leaves))
  out = []
  for (path, x), k in zip(leaves, keys):
    name = "/".join(getattr(p, "key", str(p)) for p in path)
    if name.endswith("scale"):
      x = 1.0 + 0.2 * jax.random.normal(k, x.shape, x.dtype)
    elif "router" in name:
      x = 0.3 * jax.random.normal(k, x.shape, x.dtype)
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def forward(cfg, params, ids, **kw):
  logits, aux, _ = jax.jit(lambda p, i: FlexOlmo(cfg).apply({"params": p}, i, **kw))(params, ids)
  return np.asarray(logits), aux


def random_ids(cfg, batch=2, length=11, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length)),
                     jnp.int32)
