"""Matmul FLOPs of a traced step, from its jaxpr (before XLA: exact and topology-independent).

Counts every dot_general and ragged_dot_general (2 x output elements x contracted size),
multiplies scan bodies by their length, takes the larger branch of a cond and recurses into
every other sub-jaxpr (jit, remat, custom derivatives). The backward pass and rematerialised
forward passes are explicit in a traced train step, so they are counted; elementwise work is
not. Per chip = total / chips when the partitioner splits the work evenly.
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


def matmul_flops(jaxpr) -> float:
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn, eqn.params["dimension_numbers"])
    elif name == "ragged_dot_general":
      total += _dot_flops(eqn, eqn.params["ragged_dot_dimension_numbers"].dot_dimension_numbers)
    if name == "cond":
      total += max(matmul_flops(b) for b in _sub_jaxprs(eqn.params["branches"]))
      continue
    mult = eqn.params["length"] if name == "scan" else 1
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        total += mult * matmul_flops(sub)
  return total
