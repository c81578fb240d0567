"""TensorBoard event files (tensorboardX), a console progress bar (tqdm) and a metrics.jsonl
(one line per logged step, for plots and scripts), process 0 only.

The workdir may be any epath path (gs://...). Object stores cannot append, so metrics.jsonl
is rewritten whole at each logged step (atomically; the rows logged before a resume are read
back first): a few MB over a long run, written once per log interval. tensorboardX writes its
event file into a local temporary directory, copied to WORKDIR/tb after each flush (one code
path for every workdir; tensorboardX's own cloud writers need extra clients)."""
from __future__ import annotations

import json
import shutil
import tempfile
from typing import Any, Mapping

import jax
import numpy as np

from flexolmo_jax.storage.atomic import write_text_atomic
from flexolmo_jax.storage.paths import as_path, copy_tree


class MetricWriter:

  def __init__(self, workdir, total_steps: int, initial_step: int = 0, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._bar = None
    self._jsonl = as_path(workdir) / "metrics.jsonl"
    self._rows: list[str] = []
    if self.enabled:
      if self._jsonl.exists():  # a resumed run keeps what it logged before
        self._rows = [r + "\n" for r in self._jsonl.read_text().splitlines() if r.strip()]
      from tensorboardX import SummaryWriter
      from tqdm.auto import tqdm
      self._tb_local = tempfile.mkdtemp(prefix="flexolmo-tb-")
      self._tb_dest = as_path(workdir) / "tb"
      self._tb = SummaryWriter(self._tb_local)
      self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                       mininterval=1.0)

  def scalars(self, step: int, values: Mapping[str, Any]):
    if not self.enabled:
      return
    row = {k: float(np.asarray(v)) for k, v in values.items()}
    for k, v in row.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()
    self._sync_tb()
    self._rows.append(json.dumps({"step": int(step), **row}) + "\n")
    write_text_atomic(self._jsonl, "".join(self._rows))

  def progress(self, step: int, summary: Mapping[str, float]):
    if not self.enabled:
      return
    self._bar.n = step
    self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                           for k, v in summary.items()}, refresh=True)

  def message(self, text: str):
    if self.enabled:
      self._bar.write(text)

  def _sync_tb(self):
    copy_tree(self._tb_local, self._tb_dest)  # one small event file per run

  def close(self):
    if self.enabled:
      self._bar.close()
      self._tb.close()
      self._sync_tb()
      shutil.rmtree(self._tb_local, ignore_errors=True)  # local scratch, not a data path
