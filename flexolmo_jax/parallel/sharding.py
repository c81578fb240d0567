"""Named mesh (data, fsdp, expert, tensor) and logical-axis rules, MaxText style.

Parameters and activations carry logical axis names ('embed', 'mlp', 'exp', 'act_batch', ...);
the config's `axis_rules` map each to mesh axes. A rule whose mesh axes are already used by
another dimension of the same array is skipped, so later rules act as fallbacks.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical name -> mesh axes, in priority order.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_exp", "expert"),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("exp", "expert"),
    ("norm", None),
)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
  """Normalise rules from an ml_collections config (lists become tuples)."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for name, axes in rules:
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A 4-axis mesh; one axis may be -1 (all remaining devices)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = dict(shape or {})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError("at most one mesh axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  auto = (jax.sharding.AxisType.Auto,) * 4
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices > 1:  # multislice: the data axis spans slices (DCN), the rest stays inside one
    if sizes[0] % slices:
      raise ValueError(f"{slices} slices need mesh data axis a multiple of {slices} "
                       f"(got data={sizes[0]}); e.g. --config.mesh.data={slices}")
    from jax.experimental import mesh_utils
    ici = [sizes[0] // slices] + sizes[1:]
    grid = mesh_utils.create_hybrid_device_mesh(ici, [slices, 1, 1, 1], devices)
    return Mesh(grid, MESH_AXES, axis_types=auto)
  try:
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)
  except NotImplementedError:
    # A logical axis smaller than every physical one (e.g. tensor=2 on a v6e 8x8 slice):
    # split a physical ICI axis between two logical ones, which jax.make_mesh refuses.
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=auto)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drop mesh axes from dimensions they do not divide evenly (e.g. an odd vocabulary)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(mesh.shape[a] for a in names)
    if dim % size:
      logging.info("dimension %d not divisible by mesh axes %s (%d); replicating it", dim, names, size)
      out.append(None)
    else:
      out.append(axes)
  return P(*out)


def logical_shardings(logical_specs, shapes, mesh: Mesh, rules) -> Any:
  """Logical PartitionSpec tree + matching shapes tree -> NamedSharding tree."""
  def one(spec, shape):
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules)
    return NamedSharding(mesh, fit_spec(mesh_spec, getattr(shape, "shape", shape), mesh))
  return jax.tree.map(one, logical_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def param_shardings(cfg, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding for every parameter of a model config, from its logical axis names."""
  from flexolmo_jax.model.params import abstract_params, param_logical_axes  # avoid cycle
  return logical_shardings(param_logical_axes(cfg), abstract_params(cfg), mesh, rules)


def activation_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int],
                        rules=DEFAULT_RULES) -> NamedSharding:
  """NamedSharding of an input/output array from logical names, e.g. ('act_batch', 'act_length')."""
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)
  return NamedSharding(mesh, fit_spec(spec, shape, mesh))
