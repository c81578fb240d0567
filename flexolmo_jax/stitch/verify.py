"""Checks before and during stitching: names, configs, and bitwise equality of shared tensors.

FlexOlmo's merge is only sound if every expert was trained against the same frozen public
model: its shared tensors (embeddings, attention, norms, lm_head) and its public half (slot 0
FFN and router row) must be *bit-identical* to the public model's. Anything else means a
different public model or a tampered checkpoint, and the merged model would silently differ
from what each data owner trained. A declared tolerance (`--shared-tolerance=ATOL`, as the
reference merge's allclose 1e-3 for bf16 noise) relaxes that to max |difference| <= ATOL with
finite values; the public model's copy is the one written either way.
"""
from __future__ import annotations

import math
import re

import numpy as np

from flexolmo_jax.model.config import ModelConfig
from flexolmo_jax.storage.sources import Source


class StitchError(ValueError):
  """A refusal: the message names the tensor/file and the sources involved."""


NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
# Fields that change the maths of the shared part: they must agree across all sources.
SHARED_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "ffn_hidden", "rope_theta", "norm_eps", "param_dtype", "eos_token_id",
                 "pad_token_id", "bos_token_id")


def check_names(names, reserved=("public",)) -> None:
  seen = set()
  for n in names:
    if not NAME_RE.match(n):
      raise StitchError(f"expert name {n!r} is not allowed (letters, digits, _ . - only)")
    if n in reserved:
      raise StitchError(f"expert name {n!r} is reserved for slot 0 (the public expert)")
    if n in seen:
      raise StitchError(f"duplicate expert name {n!r}: every expert needs a unique name")
    seen.add(n)
  if not names:
    raise StitchError("no experts given (--expert=NAME=DIR)")


def _differs(a: ModelConfig, b: ModelConfig, fields) -> list[str]:
  return [f"{f} {getattr(a, f)!r} vs {getattr(b, f)!r}" for f in fields
          if getattr(a, f) != getattr(b, f)]


def check_configs(public: Source, experts: list[Source]) -> None:
  pc = public.cfg
  if pc.is_moe:
    raise StitchError(f"the public model {public.describe()} has {pc.num_experts} experts; it "
                      f"must be the dense public model (num_experts == 0)")
  for s in [public] + experts:
    if not s.cfg.scan_layers:
      raise StitchError(f"{s.describe()} uses unscanned layers (scan_layers=False); the "
                        f"stitcher reads the scanned layout that training writes")
  for s in experts:
    c = s.cfg
    if c.num_experts != 2:
      raise StitchError(f"expert {s.describe()} has {c.num_experts} experts; an expert "
                        f"checkpoint is the 2-expert model (public FFN + domain expert)")
    bad = _differs(c, pc, SHARED_FIELDS)
    if bad:
      raise StitchError(f"expert {s.describe()} is incompatible with the public model "
                        f"{public.describe()}: {'; '.join(bad)}")
  first = experts[0]
  for s in experts[1:]:
    bad = _differs(s.cfg, first.cfg, ("norm_topk_prob",))
    if bad:
      raise StitchError(f"experts {first.describe()} and {s.describe()} disagree: {'; '.join(bad)}")


def bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
  if a.shape != b.shape or a.dtype != b.dtype:
    return False
  # Compare bit patterns: NaN == NaN and 0.0 != -0.0, as "bit-identical" means.
  return a.tobytes() == b.tobytes()


_BLOCK = 1 << 22  # elements per step: a 64 MiB chunk costs a few 16 MiB temporaries, not 3x it


def max_abs_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, bool]:
  """(max |a - b|, all values of both finite) of same-shape, same-dtype arrays.

  Computed in float32 (float64 for float64 tensors): bf16/f16/f32 values are exact there, and
  a bf16 ulp is far above f32 rounding of the difference. 0.0 vs -0.0 differ by 0.
  """
  ct = np.float64 if a.dtype == np.float64 else np.float32
  x, y = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
  worst, finite = 0.0, True
  for i in range(0, x.size, _BLOCK):
    u, v = x[i:i + _BLOCK].astype(ct), y[i:i + _BLOCK].astype(ct)
    finite = finite and bool(np.isfinite(u).all() and np.isfinite(v).all())
    d = np.abs(u - v)
    worst = max(worst, float(d.max()) if np.isfinite(d).all() else math.inf)
  return worst, finite


def within_tolerance(a: np.ndarray, b: np.ndarray, atol: float) -> tuple[bool, float]:
  """(accepted, max |difference|): bitwise equal always passes (NaN included, as at atol 0);
  otherwise shape and dtype must agree, every value be finite and max |a - b| <= atol > 0."""
  if bitwise_equal(a, b):
    return True, 0.0
  if a.shape != b.shape or a.dtype != b.dtype:
    return False, math.nan
  worst, finite = max_abs_difference(a, b)
  return (atol > 0 and finite and worst <= atol), worst


def first_difference(a: np.ndarray, b: np.ndarray) -> str:
  if a.shape != b.shape:
    return f"shape {a.shape} vs {b.shape}"
  if a.dtype != b.dtype:
    return f"dtype {a.dtype} vs {b.dtype}"
  u = np.dtype(f"u{a.dtype.itemsize}")
  diff = np.argwhere(a.view(u) != b.view(u))
  if not len(diff):
    return "no difference"
  idx = tuple(int(i) for i in diff[0])
  return f"first at element {list(idx)}: {a[idx]!r} vs {b[idx]!r}; {len(diff)} elements differ"
