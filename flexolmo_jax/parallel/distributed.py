"""Multi-host start-up shared by training, evaluation and generation."""
from __future__ import annotations

import os


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, mode: str = "auto",
                     cpu_devices: int | None = None) -> None:
  """Multi-host start-up, as in training: on TPU pods jax.distributed finds its peers itself."""
  import jax
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif mode == "on" or (mode == "auto" and "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")):
    jax.distributed.initialize()
