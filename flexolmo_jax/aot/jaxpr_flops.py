"""Matmul FLOPs of a traced step, from its jaxpr (before XLA: exact and topology-independent).

Counts every dot_general and ragged_dot_general (2 x output elements x contracted size; a
grouped matmul's weight gradient, ragged along the contraction, once per row, not per group),
multiplies scan bodies by their length, takes the larger branch of a cond and recurses into
every other sub-jaxpr (jit, remat, custom derivatives). The backward pass and rematerialised
forward passes are explicit in a traced train step, so they are counted; elementwise work is
not. Two constructs see only a piece of the work, so their bodies are scaled up:
  shard_map    the body is one shard's program: times the size of its manual mesh axes.
  pallas_call  the body is one grid step's kernel: the kernel's own cost estimate when it has
               one (megablox), else the body times the grid size. Blocks that a kernel skips
               at run time (splash attention's causally masked blocks) are counted, so for
               such kernels this is an upper bound (`pallas` in `matmul_flops_detail`).
A while loop's trip count is not known from the jaxpr (fori_loop with traced bounds, e.g. the
chunked attention's key loop): its body is counted once and the loop is reported in
`dynamic_loops`, so that a nonzero count means the total is a lower bound.
Per chip = total / chips when the partitioner splits the work evenly.
"""
from __future__ import annotations

import math


def _sub_jaxprs(value):
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _dot_flops(eqn, dimension_numbers) -> float:
  (lhs_contract, _), _ = dimension_numbers
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _ragged_dot_flops(eqn) -> float:
  """A grouped matmul. Ragged along a contracted dimension (the weight gradient, output
  [G, K, N]), each row meets one group only, not all G of the output: divide by G."""
  rdn = eqn.params["ragged_dot_dimension_numbers"]
  flops = _dot_flops(eqn, rdn.dot_dimension_numbers)
  (lhs_contract, _), _ = rdn.dot_dimension_numbers
  if any(d in lhs_contract for d in rdn.lhs_ragged_dimensions):
    flops /= eqn.invars[2].aval.shape[-1]
  return flops


def _manual_shards(params) -> int:
  """How many copies of a shard_map body run: the product of its manual axes' sizes."""
  mesh = params["mesh"]
  sizes = dict(mesh.shape)
  axes = params.get("newly_manual_axes", params.get("manual_axes"))
  if axes is None:  # older spelling: everything but the `auto` axes is manual
    axes = set(sizes) - set(params.get("auto", ()))
  return math.prod(sizes[a] for a in axes)


def _pallas(eqn) -> float:
  estimate = eqn.params.get("cost_estimate")
  if estimate is not None and getattr(estimate, "flops", 0):
    return float(estimate.flops)
  grid = eqn.params["grid_mapping"].grid
  return math.prod(int(g) for g in grid) * matmul_flops_detail(eqn.params["jaxpr"])["total"]


def matmul_flops_detail(jaxpr) -> dict[str, float]:
  """{'total': all matmul FLOPs, 'pallas': the part inside Pallas kernels, 'dynamic_loops':
  matmul-bearing while loops counted once (module doc)}."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = pallas = loops = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn, eqn.params["dimension_numbers"])
      continue
    if name == "ragged_dot_general":
      total += _ragged_dot_flops(eqn)
      continue
    if name == "pallas_call":
      f = _pallas(eqn)
      total, pallas = total + f, pallas + f
      continue
    if name == "cond":
      branches = [matmul_flops_detail(b) for b in _sub_jaxprs(eqn.params["branches"])]
      best = max(branches, key=lambda b: b["total"])
      total, pallas = total + best["total"], pallas + best["pallas"]
      loops += best["dynamic_loops"]
      continue
    mult = {"scan": lambda: eqn.params["length"],
            "shard_map": lambda: _manual_shards(eqn.params)}.get(name, lambda: 1)()
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        inner = matmul_flops_detail(sub)
        total += mult * inner["total"]
        pallas += mult * inner["pallas"]
        loops += mult * inner["dynamic_loops"]
        if name == "while" and inner["total"]:
          loops += mult
  return {"total": total, "pallas": pallas, "dynamic_loops": loops}


def matmul_flops(jaxpr) -> float:
  return matmul_flops_detail(jaxpr)["total"]
