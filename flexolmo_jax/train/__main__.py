"""Train a FlexOlmo stage from a config file.

  python -m flexolmo_jax.train --config=configs/flexmix_mini.py:public --workdir=/tmp/pub
  python -m flexolmo_jax.train --config=configs/flexmix_mini.py:expert --workdir=/tmp/math \
      --config.init.public=/tmp/pub/export --config.data.sources="[('DATA/math', 1.0)]" ...

Re-running the same command resumes from the latest complete checkpoint. Multi-host: on TPU
pods jax.distributed initialises itself (--distributed=auto); elsewhere pass
--coordinator_address, --num_processes and --process_id.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events, export.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (CPU/GPU).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")
_LOCAL_DEVICES = flags.DEFINE_integer("cpu_devices", None, "CPU devices per process (testing).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed.initialize(): auto = on TPU pods only.")


def init_distributed():
  from flexolmo_jax.parallel.distributed import init_distributed
  init_distributed(_COORD.value, _NPROC.value, _PID.value, _DISTRIBUTED.value,
                           _LOCAL_DEVICES.value)


def main(argv):
  del argv
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax/tfds INFO lines drown the progress bar
  init_distributed()
  from flexolmo_jax.train.trainer import TrainingError, train
  from flexolmo_jax.train.init import InitError
  from flexolmo_jax.data import DataError
  try:
    summary = train(_CONFIG.value, _WORKDIR.value)
  except (TrainingError, InitError, DataError, ValueError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"done: step {summary['step']}; export in {summary['workdir']}/export; "
        f"eval loss {summary['eval_loss']}")


if __name__ == "__main__":
  app.run(main)
