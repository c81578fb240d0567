"""Expert subsets to evaluate: all experts, one opted out at a time, the public expert alone.

Opting out is run-time masking (FLEXOLMO.md section 1.5): the excluded experts' router
logits are -inf for that example, which equals removing their FFN and router row.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from flexolmo_jax.model import ModelConfig, expert_mask
from flexolmo_jax.model.expert_mask import UnknownExpertError

ALL = "all experts"


@dataclasses.dataclass(frozen=True)
class Subset:
  name: str
  exclude: tuple[str, ...]  # expert names opted out
  explicit_mask: bool = True  # False: run without any mask (the model's default path)

  def mask(self, cfg: ModelConfig, batch: int) -> np.ndarray | None:
    if not cfg.is_moe or not self.explicit_mask:
      return None
    return expert_mask(cfg.names, list(self.exclude), batch)


def subsets_for(cfg: ModelConfig, exclude=(), opt_out_matrix: bool = False) -> list[Subset]:
  """The rows of the evaluation table.

  exclude: names opted out for the whole run (one row); opt_out_matrix: all experts, each
  non-public expert opted out in turn, and the public expert only. A run with neither is one
  row evaluated without a mask.
  """
  exclude = tuple(exclude)
  if exclude and opt_out_matrix:
    raise ValueError("pass either --exclude or --opt-out-matrix, not both")
  if not cfg.is_moe:
    if exclude:
      raise UnknownExpertError(f"this is a dense model (no experts); cannot exclude {list(exclude)}")
    return [Subset(ALL, (), explicit_mask=False)]
  names = cfg.names
  if exclude:
    expert_mask(names, list(exclude))  # unknown names / nothing left -> error now
    return [Subset(",".join(f"-{n}" for n in exclude), exclude)]
  if not opt_out_matrix:
    return [Subset(ALL, (), explicit_mask=False)]
  rows = [Subset(ALL, ())]
  rows += [Subset(f"-{n}", (n,)) for n in names[1:]]
  if len(names) > 2:  # with two experts "-expert" already is the public model
    rows.append(Subset(f"{names[0]} only", tuple(names[1:])))
  return rows
