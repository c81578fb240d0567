"""Batched generation with a KV cache and a per-example expert mask (the library; the command
is `python -m flexolmo_jax.generate`, inference/generate_cli.py, whose docstring says more).

`generate(params, cfg, prompt_ids, Sampling(...), exclude=[[...], ...])`: left-padded prompts,
one prefill pass, then one token per step inside a single compiled loop; greedy or
temperature / top-p sampling; every example has its own expert mask.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.model import FlexOlmo, ModelConfig, expert_mask, init_cache


@dataclasses.dataclass(frozen=True)
class Sampling:
  max_new_tokens: int = 64
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0
  stop_at_eos: bool = True
  vocab_limit: int | None = None  # never sample ids >= this (the tokenizer's real vocabulary)

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError("max_new_tokens must be >= 1")
    if self.temperature < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {self.temperature}, "
                       f"{self.top_p})")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 8):
  """(ids [B, P], valid [B, P]) with every prompt right-aligned; P a multiple of `multiple`."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  P = -(-max(len(p) for p in prompts) // multiple) * multiple
  ids = np.full((len(prompts), P), pad_id, np.int32)
  valid = np.zeros((len(prompts), P), bool)
  for i, p in enumerate(prompts):
    ids[i, P - len(p):] = p
    valid[i, P - len(p):] = True
  return ids, valid


def sample_next(logits, key, s: Sampling):
  """logits [B, V] f32 -> token ids [B]. Row i draws from fold_in(key, i)."""
  if s.vocab_limit is not None and s.vocab_limit < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < s.vocab_limit, logits, -jnp.inf)
  if s.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / s.temperature
  if s.top_p < 1.0:
    desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    n_keep = jnp.maximum(jnp.sum(before < s.top_p, axis=-1), 1)
    threshold = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(logits.shape[0]))
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


# Parameters that only ever enter the model through `dot` (operands cast to the compute dtype)
# or the embedding lookup (cast right after): storing them in the compute dtype gives the same
# results and halves the bytes each decode step reads. Norm scales and the router stay as they
# are (they are used in fp32).
_FP32_LEAVES = ("scale", "router", "router_bias")


def cast_for_decoding(params, cfg: ModelConfig):
  """Matmul weights in the compute dtype (exact: `dot` casts them there anyway)."""
  dt = jnp.dtype(cfg.dtype)

  def cast(path, x):
    name = getattr(path[-1], "key", str(path[-1]))
    if name in _FP32_LEAVES or jnp.dtype(x.dtype).itemsize <= dt.itemsize:
      return x
    return x.astype(dt)
  return jax.tree_util.tree_map_with_path(cast, params)


def make_generate_fn(cfg: ModelConfig, s: Sampling):
  """jit(params, ids [B,P], valid [B,P], mask [B,E] | None, key) -> (tokens [B,N], lengths [B]).

  Tokens after an example's EOS (kept) are the pad id; lengths count tokens up to and
  including EOS.
  """
  model = FlexOlmo(cfg)
  # Decode steps feed one token per row: its top-k experts are distinct, so capacity
  # dispatch with one slot per expert and row is exact (never drops) and, unlike the dense
  # or sorted paths, touches only the slots in use. Prefill keeps the model's dispatch.
  step_model = FlexOlmo(cfg.replace(dispatch="capacity") if cfg.is_moe else cfg)
  N = s.max_new_tokens

  def run(params, ids, valid, mask, key):
    params = cast_for_decoding(params, cfg)  # once per call, outside the decode loop
    B, P = ids.shape
    cache = init_cache(cfg, B, P + N)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    logits, _, cache = model.apply({"params": params}, ids, positions=positions,
                                   expert_mask=mask, cache=cache, input_valid=valid)
    pos = jnp.sum(valid, axis=1).astype(jnp.int32)
    tok = sample_next(logits[:, -1], jax.random.fold_in(key, 0), s)
    done = (tok == cfg.eos_token_id) & s.stop_at_eos
    out = jnp.full((B, N), cfg.pad_token_id, jnp.int32).at[:, 0].set(tok)
    length = jnp.ones((B,), jnp.int32)

    def cond(state):
      i, _, _, _, done, _, _ = state
      return (i < N) & ~jnp.all(done)

    def body(state):
      i, tok, pos, cache, done, out, length = state
      logits, _, cache = step_model.apply({"params": params}, tok[:, None],
                                          positions=pos[:, None], expert_mask=mask, cache=cache)
      new = sample_next(logits[:, -1], jax.random.fold_in(key, i), s)
      new = jnp.where(done, cfg.pad_token_id, new)
      out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], i, axis=1)
      length = length + (~done).astype(jnp.int32)
      done = done | ((new == cfg.eos_token_id) & s.stop_at_eos)
      return i + 1, new, pos + 1, cache, done, out, length

    state = (jnp.ones((), jnp.int32), tok, pos, cache, done, out, length)
    _, _, _, _, _, out, length = jax.lax.while_loop(cond, body, state)
    return out, length

  return jax.jit(run)


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], s: Sampling,
             exclude=(), seed: int = 0, fn=None) -> list[list[int]]:
  """Generated ids per prompt (EOS included when reached; padding removed).

  exclude: expert names for every example, or one list per example (per-example masks).
  """
  ids, valid = left_pad(prompts, cfg.pad_token_id)
  mask = None
  if cfg.is_moe:
    per_example = len(exclude) > 0 and not isinstance(exclude[0], str)
    if per_example and len(exclude) != len(prompts):
      raise ValueError(f"{len(exclude)} exclusion lists for {len(prompts)} prompts")
    mask = jnp.asarray(expert_mask(cfg.names, list(exclude), len(prompts)))
  elif any(exclude):
    raise ValueError("this is a dense model: there are no experts to exclude")
  fn = fn or make_generate_fn(cfg, s)
  out, length = jax.device_get(fn(params, jnp.asarray(ids), jnp.asarray(valid), mask,
                                  jax.random.key(seed)))
  return [list(map(int, out[i, :length[i]])) for i in range(len(prompts))]


def inference_dispatch(cfg: ModelConfig) -> str:
  """Exact (never-dropping) MoE dispatch for serving: padding must not take real tokens'
  capacity. dense on CPU (cheapest for small batches there), dropless elsewhere."""
  if not cfg.is_moe:
    return cfg.dispatch
  return "dense" if jax.default_backend() == "cpu" else "dropless"
