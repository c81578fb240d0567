"""Ahead-of-time planning: compile a real step for a TPU topology on a CPU host and report
per-chip memory, FLOPs and a roofline step time / MFU (see planner.py)."""
from flexolmo_jax.parallel.chips import CHIPS, Chip, chip_for
from flexolmo_jax.aot.planner import AotUnavailable, libtpu_installed, plan, report

__all__ = ["CHIPS", "Chip", "chip_for", "AotUnavailable", "libtpu_installed", "plan", "report"]
