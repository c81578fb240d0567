r"""Train a FlexOlmo stage from a config file.

  python -m flexolmo_jax.train --config=configs/flexmix_mini.py:public --workdir=/tmp/pub
  python -m flexolmo_jax.train --config=configs/flexmix_mini.py:expert --workdir=/tmp/math \
      --config.init.public=/tmp/pub/export --config.data.sources="[('DATA/math', 1.0)]" ...

Re-running the same command resumes from the latest complete checkpoint. Multi-host: on TPU
pods jax.distributed initialises itself (--distributed=auto); elsewhere pass
--coordinator_address, --num_processes and --process_id.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from flexolmo_jax import cli

FLAGS = flags.FlagValues()

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:arg]).",
                                          lock_config=True, flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events, export.", flag_values=FLAGS)
_DIST = cli.DistributedFlags(FLAGS)


def _main(argv):
  del argv
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax/tfds INFO lines drown the progress bar
  _DIST.init()
  from flexolmo_jax.train.trainer import TrainingError, train
  from flexolmo_jax.train.init import InitError
  from flexolmo_jax.data import DataError
  try:
    summary = train(_CONFIG.value, _WORKDIR.value)
  except (TrainingError, InitError, DataError, ValueError) as e:
    logging.error("%s", e)  # also in the log file; cli.run prints it and exits 1
    raise
  evaluated = (f"eval loss {summary['eval_loss']}" if summary["eval_loss"]
               else "no end-of-run evaluation")
  print(f"done: step {summary['step']}; export in {summary['workdir']}/export; {evaluated}")


def main(argv=None) -> int:
  return cli.run(_main, FLAGS, argv, __doc__)


if __name__ == "__main__":
  main()
