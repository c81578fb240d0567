"""The LM head as a pure function of the params tree.

`FlexOlmo.__call__` applies it to the whole sequence; the chunked loss (train/losses.py)
applies it to one [B, chunk, d] block of the normed hidden state at a time (the model run
with `return_logits=False`), so [B, T, V] logits never exist. One function for both keeps
the two paths the same maths.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from flexolmo_jax.model.config import ModelConfig
from flexolmo_jax.model.layers import Array, constrain, dot


def head_logits(x: Array, lm_head: Array, cfg: ModelConfig) -> Array:
  """Normed hidden [B, T, d] x lm_head [d, V] -> fp32 logits [B, T, V].

  The vocabulary axis stays sharded ("act_vocab", over "tensor" by default): the loss then
  reduces over vocab shards (an all-reduce of [B, T] values) instead of gathering logits."""
  logits = dot("btd,dv->btv", x, lm_head, cfg, out_dtype=jnp.float32)
  return constrain(logits, ("act_batch", "act_length", "act_vocab"))


def lm_head_weight(params) -> Array:
  """The [d, V] head weight from a params tree (boxed or plain)."""
  return nn.meta.unbox(params["lm_head"])


def apply_head(cfg: ModelConfig, params, x: Array) -> Array:
  """Logits of a block of normed hidden states, from the params tree."""
  return head_logits(x, lm_head_weight(params), cfg)
