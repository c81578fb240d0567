"""Expert-parallel dropless MoE: tokens travel to their experts' devices and back.

Used by `dispatch = "dropless"` when the current mesh has an "expert" axis of size ep > 1
(`layout` decides; otherwise the MoE sorts assignments locally). Inside one `jax.shard_map`:

  tokens    [B*T, d] flattened (padded to the shard count), split over every mesh axis
            except those splitting the weights' mlp dimension: (data, fsdp, expert) with the
            default rules, so a device holds n = B*T / (data*fsdp*expert) tokens.
  weights   [E, d, f] split P("expert", embed axes, mlp axes) exactly as the parameters are
            (no reshard): each expert shard holds El = E / ep experts. The embed (fsdp) axes
            are all-gathered inside, in the compute dtype (ZeRO-3: the gradient of that
            all-gather is the reduce-scatter of the weight gradient). The mlp (tensor) axes
            stay split: every tensor shard runs its f-slice of the SwiGLU on the same tokens
            and the partial outputs are psum-ed once, on [n, d], after the combine.

Per device: sort the n*k assignments by destination expert, send each expert shard its
rows, regroup the arrivals by local expert, grouped matmuls (`grouped_matmul`), send results
back, un-sort, weighted combine. Two transports (cfg.moe_transport):

  ragged      `jax.lax.ragged_all_to_all`: only the real rows cross the network. The TPU and
              GPU choice; XLA:CPU has no kernel for it (UNIMPLEMENTED at run time).
  all_to_all  `jax.lax.all_to_all` of a fixed [ep, cap, d] buffer, each chunk zero-padded.

Dropless by sizing for the worst case. A token's k experts are distinct, so it sends at
most c = min(k, El) rows to any one shard: cap = n * c rows per (source, destination) pair,
and a device receives at most R = ep * cap rows. Both transports receive into R rows and run
the grouped matmuls over R rows (rows past the real count are padding, selected away;
megablox skips their tiles). The all_to_all transport also *moves* R rows per device each
way, ep * c / k = min(ep, E / k) times the real traffic (2x for top-4 of 8 experts, ep x for
top-1); ragged moves only the real rows, though its receive buffer is R rows too.

Opt-out: excluded assignments are never sent, results are *selected* into place, padding
rows read a dedicated zero row (whose gradient is dropped), so an excluded or NaN expert has
no influence on other tokens' outputs (module docstring of model/moe.py).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from flexolmo_jax.model.config import ModelConfig
from flexolmo_jax.model.grouped_matmul import (grouped_matmul, grouped_matmul_impl,
                                               interpret_kernels)
from flexolmo_jax.model.layers import dtype_of

EXPERT_AXIS = "expert"


def moe_transport(cfg: ModelConfig) -> str:
  if cfg.moe_transport != "auto":
    return cfg.moe_transport
  return "all_to_all" if cfg.kernel_platform == "cpu" else "ragged"


@dataclasses.dataclass(frozen=True)
class Layout:
  mesh: jax.sharding.AbstractMesh
  tokens: tuple[str, ...]  # mesh axes splitting the flattened token dimension
  embed: tuple[str, ...]  # mesh axes splitting the weights' d dimension (all-gathered)
  mlp: tuple[str, ...]  # mesh axes splitting the weights' f dimension (output psum-ed)

  @property
  def token_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.tokens)


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def layout(cfg: ModelConfig, num_experts: int, d: int, f: int) -> Layout | None:
  """The expert-parallel layout on the current mesh, or None for the local path."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or EXPERT_AXIS not in mesh.axis_names or mesh.shape[EXPERT_AXIS] == 1:
    return None
  if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
    return None  # already inside a shard_map: no nested one over the same axes
  ep = mesh.shape[EXPERT_AXIS]
  if num_experts % ep:
    logging.warning("%d experts do not split over expert=%d devices; dropless MoE sorts "
                    "the global batch instead (all-gathers tokens)", num_experts, ep)
    return None
  from flexolmo_jax.parallel.sharding import DEFAULT_RULES, fit_spec  # avoid an import cycle
  rules = nn.get_logical_axis_rules() or DEFAULT_RULES
  # The weights' spec exactly as `param_shardings` lays the parameter out (rules + fit).
  spec = fit_spec(nn.logical_to_mesh_axes(("exp", "embed", "mlp"), rules),
                  (num_experts, d, f), mesh)
  split = lambda entry: tuple(a for a in _axes(entry) if a != EXPERT_AXIS and mesh.shape[a] > 1)
  embed, mlp = split(spec[1]), split(spec[2])
  batch = _axes(nn.logical_to_mesh_axes(("act_batch",), rules)[0])
  order = [a for a in batch if a in mesh.axis_names] + list(mesh.axis_names)
  tokens = tuple(dict.fromkeys(a for a in order if a not in mlp))
  return Layout(mesh, tokens, embed, mlp)


def dispatch(h, w1, w3, w2, top_w, top_i, valid, cfg: ModelConfig, lay: Layout):
  """y [B, T, d] f32 of the MoE FFN, experts split over the mesh's expert axis."""
  B, T, d = h.shape
  N = B * T
  pad = -N % lay.token_shards

  def flat(a, fill=0):
    a = a.reshape(N, *a.shape[2:])
    return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill) if pad else a

  tok = P(lay.tokens)
  w_in = P(EXPERT_AXIS, lay.embed or None, lay.mlp or None)
  w_out = P(EXPERT_AXIS, lay.mlp or None, lay.embed or None)
  body = functools.partial(_local, cfg=cfg, lay=lay, num_experts=w1.shape[0])
  # Pallas kernels (megablox) declare outputs without mesh-axis variance, which a
  # vma-checked shard_map refuses; unchecked, the gradients are the same (tested).
  fn = jax.shard_map(body, mesh=lay.mesh, in_specs=(tok, tok, tok, tok, w_in, w_in, w_out),
                     out_specs=tok, check_vma=grouped_matmul_impl(cfg) != "megablox")
  y = fn(flat(h), flat(top_w), flat(top_i), flat(valid, False), w1, w3, w2)
  return y[:N].reshape(B, T, d)


def _exclusive_cumsum(x, axis=0):
  return jnp.cumsum(x, axis=axis) - x


def _with_zero_row(x):
  """x plus one trailing zero row: the source of every padding row (its gradient is dropped)."""
  return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])


def _local(x, top_w, top_i, valid, w1, w3, w2, *, cfg: ModelConfig, lay: Layout,
           num_experts: int):
  """One device: x [n, d], routing [n, k], its El experts' weight shards -> y [n, d] f32."""
  dt = dtype_of(cfg.dtype)
  E = num_experts
  ep = jax.lax.axis_size(EXPERT_AXIS)
  El = E // ep
  n, d = x.shape
  k = top_i.shape[1]
  w1, w3, w2 = (w.astype(dt) for w in (w1, w3, w2))  # cast first: gather half the bytes
  if lay.embed:
    w1, w3 = (jax.lax.all_gather(w, lay.embed, axis=1, tiled=True) for w in (w1, w3))
    w2 = jax.lax.all_gather(w2, lay.embed, axis=2, tiled=True)

  # Sort this device's assignments by global expert, hence by destination shard. Excluded
  # ones get the sentinel E: sorted last and never sent.
  expert = jnp.where(valid, top_i, E).reshape(-1).astype(jnp.int32)
  order = jnp.argsort(expert, stable=True)
  sorted_expert = expert[order]
  x_sorted = x.astype(dt)[order // k]
  counts = jnp.bincount(expert, length=E + 1)[:E].reshape(ep, El).astype(jnp.int32)
  send = counts.sum(1)  # rows to each shard
  send_start = _exclusive_cumsum(send)
  cap = n * min(k, El)
  transport = moe_transport(cfg)
  if transport == "ragged":
    route = _Ragged(counts, send, send_start, cap)
  elif transport == "all_to_all":
    route = _Fixed(counts, send, send_start, cap, sorted_expert // El)
  else:
    raise ValueError(f"moe_transport {transport!r} is not available here")

  recv, recv_counts, recv_start = route.there(x_sorted)  # [R, d], [ep, El], [ep]
  R = recv.shape[0]
  src, group_sizes, total = _regroup(recv_counts, recv_start, R)
  xg = _with_zero_row(recv)[src]
  impl, interpret = grouped_matmul_impl(cfg), interpret_kernels(cfg)

  def gmm(a, w):
    return grouped_matmul(a.astype(dt), w, group_sizes, impl, interpret=interpret)

  o = gmm(nn.silu(gmm(xg, w1)) * gmm(xg, w3), w2)
  o = jnp.where((jnp.arange(R) < total)[:, None], o, 0.0).astype(dt)
  # Back to arrival order: arrival row r sits at grouped row inv[r] (R = none, a zero row).
  inv = jnp.full((R,), R, jnp.int32).at[src].set(jnp.arange(R, dtype=jnp.int32), mode="drop")
  back = route.back(_with_zero_row(o)[inv])  # [n*k, d] in sorted order

  out = jnp.zeros_like(back).at[order].set(back).reshape(n, k, d)
  y = jnp.sum(jnp.where(valid[..., None], top_w[..., None] * out.astype(jnp.float32), 0.0),
              axis=1)
  if lay.mlp:  # each tensor shard summed over its slice of the mlp dimension
    y = jax.lax.psum(y, lay.mlp)
  return y


def _regroup(recv_counts, recv_start, R: int):
  """Arrivals (source-major, each source's rows sorted by local expert) -> expert-major.

  recv_counts [ep, El]: rows from source q for local expert j; recv_start [ep]: where source
  q's rows begin. Returns src [R] (grouped row g reads arrival row src[g]; R = padding),
  group_sizes [El] and the number of real rows.
  """
  ep, El = recv_counts.shape
  src_start = recv_start[:, None] + _exclusive_cumsum(recv_counts, axis=1)  # [ep, El]
  group_sizes = recv_counts.sum(0)
  dst_start = _exclusive_cumsum(group_sizes)[None, :] + _exclusive_cumsum(recv_counts, axis=0)
  # Segments in grouped order: local expert major, then source.
  seg_dst, seg_src = dst_start.T.reshape(-1), src_start.T.reshape(-1)
  seg_end = seg_dst + recv_counts.T.reshape(-1)
  g = jnp.arange(R, dtype=jnp.int32)
  seg = jnp.minimum(jnp.searchsorted(seg_end, g, side="right"), ep * El - 1)
  total = group_sizes.sum()
  src = jnp.where(g < total, seg_src[seg] + g - seg_dst[seg], R).astype(jnp.int32)
  return src, group_sizes, total


class _Fixed:
  """all_to_all of [ep, cap, d] buffers: chunk s holds the rows for shard s, zero-padded."""

  def __init__(self, counts, send, send_start, cap, dest):
    self.counts, self.send, self.send_start, self.cap = counts, send, send_start, cap
    self.dest = dest  # [n*k] destination shard of each sorted row (ep = not sent)

  def there(self, x_sorted):
    ep, cap = self.send.shape[0], self.cap
    p = jnp.arange(cap, dtype=jnp.int32)[None, :]
    idx = jnp.where(p < self.send[:, None], self.send_start[:, None] + p, x_sorted.shape[0])
    buf = _with_zero_row(x_sorted)[idx]  # [ep, cap, d]
    recv = jax.lax.all_to_all(buf, EXPERT_AXIS, 0, 0, tiled=True)
    recv_counts = jax.lax.all_to_all(self.counts, EXPERT_AXIS, 0, 0, tiled=True)
    return recv.reshape(ep * cap, -1), recv_counts, jnp.arange(ep, dtype=jnp.int32) * cap

  def back(self, o):
    ep, cap = self.send.shape[0], self.cap
    ret = jax.lax.all_to_all(o.reshape(ep, cap, -1), EXPERT_AXIS, 0, 0, tiled=True)
    i = jnp.arange(self.dest.shape[0], dtype=jnp.int32)
    sent = self.dest < ep
    s = jnp.minimum(self.dest, ep - 1)
    slot = jnp.where(sent, s * cap + i - self.send_start[s], ep * cap)
    return _with_zero_row(ret.reshape(ep * cap, -1))[slot]


class _Ragged:
  """ragged_all_to_all: each source's rows land packed, source-major, in an R-row buffer."""

  def __init__(self, counts, send, send_start, cap):
    self.send, self.send_start, self.cap = send, send_start, cap
    self.me = jax.lax.axis_index(EXPERT_AXIS)
    self.all_counts = jax.lax.all_gather(counts, EXPERT_AXIS)  # [src, dst, El]
    self.sizes = self.all_counts.sum(-1)  # [src, dst] rows

  def there(self, x_sorted):
    ep = self.send.shape[0]
    recv_counts = self.all_counts[:, self.me]  # [src, El]
    self.recv_sizes = self.sizes[:, self.me]
    self.recv_start = _exclusive_cumsum(self.recv_sizes)
    # Where my rows land on each destination: after the rows of the sources before me.
    out_off = _exclusive_cumsum(self.sizes, axis=0)[self.me]
    self.rows = x_sorted.shape[0]
    buf = jnp.zeros((ep * self.cap, x_sorted.shape[1]), x_sorted.dtype)
    recv = jax.lax.ragged_all_to_all(x_sorted, buf, self.send_start, self.send, out_off,
                                     self.recv_sizes, axis_name=EXPERT_AXIS)
    return recv, recv_counts, self.recv_start

  def back(self, o):
    # Source q's rows return to where q took them from: q's send_start towards me.
    out_off = _exclusive_cumsum(self.sizes, axis=1)[:, self.me]
    buf = jnp.zeros((self.rows, o.shape[1]), o.dtype)  # unsent (excluded) rows stay zero
    return jax.lax.ragged_all_to_all(o, buf, self.recv_start, self.recv_sizes, out_off,
                                     self.send, axis_name=EXPERT_AXIS)
