"""Timing helpers shared by the benchmark scripts (median of repeats, peak RSS)."""
from __future__ import annotations

import resource
import statistics
import time


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of fn() in seconds; fn must block until its result is ready."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
