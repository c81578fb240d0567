"""The one table of accelerator facts: the AOT planner's roofline and training's MFU read it.

TPU figures: FLEXOLMO.md section 7 and Google Cloud TPU docs; GPU figures: NVIDIA datasheets
(dense bf16, no sparsity). GB means 10^9 bytes. `ici_bw` is a TPU's total inter-chip
interconnect bandwidth (bytes/s), used for a rough collective-time estimate only.

`device_kinds` are the exact strings `jax.Device.device_kind` reports. They are matched
exactly, never by substring: "TPU v5" (a v5p) is a prefix of "TPU v5 lite" (a v5e, with
less than half the FLOP/s), so a substring match silently reports the wrong chip.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes: float
  hbm_bw: float  # bytes/s
  ici_bw: float | None  # bytes/s (TPUs only)
  device_kinds: tuple[str, ...] = ()


CHIPS = {
    "v5p": Chip("TPU v5p", 459e12, 95e9, 2.76e12, 600e9, ("TPU v5p", "TPU v5")),
    "v6e": Chip("TPU v6e", 918e12, 32e9, 1.64e12, 448e9, ("TPU v6e", "TPU v6 lite")),
    "v5e": Chip("TPU v5e", 197e12, 16e9, 0.82e12, 200e9, ("TPU v5e", "TPU v5 lite")),
    "v4": Chip("TPU v4", 275e12, 32e9, 1.2e12, 300e9, ("TPU v4",)),
    "h200": Chip("NVIDIA H200", 989e12, 141e9, 4.8e12, None, ("NVIDIA H200",)),
    "h100": Chip("NVIDIA H100 SXM", 989e12, 80e9, 3.35e12, None, ("NVIDIA H100 80GB HBM3",)),
    "h100-pcie": Chip("NVIDIA H100 PCIe", 756e12, 80e9, 2.0e12, None, ("NVIDIA H100 PCIe",)),
    "a100": Chip("NVIDIA A100", 312e12, 80e9, 2.0e12, None,
                 ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe",
                  "NVIDIA A100-PCIE-40GB")),
}
TPU_GENERATIONS = ("v5p", "v6e", "v5e", "v4")
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}


def chip_for(topology: str) -> Chip:
  """'v5p:4x4x4' -> the v5p chip."""
  kind = topology.split(":")[0].strip().lower()
  kind = ALIASES.get(kind, kind)
  if kind not in TPU_GENERATIONS:
    raise ValueError(f"unknown TPU generation {kind!r} in topology {topology!r}; "
                     f"known: {', '.join(sorted(TPU_GENERATIONS))} "
                     f"(e.g. v5p:4x4x4, v6e:4x4, v4:2x2x2)")
  return CHIPS[kind]


def chip_for_device(device_kind: str) -> Chip | None:
  """The chip whose `device_kinds` holds exactly this string; None if unknown."""
  for chip in CHIPS.values():
    if device_kind in chip.device_kinds:
      return chip
  return None


def peak_flops_for(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of a device kind (exact match), None if unknown (no MFU then)."""
  chip = chip_for_device(device_kind)
  return chip.peak_flops if chip else None
