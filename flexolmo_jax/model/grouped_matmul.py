"""Grouped matmul: [M, K] x [G, K, N] with rows grouped contiguously -> [M, N] (f32 acc).

Rows past sum(group_sizes) belong to no group; their output is unspecified (zero for
ragged_dot, tiled and select; uninitialised for megablox), so callers must *select* them away.

impl (cfg.grouped_matmul, "auto" resolved by `grouped_matmul_impl`):
  ragged_dot  `jax.lax.ragged_dot`, a real grouped-matmul kernel on accelerators.
  megablox    the Pallas TPU kernel `jax.experimental.pallas.ops.tpu.megablox.gmm` (custom
              VJP with its own transposed kernels); interpret mode off TPU, for tests.
  tiled       megablox's schedule in plain XLA (a loop over overlapping row tile x group
              pairs, rows *selected* into place): ~M*K*N work, the CPU choice ("auto").
  select      every group densely, then each row *selects* its own group: G*M*K*N work, the
              same as XLA:CPU's lowering of ragged_dot, a dense multiply against zero-masked
              rows where 0 * NaN from another group's weights leaks into every row.

Every impl but ragged_dot on CPU keeps a NaN group's weights out of other groups' rows in
the forward pass (the opt-out guarantee; backward passes make no such promise).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flexolmo_jax.model.config import ModelConfig

# Megablox tiles (m, k, n), MaxText's defaults; each is capped at the problem's size.
MEGABLOX_TILING = (512, 1024, 1024)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, impl: str,
                   *, interpret: bool = False) -> jax.Array:
  group_sizes = group_sizes.astype(jnp.int32)
  if impl == "ragged_dot":
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
  if impl == "megablox":
    return _megablox(lhs, rhs, group_sizes, interpret)
  if impl == "tiled":
    return _tiled(lhs, rhs, group_sizes)
  if impl != "select":
    raise ValueError(f"grouped_matmul {impl!r} is not available here")
  ends = jnp.cumsum(group_sizes)
  row = jnp.arange(lhs.shape[0])
  group_of_row = jnp.searchsorted(ends, row, side="right")  # == G for rows past the last group
  out = jnp.einsum("mk,gkn->gmn", lhs, rhs, preferred_element_type=jnp.float32)
  own = jax.nn.one_hot(group_of_row, rhs.shape[0], dtype=bool).T  # [G, M]
  return jnp.sum(jnp.where(own[..., None], out, 0.0), axis=0)


def _megablox(lhs, rhs, group_sizes, interpret: bool):
  from jax.experimental.pallas.ops.tpu.megablox import gmm
  m, k = lhs.shape
  n = rhs.shape[2]
  # The m tile must divide the row count: pad with rows past the last group (never computed).
  tm = min(MEGABLOX_TILING[0], -(-m // 128) * 128)
  pad = -m % tm
  if pad:
    lhs = jnp.concatenate([lhs, jnp.zeros((pad, k), lhs.dtype)])
  tiling = (tm, min(MEGABLOX_TILING[1], k), min(MEGABLOX_TILING[2], n))
  # Positional: gmm is a custom_vjp whose non-differentiable arguments are positional.
  out = gmm(lhs, rhs, group_sizes, jnp.float32, tiling, None, None, False, interpret)
  return out[:m]


TILE_ROWS = 256


def _tiled(lhs, rhs, group_sizes):
  """Megablox's schedule in plain XLA: a loop over the (row tile, group) pairs that overlap.

  There are at most ceil(M / tm) + G - 1 such pairs, so the work is ~M*K*N plus one tile per
  group boundary (not G*M*K*N as in `select`). Each pair multiplies one [tm, K] tile by its
  group's [K, N] and *selects* its own rows into the output (NaN-safe, exact).
  """
  M, K = lhs.shape
  G, _, N = rhs.shape
  tm = min(TILE_ROWS, M)
  tiles = -(-M // tm)
  Mp = tiles * tm
  if Mp != M:
    lhs = jnp.concatenate([lhs, jnp.zeros((Mp - M, K), lhs.dtype)])
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  first = starts // tm
  last = jnp.where(group_sizes > 0, (ends - 1) // tm, first - 1)  # empty groups: no pairs
  n_pairs = last - first + 1
  pair_end = jnp.cumsum(n_pairs)
  W = tiles + G - 1  # static bound on the number of overlapping pairs

  def step(out, w):
    g = jnp.minimum(jnp.searchsorted(pair_end, w, side="right"), G - 1)
    tile = first[g] + w - (pair_end[g] - n_pairs[g])
    live = w < pair_end[-1]
    tile = jnp.where(live, jnp.clip(tile, 0, tiles - 1), 0)
    row0 = tile * tm
    x = jax.lax.dynamic_slice_in_dim(lhs, row0, tm)
    y = jnp.dot(x, rhs[g], preferred_element_type=jnp.float32)
    row = row0 + jnp.arange(tm)
    mine = live & (row >= starts[g]) & (row < ends[g])
    old = jax.lax.dynamic_slice_in_dim(out, row0, tm)
    return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mine[:, None], y, old), row0, 0), None

  out = jnp.zeros((Mp, N), jnp.float32)
  # Inside shard_map the loop carry must vary over the same mesh axes as what it accumulates.
  vma = tuple(sorted(set().union(*(jax.typeof(a).manual_axis_type.varying
                                   for a in (lhs, rhs, group_sizes)))))
  if vma:
    out = jax.lax.pcast(out, vma, to="varying")
  out, _ = jax.lax.scan(step, out, jnp.arange(W))
  return out[:M]


def grouped_matmul_impl(cfg: ModelConfig) -> str:
  if cfg.grouped_matmul != "auto":
    return cfg.grouped_matmul
  # XLA:CPU's ragged_dot is a dense masked multiply (NaN-unsafe, G times the work): tiled.
  return "tiled" if cfg.kernel_platform == "cpu" else "ragged_dot"


def interpret_kernels(cfg: ModelConfig) -> bool:
  """Pallas TPU kernels run in interpret mode anywhere but on a TPU."""
  return cfg.kernel_platform != "tpu"
