"""Batched generation with a KV cache and a per-example expert mask (the library; the command
is `python -m flexolmo_jax.generate`, inference/generate_cli.py, whose docstring says more).

`generate(params, cfg, prompt_ids, Sampling(...), exclude=[[...], ...])`: left-padded prompts,
one prefill pass, then one token per step inside a single compiled loop; greedy or
temperature / top-p sampling; every example has its own expert mask.

Sharded (`mesh=`, `rules=`: a config's mesh and logical axis rules): the program is jitted with
explicit in/out shardings (params by their logical axes, prompts and masks over the batch
axes), and the KV cache [L, B, S, Hkv, D] is constrained to `cache_shardings`: batch over the
axes the rules give `act_batch` (data, fsdp), KV heads over those of `act_kv_heads` (tensor).
The rules are the caller's, entered inside the traced function (never ambient state).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flexolmo_jax.model import FlexOlmo, ModelConfig, expert_mask, init_cache
from flexolmo_jax.model.layers import KVCache
from flexolmo_jax.parallel import DEFAULT_RULES, activation_sharding, param_shardings

# Logical axes of the KV cache: k/v [L, B, S, Hkv, D], valid [B, S], index (a scalar).
_KV_AXES = ("layers", "act_batch", "act_length", "act_kv_heads", None)
CACHE_AXES = KVCache(_KV_AXES, _KV_AXES, ("act_batch", "act_length"), ())


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


def cache_shardings(cfg: ModelConfig, mesh: Mesh, rules, batch: int, max_len: int) -> KVCache:
  """NamedSharding of every KV cache field, from CACHE_AXES and the rules (a dimension the
  mesh axes do not divide, e.g. 2 KV heads over tensor=4, is replicated)."""
  shapes = jax.eval_shape(lambda: init_cache(cfg, batch, max_len))
  return KVCache(*(activation_sharding(mesh, axes, x.shape, rules)
                   for axes, x in zip(CACHE_AXES, shapes)))


def batch_shards(mesh: Mesh, rules) -> int:
  """How many ways the rules split the batch over this mesh (a batch multiple of it is split,
  not replicated)."""
  axes = nn.logical_to_mesh_axes(("act_batch",), rules)[0]
  names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in names)


def _decode_models(cfg: ModelConfig):
  """(prefill model, decode-step model).

  Decode steps feed one token per row: its top-k experts are distinct, so capacity dispatch
  with one slot per expert and row is exact (never drops) and, unlike the dense or sorted
  paths, touches only the slots in use. Prefill keeps the model's dispatch.
  """
  return FlexOlmo(cfg), FlexOlmo(cfg.replace(dispatch="capacity") if cfg.is_moe else cfg)


def decode_step(step_model, params, tok, pos, cache, mask):
  """One token per row: (next-token logits [B, V] f32, the updated cache)."""
  logits, _, cache = step_model.apply({"params": params}, tok[:, None], positions=pos[:, None],
                                      expert_mask=mask, cache=cache)
  return logits[:, -1], cache


def _generate_program(cfg: ModelConfig, s: Sampling, mesh: Mesh | None, rules):
  """The traced body of generation (make_generate_fn); `mesh` given: sharding-constrained."""
  model, step_model = _decode_models(cfg)
  N = s.max_new_tokens

  def run(params, ids, valid, mask, key):
    params = cast_for_decoding(params, cfg)  # once per call, outside the decode loop
    B, P = ids.shape
    if mesh is None:
      keep = lambda cache: cache
    else:
      sh = cache_shardings(cfg, mesh, rules, B, P + N)
      keep = lambda cache: jax.lax.with_sharding_constraint(cache, sh)
    cache = keep(init_cache(cfg, B, P + N))
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    logits, _, cache = model.apply({"params": params}, ids, positions=positions,
                                   expert_mask=mask, cache=cache, input_valid=valid)
    cache = keep(cache)
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
      logits, cache = decode_step(step_model, params, tok, pos, cache, mask)
      new = sample_next(logits, jax.random.fold_in(key, i), s)
      new = jnp.where(done, cfg.pad_token_id, new)
      out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], i, axis=1)
      length = length + (~done).astype(jnp.int32)
      done = done | ((new == cfg.eos_token_id) & s.stop_at_eos)
      return i + 1, new, pos + 1, keep(cache), done, out, length

    state = (jnp.ones((), jnp.int32), tok, pos, cache, done, out, length)
    _, _, _, _, _, out, length = jax.lax.while_loop(cond, body, state)
    return out, length

  if mesh is None:
    return run

  def sharded_run(*args):
    with nn.logical_axis_rules(rules):  # the model's activation constraints use these rules
      return run(*args)
  return sharded_run


def input_shardings(cfg: ModelConfig, mesh: Mesh, rules, batch: int, prompt_len: int):
  """in_shardings of the generate program: (params, ids, valid, mask, key)."""
  rows = activation_sharding(mesh, ("act_batch", "act_length"), (batch, prompt_len), rules)
  mask = activation_sharding(mesh, ("act_batch", None), (batch, max(cfg.num_experts, 1)), rules)
  return (param_shardings(cfg, mesh, rules), rows, rows, mask, NamedSharding(mesh, P()))


def jit_generate(cfg: ModelConfig, s: Sampling, mesh: Mesh, rules, batch: int, prompt_len: int):
  """The generate program for one input shape, jitted with explicit shardings (the tokens and
  lengths come back replicated: small, and readable on every host)."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(_generate_program(cfg, s, mesh, rules),
                 in_shardings=input_shardings(cfg, mesh, rules, batch, prompt_len),
                 out_shardings=(replicated, replicated))


def jit_decode_step(cfg: ModelConfig, mesh: Mesh, rules, batch: int, max_len: int):
  """One decode step as its own program (the generate loop's body; the AOT planner compiles
  it): (params, tok [B], pos [B], cache, mask [B,E] | None) -> (logits [B, V], cache), the
  cache donated and kept in `cache_shardings`; returns (jitted, in_shardings)."""
  _, step_model = _decode_models(cfg)
  cache = cache_shardings(cfg, mesh, rules, batch, max_len)
  rows = activation_sharding(mesh, ("act_batch",), (batch,), rules)
  mask = activation_sharding(mesh, ("act_batch", None), (batch, max(cfg.num_experts, 1)), rules)
  logits = activation_sharding(mesh, ("act_batch", "act_vocab"), (batch, cfg.vocab_size), rules)

  def fn(params, tok, pos, cache, mask):
    with nn.logical_axis_rules(rules):
      return decode_step(step_model, params, tok, pos, cache, mask)
  in_shardings = (param_shardings(cfg, mesh, rules), rows, rows, cache, mask)
  return jax.jit(fn, in_shardings=in_shardings, out_shardings=(logits, cache),
                 donate_argnums=(3,)), in_shardings


class _ShardedGenerate:
  """make_generate_fn's callable on a mesh: one jit (with its shardings) per input shape."""

  def __init__(self, cfg: ModelConfig, s: Sampling, mesh: Mesh, rules):
    self.cfg, self.sampling, self.mesh, self.rules = cfg, s, mesh, rules
    self.jitted = functools.lru_cache(maxsize=8)(
        lambda batch, prompt_len: jit_generate(cfg, s, mesh, rules, batch, prompt_len))

  def place(self, ids, valid, mask):
    """Host arrays -> global arrays in the program's input shardings (every host holds the
    whole batch, as `generate` builds it, so each reads its own shards)."""
    sh = input_shardings(self.cfg, self.mesh, self.rules, *ids.shape)
    put = lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return (put(np.asarray(ids), sh[1]), put(np.asarray(valid), sh[2]),
            None if mask is None else put(np.asarray(mask), sh[3]))

  def __call__(self, params, ids, valid, mask, key):
    ids, valid, mask = self.place(ids, valid, mask)
    with jax.set_mesh(self.mesh):
      return self.jitted(*ids.shape)(params, ids, valid, mask, key)


def make_generate_fn(cfg: ModelConfig, s: Sampling, mesh: Mesh | None = None, rules=None):
  """jit(params, ids [B,P], valid [B,P], mask [B,E] | None, key) -> (tokens [B,N], lengths [B]).

  Tokens after an example's EOS (kept) are the pad id; lengths count tokens up to and
  including EOS. mesh (with rules, default DEFAULT_RULES): sharded as the module doc says;
  params must then be in (or are moved to) `param_shardings(cfg, mesh, rules)`.
  """
  if mesh is None:
    return jax.jit(_generate_program(cfg, s, None, None))
  return _ShardedGenerate(cfg, s, mesh, DEFAULT_RULES if rules is None else rules)


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], s: Sampling,
             exclude=(), seed: int = 0, fn=None, mesh: Mesh | None = None,
             rules=None) -> list[list[int]]:
  """Generated ids per prompt (EOS included when reached; padding removed).

  exclude: expert names for every example, or one list per example (per-example masks).
  mesh / rules: run sharded (make_generate_fn); the batch is padded with copies of the first
  prompt to a multiple of the batch shards, so rows are split over the mesh, not replicated.
  """
  n = len(prompts)
  per_example = len(exclude) > 0 and not isinstance(exclude[0], str)
  if cfg.is_moe and per_example and len(exclude) != n:
    raise ValueError(f"{len(exclude)} exclusion lists for {n} prompts")
  if not cfg.is_moe and any(exclude):
    raise ValueError("this is a dense model: there are no experts to exclude")
  if mesh is not None:
    extra = -n % batch_shards(mesh, DEFAULT_RULES if rules is None else rules)
    prompts = list(prompts) + [prompts[0]] * extra
    if per_example:
      exclude = list(exclude) + [exclude[0]] * extra
  ids, valid = left_pad(prompts, cfg.pad_token_id)
  mask = None
  if cfg.is_moe:
    mask = np.asarray(expert_mask(cfg.names, list(exclude), len(prompts)))
  fn = fn or make_generate_fn(cfg, s, mesh, rules)
  if mesh is None:
    ids, valid = jnp.asarray(ids), jnp.asarray(valid)
    mask = None if mask is None else jnp.asarray(mask)
  out, length = jax.device_get(fn(params, ids, valid, mask, jax.random.key(seed)))
  return [list(map(int, out[i, :length[i]])) for i in range(n)]


def inference_dispatch(cfg: ModelConfig) -> str:
  """Exact (never-dropping) MoE dispatch for serving: padding must not take real tokens'
  capacity. dense on CPU (cheapest for small batches there), dropless elsewhere."""
  if not cfg.is_moe:
    return cfg.dispatch
  return "dense" if jax.default_backend() == "cpu" else "dropless"
