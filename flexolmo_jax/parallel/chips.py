"""TPU chip facts for the AOT planner (FLEXOLMO.md section 7; Google Cloud TPU docs).

GB means 10^9 bytes. `ici_bw` is the chip's total inter-chip interconnect bandwidth
(bytes/s); the planner uses it for a rough collective-time estimate only.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes: float
  hbm_bw: float  # bytes/s
  ici_bw: float  # bytes/s


CHIPS = {
    "v5p": Chip("TPU v5p", 459e12, 95e9, 2.76e12, 600e9),
    "v6e": Chip("TPU v6e", 918e12, 32e9, 1.64e12, 448e9),
    "v5e": Chip("TPU v5e", 197e12, 16e9, 0.82e12, 200e9),
    "v4": Chip("TPU v4", 275e12, 32e9, 1.2e12, 300e9),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}


def chip_for(topology: str) -> Chip:
  """'v5p:4x4x4' -> the v5p chip."""
  kind = topology.split(":")[0].strip().lower()
  kind = ALIASES.get(kind, kind)
  if kind not in CHIPS:
    raise ValueError(f"unknown TPU generation {kind!r} in topology {topology!r}; "
                     f"known: {', '.join(sorted(CHIPS))} (e.g. v5p:4x4x4, v6e:4x4, v4:2x2x2)")
  return CHIPS[kind]
