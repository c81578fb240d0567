"""Run one function over a list of work units, in this process or on an Apache Beam runner.

Data preparation and packing are both "map a unit function over shards, then combine small
summaries on the driver": every unit (a run of input files, a dataset shard) writes its own
output shard where it is read, and returns a JSON-sized summary. Nothing large crosses a
shuffle, so a runner never holds the corpus in memory (Beam's GroupByKey would, on the
DirectRunner), and the two executors give byte-identical shards because they run the same code.

    run = make_runner("direct", num_workers=2)       # or "in_process", or any Beam runner
    summaries = run.map(functools.partial(fn, ...), units, work_dir)

On Beam a unit's ``DataError`` comes back as a summary and is re-raised on the driver for the
first failing unit in unit order: the same error the in-process loop raises, whatever the runner.
``apache_beam`` is imported only here, only on the Beam path (``pip install .[beam]``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from etils import epath

from flexolmo_jax.data.errors import DataError

log = logging.getLogger(__name__)

IN_PROCESS = "in_process"
AUTO = "auto"
# Beam's own runner names, plus the short forms the CLI accepts.
_RUNNER_ALIASES = {"direct": "DirectRunner", "dataflow": "DataflowRunner",
                   "flink": "FlinkRunner", "spark": "SparkRunner"}


class InProcess:
  """Units one after the other in this process; the first DataError stops the run."""

  name = IN_PROCESS
  num_workers = 1

  def map(self, fn: Callable[[Any], dict], units: Sequence[Any], work_dir) -> list[dict]:
    del work_dir
    return [fn(unit) for unit in units]

  @contextlib.contextmanager
  def scratch(self, parent) -> Iterator[None]:
    del parent
    yield None


class BeamMap:
  """Units as elements of a Beam pipeline; summaries come back through ``work_dir`` files.

  ``work_dir`` must be visible to every worker (a local path for the DirectRunner, a shared
  file system or bucket elsewhere), like the output shards themselves.
  """

  def __init__(self, runner: str, num_workers: int, pipeline_options: Sequence[str] = ()):
    self.name = _RUNNER_ALIASES.get(runner, runner)
    self.num_workers = num_workers
    flags = [f"--runner={self.name}"]
    if self.name == "DirectRunner":
      # multi_processing: one Python process per worker, so tokenisation is not serialised
      # by the GIL.
      flags += [f"--direct_num_workers={num_workers}", "--direct_running_mode=multi_processing"]
    else:
      flags += [f"--num_workers={num_workers}"]
    self.flags = flags + list(pipeline_options)  # later flags win: the user's options last

  @contextlib.contextmanager
  def scratch(self, parent) -> Iterator[epath.Path]:
    """A hidden directory under ``parent`` for the units' summaries, removed afterwards."""
    parent = epath.Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f".beam-work-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    try:
      yield path
    finally:
      path.rmtree(missing_ok=True)

  def map(self, fn: Callable[[Any], dict], units: Sequence[Any], work_dir) -> list[dict]:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    results = epath.Path(work_dir)
    results.mkdir(parents=True, exist_ok=True)
    log.info("beam %s: %d units over %d workers", self.name, len(units), self.num_workers)
    with beam.Pipeline(options=PipelineOptions(flags=self.flags)) as pipeline:
      _ = (pipeline
           | "Units" >> beam.Create(list(enumerate(units)))
           # Without a reshuffle the runner may fuse every unit into one worker's bundle.
           | "Spread" >> beam.Reshuffle()
           | "Run" >> beam.Map(_run_unit, fn, os.fspath(results)))
    summaries = []
    for index in range(len(units)):
      path = results / f"unit-{index:06d}.json"
      if not path.exists():
        raise RuntimeError(f"beam finished without the summary of unit {index} ({path})")
      out = json.loads(path.read_text())
      if "error" in out:
        raise DataError(out["error"])
      summaries.append(out["summary"])
    return summaries


def _run_unit(indexed: tuple[int, Any], fn: Callable[[Any], dict], results_dir: str) -> None:
  index, unit = indexed
  try:
    out = {"summary": fn(unit)}
  except DataError as e:  # a user-fixable problem: reported on the driver, in unit order
    out = {"error": str(e)}
  path = epath.Path(results_dir) / f"unit-{index:06d}.json"
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(out))
  tmp.replace(path)  # a retried bundle rewrites it whole; the driver never reads a half file


def make_runner(runner: str = AUTO, num_workers: int | None = None,
                pipeline_options: str | Sequence[str] = (),
                input_bytes: int = 0, auto_threshold: int = 64 << 20):
  """``in_process``, ``direct`` (Beam DirectRunner), any Beam runner name, or ``auto``.

  ``auto``: in process for inputs under ``auto_threshold`` bytes (Beam's start-up costs more
  than the work), else the DirectRunner with ``num_workers`` (default: every CPU).
  ``pipeline_options``: extra Beam flags ("--project=... --region=..."), as one string or a list.
  """
  if isinstance(pipeline_options, str):
    pipeline_options = shlex.split(pipeline_options)
  if runner == AUTO:
    runner = IN_PROCESS if input_bytes < auto_threshold and not pipeline_options else "direct"
  if runner == IN_PROCESS:
    if pipeline_options:
      raise DataError("--beam_pipeline_options needs a Beam runner (--runner=direct, ...)")
    return InProcess()
  if num_workers is None:
    num_workers = os.cpu_count() or 1
  if num_workers < 1:
    raise DataError(f"--num_workers must be >= 1, got {num_workers}")
  try:
    import apache_beam  # noqa: F401  (fail now, with the fix, not inside the pipeline)
  except ImportError as e:
    raise DataError(f"--runner={runner} needs Apache Beam: pip install -e '.[beam]'") from e
  return BeamMap(runner, num_workers, pipeline_options)
