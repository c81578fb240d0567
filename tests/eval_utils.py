"""Tiny model directories on the FlexMix-mini tokenizer, for evaluation and generation tests."""
from __future__ import annotations

import jax
import numpy as np

from flexolmo_jax.storage import model_io
from flexolmo_jax.data import tokenizer_info
from flexolmo_jax.model import ModelConfig
from model_utils import random_params

NAMES = ("public", "code", "math", "legal")


def tiny_moe_config(tokenizer_path, **kw) -> ModelConfig:
  info = tokenizer_info(str(tokenizer_path))
  base = dict(vocab_size=info.padded_vocab_size, d_model=32, n_layers=2, n_heads=4,
              n_kv_heads=2, ffn_hidden=48, num_experts=4, top_k=2, expert_names=NAMES,
              dispatch="dropless", dtype="float32", eos_token_id=info.eos_id,
              pad_token_id=info.pad_id, max_seq_len=64)
  base.update(kw)
  return ModelConfig(**base)


def save_model(path, cfg, seed=0, params=None):
  params = random_params(cfg, seed) if params is None else params
  model_io.save_model_dir(path, params, cfg, {"stage": "test"}, overwrite=True)
  return params


def drop_expert(params, cfg: ModelConfig, name: str):
  """Params and config with expert `name` physically removed (its FFN and router row)."""
  keep = [i for i, n in enumerate(cfg.names) if n != name]
  def take(path, x):
    keys = [getattr(k, "key", str(k)) for k in path]
    if "mlp" in keys and keys[-1] in ("gate_proj", "up_proj", "down_proj", "router",
                                      "router_bias"):
      return np.asarray(x)[:, keep]  # scanned layout: [layers, experts, ...]
    return np.asarray(x)
  new = jax.tree_util.tree_map_with_path(take, params)
  names = tuple(cfg.names[i] for i in keep)
  return new, cfg.replace(num_experts=len(names), expert_names=names)
