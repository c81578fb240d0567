"""Several `flexolmo_jax.evaluate` runs in one process (the experiments suite's evaluation
stage): a suite evaluates tens of small models, and at its scales a process's start-up
(imports, compiling) costs more than the evaluation itself.

  python -m flexolmo_jax.experiments.eval_batch --jobs=JOBS.json

JOBS.json: a list of {"out": DIR, "options": {EvalOptions fields}} (`extraction`: a dict of
ExtractionOptions fields). Each job writes what
`python -m flexolmo_jax.evaluate` writes (DIR/results.json, results.md, routing.png) and is
skipped when DIR/results.json already holds that model at that top-k (see `done`).
Exit status: 0 done, 1 bad input (a job's model or data missing, unknown fields), 2 usage.
"""
from __future__ import annotations

import json
import pathlib

from absl import flags

from flexolmo_jax import cli

FLAGS = flags.FlagValues()
_JOBS = flags.DEFINE_string("jobs", None, "JSON file: [{'out': DIR, 'options': {...}}, ...].",
                            flag_values=FLAGS)
flags.mark_flags_as_required(["jobs"], flag_values=FLAGS)


def done(out, ckpt, top_k: int | None = None) -> bool:
  """OUT/results.json exists and is of this model (a training workdir's export/ counts) at
  this top-k (None: the model's own), so a changed plan re-evaluates."""
  results = pathlib.Path(out) / "results.json"
  if not results.exists():
    return False
  model = json.loads(results.read_text())["model"]
  ckpt = pathlib.Path(ckpt)
  return model["path"] in (str(ckpt), str(ckpt / "export")) and (
      top_k is None or model.get("top_k") == top_k)


def _main(argv) -> int:
  del argv
  import dataclasses
  from flexolmo_jax.evaluate.extraction import ExtractionOptions
  from flexolmo_jax.evaluate.report import write_all
  from flexolmo_jax.evaluate.run import EvalOptions, evaluate
  jobs = json.loads(pathlib.Path(_JOBS.value).read_text())
  fields = {f.name for f in dataclasses.fields(EvalOptions)}
  for job in jobs:  # check every job before the first runs
    unknown = set(job["options"]) - fields
    if unknown:
      raise ValueError(f"job {job['out']}: unknown evaluation options {sorted(unknown)}")
  for job in jobs:
    opts = dict(job["options"])
    if isinstance(opts.get("extraction"), dict):
      opts["extraction"] = ExtractionOptions(**opts["extraction"])
    if done(job["out"], opts["ckpt"], opts.get("top_k")):
      continue
    print(f"evaluating {opts['ckpt']} -> {job['out']}", flush=True)
    files = write_all(evaluate(EvalOptions(**opts)), job["out"])
    print("wrote " + ", ".join(files.values()), flush=True)
  return 0


def main(argv=None) -> int:
  return cli.run(_main, FLAGS, argv, __doc__)


if __name__ == "__main__":
  main()
