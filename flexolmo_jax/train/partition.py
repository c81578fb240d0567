"""Which parameters train: path patterns (and expert slots) from the config.

The trainable part and the frozen part of the model are held as two flat dicts keyed by
parameter path ("decoder/layers/mlp/gate_proj"). Only the trainable dict is differentiated
and has optimizer state; the frozen dict enters the step as a plain input. A stacked expert
tensor [L, E, ...] can be split along its expert axis, so "expert 1 of 2" trains while the
public expert (slot 0) stays frozen in the same array:

    trainable = ["mlp/(gate_proj|up_proj|down_proj|router|router_bias)"], trainable_experts = [1]

Frozen means free: `model_variables` hands such a split leaf to the model as two operands
(model/expert_slots.py), never re-concatenated, so no weight gradient of the frozen slot is
computed; and frozen leaves that only ever enter matmuls are held in the compute dtype
(`split(..., compute_dtype=...)`): every matmul casts its operands to it anyway, so the
results are the same while the frozen half takes half the memory and half the gather bytes.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from flexolmo_jax.model import expert_slots

# Parameters used only as matmul operands (cast to the compute dtype by every use), or, for
# the embedding, gathered and then cast: a frozen copy may be stored in the compute dtype.
# Norm scales, the router and its bias are applied in fp32 and keep their dtype.
MATMUL_ONLY = ("embed_tokens", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
               "up_proj", "down_proj")

Flat = dict[str, Any]


def path_str(path) -> str:
  return "/".join(getattr(k, "key", str(k)) for k in path)


def flatten(tree) -> Flat:
  return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(flat: Flat) -> dict:
  out: dict = {}
  for key, x in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = x
  return out


@dataclasses.dataclass(frozen=True)
class LeafRule:
  """How one leaf splits: fully trainable, fully frozen, or by expert slots along `axis`."""
  trainable: bool
  slots: tuple[int, ...] | None = None  # trainable expert slots (None: the whole leaf)
  axis: int | None = None
  size: int | None = None  # number of experts on `axis`

  @property
  def frozen_slots(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.size) if i not in self.slots)


@dataclasses.dataclass(frozen=True)
class Partition:
  rules: tuple[tuple[str, LeafRule], ...]

  def rule(self, key: str) -> LeafRule:
    return dict(self.rules)[key]

  def split(self, params, compute_dtype=None) -> tuple[Flat, Flat]:
    """Full param tree -> (trainable, frozen) flat dicts; with `compute_dtype`, frozen
    MATMUL_ONLY leaves are cast to it (see the module docstring)."""
    flat = flatten(params)
    trainable, frozen = {}, {}
    for key, r in self.rules:
      x = flat[key]
      if r.slots is None:
        (trainable if r.trainable else frozen)[key] = x
      else:
        trainable[key] = jnp.take(x, jnp.asarray(r.slots), axis=r.axis)
        if r.frozen_slots:
          frozen[key] = jnp.take(x, jnp.asarray(r.frozen_slots), axis=r.axis)
      if key in frozen:
        frozen[key] = frozen[key].astype(self.frozen_dtype(key, frozen[key].dtype, compute_dtype))
    return trainable, frozen

  @staticmethod
  def frozen_dtype(key: str, dtype, compute_dtype=None):
    """The dtype a frozen leaf is held in on device."""
    if compute_dtype is not None and key.rsplit("/", 1)[-1] in MATMUL_ONLY:
      return jnp.dtype(compute_dtype)
    return jnp.dtype(dtype)

  def model_variables(self, trainable: Flat, frozen: Flat) -> dict:
    """(trainable, frozen) -> the variables the model is applied with: params, and each leaf
    split by expert slots as separate operands in the "expert_slots" collection."""
    params, slots = {}, {}
    for key, r in self.rules:
      if r.slots is None:
        params[key] = trainable[key] if r.trainable else frozen[key]
      elif not r.frozen_slots:
        params[key] = trainable[key]
      else:
        slots[key] = expert_slots.ExpertSlots((trainable[key], frozen[key]),
                                              (tuple(r.slots), r.frozen_slots), r.axis)
    variables = {"params": unflatten(params)}
    if slots:
      variables[expert_slots.COLLECTION] = unflatten(slots)
    return variables

  def merge(self, trainable: Flat, frozen: Flat) -> dict:
    """(trainable, frozen) -> the full nested param tree the model takes."""
    flat = {}
    for key, r in self.rules:
      if r.slots is None:
        flat[key] = trainable[key] if r.trainable else frozen[key]
      elif not r.frozen_slots:
        flat[key] = trainable[key]
      else:
        both = jnp.concatenate([trainable[key], frozen[key].astype(trainable[key].dtype)], axis=r.axis)
        order = list(r.slots) + list(r.frozen_slots)
        inverse = [order.index(i) for i in range(r.size)]
        flat[key] = jnp.take(both, jnp.asarray(inverse), axis=r.axis)
    return unflatten(flat)

  def trainable_keys(self) -> list[str]:
    return [k for k, r in self.rules if r.trainable]

  def describe(self) -> list[str]:
    lines = []
    for k, r in self.rules:
      if r.trainable:
        lines.append(k + ("" if r.slots is None else f" [experts {list(r.slots)}]"))
    return lines


def make_partition(abstract_params, logical_axes, patterns: Sequence[str],
                   trainable_experts: Sequence[int] | None = None) -> Partition:
  """Leaves whose path matches any regex in `patterns` (re.search) train.

  With `trainable_experts`, matched leaves that have an expert axis ('exp') train only those
  slots; the other slots are frozen.
  """
  if not patterns:
    raise ValueError("no trainable parameters: config.train.trainable is empty")
  compiled = [re.compile(p) for p in patterns]
  shapes = flatten(abstract_params)
  axes = {path_str(p): s for p, s in
          jax.tree_util.tree_leaves_with_path(logical_axes, is_leaf=lambda x: isinstance(x, P))}
  rules = []
  matched_any = set()
  for key, leaf in shapes.items():
    hits = [c.pattern for c in compiled if c.search(key)]
    matched_any.update(hits)
    if not hits:
      rules.append((key, LeafRule(False)))
      continue
    names = tuple(axes[key])
    if trainable_experts is not None and "exp" in names:
      ax = names.index("exp")
      size = leaf.shape[ax]
      slots = tuple(sorted(set(int(i) for i in trainable_experts)))
      bad = [i for i in slots if not 0 <= i < size]
      if bad:
        raise ValueError(f"trainable_experts {bad} out of range for {size} experts ({key})")
      rules.append((key, LeafRule(True, slots, ax, size)))
    else:
      rules.append((key, LeafRule(True)))
  unused = [p for p in patterns if p not in matched_any]
  if unused:
    raise ValueError(f"trainable patterns match no parameter: {unused}; "
                     f"parameters are {sorted(shapes)}")
  return Partition(tuple(rules))


def sliced_shape(shape, rule: LeafRule, trainable: bool):
  if rule.slots is None:
    return tuple(shape)
  shape = list(shape)
  shape[rule.axis] = len(rule.slots if trainable else rule.frozen_slots)
  return tuple(shape)
