"""Collective traffic of a compiled (optimised, SPMD-partitioned) HLO module, from its text.

Each collective's bytes moved per chip is estimated from its printed result shape and its
replica-group size n: all-gather out*(n-1)/n, reduce-scatter out*(n-1), all-reduce
2*size*(n-1)/n, all-to-all size*(n-1)/n, collective-permute size. Loops are not unrolled
here: the planner applies this to fully unrolled 2- and 3-layer programs and extrapolates.
"""
from __future__ import annotations

import math
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "f8e4m3fn": 1,
                "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_OPS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_LINE = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(_OPS)
                   + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z0-9]+)\[([0-9,]*)\]")


def _array_bytes(shape_text: str) -> list[float]:
  out = []
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype in _DTYPE_BYTES:
      n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
      out.append(n * _DTYPE_BYTES[dtype])
  return out


def _group_size(line: str, default: int) -> int:
  m = re.search(r"replica_groups=\{\{([0-9,]+)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    sizes = dict((k.strip("' "), int(v)) for k, v in
                 (kv.split("=") for kv in m.group(1).split(",") if "=" in kv))
    axes = [a.strip("' ") for a in m.group(2).split(",") if a.strip()]
    return math.prod(sizes.get(a, 1) for a in axes) or default
  return default


def collective_bytes(hlo_text: str, num_devices: int) -> dict[str, float]:
  """Estimated bytes each chip sends, by collective kind (and 'total')."""
  out = {op: 0.0 for op in _OPS}
  for line in hlo_text.splitlines():
    m = _LINE.match(line)
    if not m:
      continue
    sizes = _array_bytes(m.group("shape"))
    if not sizes:
      continue
    op = m.group("op")
    # Async *-start results are tuples (operand, result, ...): the scattered result is the
    # smallest array of a reduce-scatter, the gathered one the largest of the others.
    size = min(sizes) if op == "reduce-scatter" else max(sizes)
    n = max(_group_size(line, num_devices), 1)
    frac = (n - 1) / n
    moved = {"all-gather": size * frac, "reduce-scatter": size * (n - 1),
             "all-reduce": 2 * size * frac, "all-to-all": size * frac,
             "collective-permute": size}[op]
    out[op] += moved
  out["total"] = sum(out[op] for op in _OPS)
  return out
