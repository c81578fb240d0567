"""Run-time expert opt-out: resolve expert names to the boolean [batch, E] mask the model takes."""
from __future__ import annotations

from typing import Sequence

import numpy as np


class UnknownExpertError(ValueError):
  pass


def _resolve(names: Sequence[str], exclude: Sequence[str]) -> np.ndarray:
  allowed = np.ones(len(names), bool)
  for name in exclude:
    if name not in names:
      raise UnknownExpertError(f"unknown expert name {name!r}; this model's experts are {list(names)}")
    allowed[list(names).index(name)] = False
  if not allowed.any():
    raise ValueError(f"excluding {list(exclude)} leaves no expert enabled")
  return allowed


def expert_mask(names: Sequence[str], exclude: Sequence[str] | Sequence[Sequence[str]] = (),
                batch: int | None = None) -> np.ndarray:
  """Boolean mask [batch, E], True where an expert may be used.

  exclude: names excluded for every example, or (per example) a list of such lists, one per
  batch row, so one batch can serve users with different data permissions.
  """
  names = list(names)
  if len(set(names)) != len(names):
    raise ValueError(f"duplicate expert names {names}")
  per_example = len(exclude) > 0 and not isinstance(exclude[0], str)
  if per_example:
    if batch is not None and batch != len(exclude):
      raise ValueError(f"{len(exclude)} per-example exclusion lists for batch {batch}")
    return np.stack([_resolve(names, ex) for ex in exclude])
  row = _resolve(names, list(exclude))
  return np.broadcast_to(row, (batch or 1, len(names))).copy()
