"""One measured anchor turns the planner's roofline step into an MFU estimate.

A roofline step (max of compute, HBM and ICI time) is a lower bound, and model FLOPs over it
is an upper bound on MFU: a ratio of two of our own counts that predicts nothing. Here it is
calibrated on one published measurement with one parameter, a step-time efficiency

  efficiency      = anchor's compute roofline / anchor's measured step  (same shapes)
  calibrated step = a plan's roofline step / efficiency
  calibrated MFU  = model FLOPs / (calibrated step x peak x chips)

The anchor: MaxText trains Mixtral-8x7B at 54.89% MFU, 251.94 TFLOP/s per chip, on v5p-128
(AI-Hypercomputer/maxtext end_to_end/tpu/mixtral/Run_Mixtral.md; per-device batch 12, seq
4096, FSDP, flash attention, megablox). MaxText counted attention without the causal halving
then (its PR #1988 came later): its v5p-256 (52.56% at 2,909 tokens/s per chip) and v6e-256
(35.23% at 3,899) Mixtral figures imply 82.93 GFLOP per token, exactly
`train_flops(mixtral, causal=False)` per token, so the measured step is 251.94 TFLOP/s over
that count: 3,038 tokens/s per chip, 16.18 s per step of 12 x 4096 tokens per chip.

The anchor's roofline is the compute term (executed matmul FLOPs / peak) of the planner's
plan of configs/mixtral_8x7b.py, a FLOP-equivalent of MaxText's program: full remat, capacity
1.0 with the gather dispatch (exactly k T / E rows per expert, as dropless, and no one-hot
einsums), attention as the exact full square (MaxText's flash with 2048 blocks computes 3/4 of
it). Its executed FLOPs are 1.38x the model's, 5.42e15 per chip per step: 11.81 s at peak;
MaxText's program, counted the same way, is about 108 GFLOP per token, 11.6 s. The compute
term and not the plan's whole roofline, because the plan's HBM and ICI terms describe OUR
program's partitioning (that gather dispatch all-reduces 17 TB per chip per step under FSDP)
and not MaxText's. So: efficiency = 11.81 / 16.18 = 0.730, MaxText's fraction of peak on its
own executed work.

What this is: an estimate calibrated on ONE anchor. It assumes every plan reaches the fraction
of its roofline that MaxText's Mixtral reached of its compute time, whatever the model, the
shapes, the bound and the chip. Context it does not capture: MaxText's Mixtral is 52.6% on
v5p-256 and 35.2% on v6e-256, so the same efficiency applied to v6e is likely optimistic.
Frozen weights: MFU counts them as trained (model/flops.py), so a stage that trains little
(router tuning) gets an estimate that exceeds what its executed work could show.
"""
from __future__ import annotations

from typing import Any

# MaxText's measurement (module doc).
ANCHOR = {
    "name": "MaxText Mixtral-8x7B training on v5p-128",
    "mfu": 0.5489,
    "tflops_per_chip": 251.94,
    "gflop_per_token": 82.934,  # train_flops(configs/mixtral_8x7b.py, causal=False) / token
    "tokens_per_s_per_chip": 251.94e12 / 82.934e9,  # 3,037.8
    "source": "AI-Hypercomputer/maxtext end_to_end/tpu/mixtral/Run_Mixtral.md",
    "flops_convention": "attention not halved for causality (MaxText before PR #1988)",
    "context": {"v5p-256": 0.5256, "v6e-256": 0.3523},
}

# The planner's plan of the anchor: benchmarks/aot_table.py's `mixtral_8x7b` row (its
# `before` variant: the xla attention's FLOP count is exact, a Pallas kernel's is a grid upper
# bound) re-creates it and prints a replacement for this block. The kernels change the count:
# re-run it when the attention, loss or MoE code changes.
PLANNER_ANCHOR = {
    "command": ("python -m flexolmo_jax.aot --config=configs/mixtral_8x7b.py "
                "--topology=v5p:4x4x8 --mode=train --per_device_batch=12"),
    "compute_step_s": 11.8132,  # 5.422e15 executed FLOPs per chip / 459 TFLOP/s
    "compute_tokens_per_s_per_chip": 4160.8,
    "executed_over_model": 1.384,
    "attention": "xla", "dispatch": "capacity 1.0, gather", "remat": "full",
    "commit": "0940bbd+uncommitted (this planner's changes)",
    "date": "2026-12-02",
}


def efficiency() -> float | None:
  """Anchor's measured tokens/s over its compute-roofline tokens/s (module doc)."""
  roof = PLANNER_ANCHOR["compute_tokens_per_s_per_chip"]
  return ANCHOR["tokens_per_s_per_chip"] / roof if roof else None


def efficiency_of(anchor_plan: dict[str, Any]) -> float:
  """The efficiency a fresh plan of the anchor implies (instead of the stored one)."""
  per_chip = anchor_plan["global_batch"] * anchor_plan["seq_len"] / anchor_plan["chips"]
  return ANCHOR["tokens_per_s_per_chip"] / (per_chip / anchor_plan["t_compute_s"])


def calibrate(result: dict[str, Any], eff: float | None = None) -> dict[str, Any]:
  """calibrated_step_s / calibrated_mfu for a plan with a roofline step (module doc)."""
  eff = efficiency() if eff is None else eff
  if not eff or not result.get("roofline_step_s"):
    return {"calibrated_step_s": None, "calibrated_mfu": None, "efficiency": eff}
  step = result["roofline_step_s"] / eff
  mfu = result["model_flops"] / (step * result["peak_flops"] * result["chips"])
  return {"calibrated_step_s": step, "calibrated_mfu": mfu, "efficiency": eff,
          "calibrated_tokens_per_s": result["global_batch"] * result["seq_len"] / step}


def anchor_block(plan: dict[str, Any], commit: str, date: str) -> str:
  """The PLANNER_ANCHOR block that the Mixtral anchor's `plan` implies (for pasting here)."""
  per_chip = plan["global_batch"] * plan["seq_len"] / plan["chips"]
  fields = {
      "command": PLANNER_ANCHOR["command"],
      "compute_step_s": round(plan["t_compute_s"], 4),
      "compute_tokens_per_s_per_chip": round(per_chip / plan["t_compute_s"], 1),
      "executed_over_model": round(plan["executed_over_model"], 3),
      "attention": plan["attention"], "dispatch": plan["dispatch"], "remat": plan["remat"],
      "commit": commit, "date": date,
  }
  body = "".join(f"    {k!r}: {v!r},\n" for k, v in fields.items())
  return "PLANNER_ANCHOR = {\n" + body + "}"
