"""Several stage commands of one party run one after another in one process (the experiments
suite's way to cut start-up costs: at its scales importing and tracing take longer than
the work itself).

  python -m flexolmo_jax.experiments.batch --jobs=JOBS.json

JOBS.json: a list of {"module": "flexolmo_jax.train", "args": ["--config=...", ...]}; each
runs as `python -m MODULE ARGS` would (the command's `main(args)`, which parses its flags
afresh every call: flexolmo_jax/cli.py). The suite batches only what one party may run
together: one owner's expert trainings (every variant of that owner: its own data only),
the coordinator's stitches. A job whose command fails stops the batch with its exit status;
the jobs before it keep their outputs, so a re-run resumes. After a SIGTERM (the suite
stopping; the running training saves where it is) no further job starts: exit 143.
"""
from __future__ import annotations

import importlib
import json
import pathlib
import signal
import time

from absl import flags

from flexolmo_jax import cli

FLAGS = flags.FlagValues()
_JOBS = flags.DEFINE_string("jobs", None, "JSON file: [{'module': M, 'args': [...]}, ...].",
                            flag_values=FLAGS)
flags.mark_flags_as_required(["jobs"], flag_values=FLAGS)


def _main(argv) -> int:
  del argv
  jobs = json.loads(pathlib.Path(_JOBS.value).read_text())
  mains = []
  for job in jobs:  # every module resolved before the first job runs
    module = job["module"]
    if not module.startswith("flexolmo_jax."):
      raise ValueError(f"batch runs flexolmo_jax commands only, not {module!r}")
    try:
      mod = importlib.import_module(module + ".__main__")
    except ModuleNotFoundError:
      mod = importlib.import_module(module)
    mains.append(mod.main)
  terminated = []
  signal.signal(signal.SIGTERM, lambda *_: terminated.append(True))  # trainers chain to it
  for job, main in zip(jobs, mains):
    if terminated:
      print("SIGTERM: no further job started", flush=True)
      raise SystemExit(143)
    t0 = time.time()
    print(f"$ python -m {job['module']} {' '.join(job['args'])}", flush=True)
    rc = main(list(job["args"]))
    if rc:
      raise SystemExit(rc)
    print(f"done in {time.time() - t0:.0f} s", flush=True)
  return 0


def main(argv=None) -> int:
  return cli.run(_main, FLAGS, argv, __doc__)


if __name__ == "__main__":
  main()
