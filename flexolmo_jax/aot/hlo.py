"""Facts read off a compiled (optimised, SPMD-partitioned) HLO module's text.

Collectives: each one's bytes moved per chip is estimated from its printed result shape and
its replica-group size n: all-gather out*(n-1)/n, reduce-scatter out*(n-1), all-reduce
2*size*(n-1)/n, all-to-all size*(n-1)/n, collective-permute size; ragged-all-to-all
size*(n-1)/n of its (static, worst-case) receive buffer, an upper bound: what it sends is
decided at run time. Loops are not unrolled here: the planner applies this to fully unrolled
2- and 3-layer programs and extrapolates.

Buffers: the largest materialised array (an instruction outside fused computations, not a
parameter, tuple or alias) shaped like attention scores [..., T, T] and like logits
[..., V / s] (V the vocabulary, s a shard count of the mesh). A heuristic attribution of
the compiled temporaries (XLA's memory analysis gives only their total): it names the
buffer that chunked attention and a chunked LM head remove, not how many are live at once.
"""
from __future__ import annotations

import math
import re

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "f8e4m3fn": 1,
                "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
         "collective-permute")
_LINE = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(KINDS)
                   + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z0-9]+)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[^\s(]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<shape>.+?)\s+(?P<op>[a-z\-]+)\(")
# An array and its layout; a layout's S(n), n > 0, puts it outside HBM (e.g. a prefetch copy).
_LAID_OUT = re.compile(r"\b([a-z0-9]+)\[([0-9,]*)\](\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_ATTENTION_SCOPES = ("self_attn", "attend", "attention")
_CALLS = re.compile(r"\bfusion\(.*?calls=%(?P<callee>[^\s,)]+)")
_ALIASES = ("parameter", "get-tuple-element", "bitcast", "tuple", "constant", "while",
            "conditional", "call")


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
  """Estimated bytes each chip sends, by collective kind (and 'total', their sum)."""
  out = {op: 0.0 for op in KINDS}
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
             "ragged-all-to-all": size * frac, "collective-permute": size}[op]
    out[op] += moved
  out["total"] = sum(out[op] for op in KINDS)
  return out


def _materialised(hlo_text: str):
  """(dtype, dims, op name) of every HBM array an instruction outside fused computations owns
  (each element of a multi-output fusion's tuple: a matmul fused with its reduction returns
  both)."""
  fused = set(_CALLS.findall(hlo_text))
  current = None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group("name")
      continue
    if current in fused:
      continue
    m = _INSTRUCTION.match(line)
    if not m or m.group("op") in _ALIASES:
      continue
    name = _OP_NAME.search(line)
    for dtype, dims, layout in _LAID_OUT.findall(m.group("shape")):
      space = _MEMORY_SPACE.search(layout or "")
      if dtype in _DTYPE_BYTES and not (space and int(space.group(1))):
        yield dtype, tuple(int(d) for d in dims.split(",") if d), name.group(1) if name else ""


def largest_buffers(hlo_text: str, seq_len: int, vocab_dims, d_model: int) -> dict[str, float]:
  """Bytes of the largest attention-score-shaped and logits-shaped buffers (module doc).

  vocab_dims: the per-chip sizes the vocabulary axis can have (V over each shard count the
  mesh allows), so that an unrelated last dimension that happens to divide V does not count.
  A logits block is [..., T, V / s] or a flattened [tokens, V / s]; a [d / s, V / s] array
  (a gathered head weight or its gradient) is not one. Scores are [..., T, T]; d_model and the
  op names (metadata) tell them from [..., T, d] activations when T == d_model.
  """
  vocab_dims = set(vocab_dims)
  scores = logits = 0.0
  for dtype, dims, op_name in _materialised(hlo_text):
    size = math.prod(dims) * _DTYPE_BYTES[dtype]
    if len(dims) >= 3 and dims[-1] == dims[-2] == seq_len:
      # With T == d_model a [.., T, d] activation (or the remat stack [L, B, T, d]) has the
      # same trailing dims: then only rank >= 4 arrays made inside the attention count.
      if seq_len != d_model or (len(dims) >= 4
                                and any(a in op_name for a in _ATTENTION_SCOPES)):
        scores = max(scores, size)
    if len(dims) >= 2 and dims[-1] in vocab_dims:
      leading = math.prod(dims[:-1])
      if (len(dims) >= 3 and seq_len in dims[:-1]) or d_model % leading:
        logits = max(logits, size)
  return {"attention_scores": scores, "logits": logits}
