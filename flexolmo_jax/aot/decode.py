"""The planner's decode mode: the programs `generate` runs, traced on abstract sharded inputs.

Two programs, both with the config's mesh and logical axis rules (inference/generate.py):
- the decode step (one token per row against a KV cache of `seq_len` slots, the cache donated):
  the steady state of decoding, whose roofline gives the per-token time;
- the whole generate program (prefill of `prompt_len` tokens, then the decode loop up to
  `seq_len` slots): what a `generate` call holds at its peak.
Params enter the step in the dtypes the decode loop reads (`cast_for_decoding`: matmul weights
in the compute dtype), and the generate program in the stored `param_dtype` (it casts once).
"""
from __future__ import annotations

import jax
import numpy as np

from flexolmo_jax import config_base
from flexolmo_jax.inference import generate as gen
from flexolmo_jax.model import abstract_params, init_cache
from flexolmo_jax.parallel import rules_from_config


def _placed(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      shardings)


def _setup(config):
  return config_base.model_config(config), rules_from_config(config.axis_rules)


def trace_step(config, mesh, batch: int, context: int):
  """The jitted decode step of `config`, traced for `batch` rows and `context` cache slots."""
  cfg, rules = _setup(config)
  fn, (p_sh, rows, _, cache_sh, mask_sh) = gen.jit_decode_step(cfg, mesh, rules, batch, context)
  params = jax.eval_shape(lambda p: gen.cast_for_decoding(p, cfg), abstract_params(cfg))
  cache = jax.eval_shape(lambda: init_cache(cfg, batch, context))
  tok = jax.ShapeDtypeStruct((batch,), np.int32, sharding=rows)
  mask = (jax.ShapeDtypeStruct((batch, cfg.num_experts), bool, sharding=mask_sh)
          if cfg.is_moe else None)
  return fn.trace(_placed(params, p_sh), tok, tok, _placed(cache, cache_sh), mask)


def trace_generate(config, mesh, batch: int, context: int, prompt_len: int):
  """The whole generate program: prefill `prompt_len` tokens, decode up to `context` slots."""
  cfg, rules = _setup(config)
  if not 0 < prompt_len < context:
    raise ValueError(f"prompt_len {prompt_len} must be in [1, seq_len={context})")
  s = gen.Sampling(max_new_tokens=context - prompt_len, stop_at_eos=False)
  fn = gen.jit_generate(cfg, s, mesh, rules, batch, prompt_len)
  p_sh, ids_sh, valid_sh, mask_sh, key_sh = gen.input_shardings(cfg, mesh, rules, batch,
                                                                prompt_len)
  key = jax.eval_shape(lambda: jax.random.key(0))
  mask = (jax.ShapeDtypeStruct((batch, cfg.num_experts), bool, sharding=mask_sh)
          if cfg.is_moe else None)
  return fn.trace(_placed(abstract_params(cfg), p_sh),
                  jax.ShapeDtypeStruct((batch, prompt_len), np.int32, sharding=ids_sh),
                  jax.ShapeDtypeStruct((batch, prompt_len), bool, sharding=valid_sh), mask,
                  jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=key_sh))


def cache_bytes_per_chip(config, mesh, batch: int, context: int) -> float:
  """Bytes of the KV cache (k, v and validity) that one chip holds."""
  cfg, rules = _setup(config)
  shapes = jax.eval_shape(lambda: init_cache(cfg, batch, context))
  sh = gen.cache_shardings(cfg, mesh, rules, batch, context)
  return float(sum(np.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x, s in zip(shapes, sh)))
