"""Ahead-of-time planning: compile a real step for a TPU topology on a CPU host and report
per-chip memory, executed and model FLOPs, collective bytes, a roofline step time and an MFU
estimate calibrated on one measured anchor (see planner.py, calibration.py)."""
from flexolmo_jax.parallel.chips import CHIPS, Chip, chip_for
from flexolmo_jax.aot.planner import AotUnavailable, libtpu_installed, plan, report

__all__ = ["CHIPS", "Chip", "chip_for", "AotUnavailable", "libtpu_installed", "plan", "report"]
