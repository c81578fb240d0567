"""Stacked expert weights handed to the MoE as separate operands, one per group of slots.

In the expert stage, expert 1 of a stacked [E, ...] tensor trains while the public expert
(slot 0) is frozen. Concatenating the two back into one array before the MoE's einsum makes
autodiff compute the weight gradient of *every* slot and throw the frozen one away. Given as
`ExpertSlots` (one operand per group), each group runs its own einsum, so no weight gradient
of a frozen group exists at all; the frozen group can also stay in the compute dtype.

The training step passes these in the "expert_slots" variable collection at the same path as
the parameter (see train/partition.py); the model's parameters and checkpoints are unchanged.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

COLLECTION = "expert_slots"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertSlots:
  """parts[i] holds expert slots `slots[i]` (in that order) on `axis`; together, all slots."""
  parts: tuple
  slots: tuple = dataclasses.field(metadata=dict(static=True))
  axis: int = dataclasses.field(default=0, metadata=dict(static=True))

  @property
  def num_experts(self) -> int:
    return sum(len(s) for s in self.slots)

  def stacked(self) -> jax.Array:
    """The full [.., E, ..] tensor in slot order (materialised: for small leaves only)."""
    return restore_order([p for p in self.parts], self.slots, self.axis, self.parts[0].dtype)

  def with_axis(self, axis: int) -> "ExpertSlots":
    return ExpertSlots(self.parts, self.slots, axis)


def restore_order(outputs, slots, axis: int, dtype=None) -> jax.Array:
  """Concatenate per-group arrays (group i holding `slots[i]` on `axis`) in slot order."""
  if dtype is not None:
    outputs = [o.astype(dtype) for o in outputs]
  both = jnp.concatenate(outputs, axis=axis)
  order = [s for group in slots for s in group]
  if order == sorted(order):
    return both
  inverse = [order.index(i) for i in range(len(order))]
  return jnp.take(both, jnp.asarray(inverse), axis=axis)


def stacked(w) -> jax.Array:
  """`w` as one stacked array, whether it is an array or ExpertSlots."""
  return w.stacked() if isinstance(w, ExpertSlots) else w


def groups(*weights):
  """[(slots, weights of that group)]: one group (slots None) for plain stacked arrays.

  Every ExpertSlots among `weights` must have the same grouping (the expert FFN's three
  matrices are split the same way by the partition).
  """
  split = [w for w in weights if isinstance(w, ExpertSlots)]
  if not split:
    return [(None, weights)]
  slots = split[0].slots
  if any(w.slots != slots for w in split) or len(split) != len(weights):
    raise ValueError(f"expert weights split differently: {[getattr(w, 'slots', None) for w in weights]}")
  return [(group, tuple(w.parts[i] for w in weights)) for i, group in enumerate(slots)]


def run_groups(fn, weights, sliced=()):
  """fn(*group_weights, *group_sliced) -> array with expert axis 0; results in slot order.

  `sliced` are operands with a leading expert axis (e.g. per-expert token buffers), cut to
  each group's slots.
  """
  parts = groups(*weights)
  if parts[0][0] is None:
    return fn(*weights, *sliced)
  outs = [fn(*ws, *[jnp.take(x, jnp.asarray(group), axis=0) for x in sliced])
          for group, ws in parts]
  return restore_order(outs, tuple(g for g, _ in parts), 0)
