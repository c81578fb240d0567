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

The learned expert bias may train under another parametrisation than the value the model
applies (`bias_parametrization`): with "softplus" the trainable leaf is theta and the bias is
-softplus(theta), never positive and never without a gradient (the reference's min(b, 0)
stops learning wherever b > 0). `split` takes effective biases (<= 0, as every model
directory stores them) to theta, `model_variables` and `merge` give effective values back.
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

BIAS_LEAF = "router_bias"
BIAS_PARAMETRIZATIONS = ("min", "softplus")
# Effective biases closer to 0 than this map to theta = softplus^-1(this) (about -13.8).
_BIAS_FLOOR = 1e-6


def bias_to_theta(b):
  """Effective bias b <= 0 -> theta with -softplus(theta) == b (b >= 0 clipped to -1e-6)."""
  y = jnp.maximum(-b.astype(jnp.float32), _BIAS_FLOOR)
  return (y + jnp.log(-jnp.expm1(-y))).astype(b.dtype)  # log(expm1(y)), stable for large y


def theta_to_bias(theta):
  return (-jax.nn.softplus(theta.astype(jnp.float32))).astype(theta.dtype)


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
  bias_parametrization: str = "min"  # min (train b itself, applied as min(b, 0)) | softplus

  def _reparam(self, key: str) -> bool:
    return self.bias_parametrization == "softplus" and key.rsplit("/", 1)[-1] == BIAS_LEAF

  def _effective(self, key: str, x):
    """A trainable leaf as the model applies it: the bias as -softplus(theta) or min(b, 0)."""
    if key.rsplit("/", 1)[-1] != BIAS_LEAF:
      return x
    return theta_to_bias(x) if self._reparam(key) else jnp.minimum(x, 0)

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
      if key in trainable and self._reparam(key):
        trainable[key] = bias_to_theta(trainable[key])
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
    trainable = {k: self._effective(k, x) for k, x in trainable.items()}
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
    """(trainable, frozen) -> the full nested param tree the model takes (effective biases:
    what a model directory stores)."""
    flat = {}
    trainable = {k: self._effective(k, x) for k, x in trainable.items()}
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
      if key.rsplit("/", 1)[-1] == BIAS_LEAF:  # [..., E]: the public slot never has a bias
        flat[key] = flat[key].at[..., 0].set(0)
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
                   trainable_experts: Sequence[int] | None = None,
                   bias_parametrization: str = "min") -> Partition:
  """Leaves whose path matches any regex in `patterns` (re.search) train.

  With `trainable_experts`, matched leaves that have an expert axis ('exp') train only those
  slots; the other slots are frozen. `bias_parametrization`: see the module docstring.
  """
  if bias_parametrization not in BIAS_PARAMETRIZATIONS:
    raise ValueError(f"bias_parametrization {bias_parametrization!r} not in {BIAS_PARAMETRIZATIONS}")
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
  return Partition(tuple(rules), bias_parametrization)


def config_partition(config, cfg=None) -> Partition:
  """The partition a training config's step uses: `train.trainable`, `train.trainable_experts`
  and `train.bias_parametrization` over the params of `cfg` (default: the step's model,
  config_base.step_model_config). The trainer and the FLOP budget both take it from here."""
  from flexolmo_jax import config_base
  from flexolmo_jax.model import abstract_params, param_logical_axes
  cfg = config_base.step_model_config(config) if cfg is None else cfg
  tc = config.train
  experts = None if tc.trainable_experts is None else list(tc.trainable_experts)
  return make_partition(abstract_params(cfg), param_logical_axes(cfg), list(tc.trainable),
                        experts, tc.get("bias_parametrization", "min"))


def sliced_shape(shape, rule: LeafRule, trainable: bool):
  if rule.slots is None:
    return tuple(shape)
  shape = list(shape)
  shape[rule.axis] = len(rule.slots if trainable else rule.frozen_slots)
  return tuple(shape)
