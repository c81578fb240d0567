"""Training checkpoints with orbax CheckpointManager: async saves, keep-last-N, resume.

A checkpoint holds the *trainable* state (params, optimizer state, step) plus JSON metadata
(what the frozen part was built from, the data fingerprint). Frozen weights are rebuilt
from their source at start-up, bit for bit, so they are never written again: frozen is free.
Orbax only lists finalised steps, so a save killed half-way is never resumed from (on an object
store orbax marks a finalised step with its own commit file: the workdir may be gs://...). A finalised
step that later fails to restore (a truncated or corrupt file) is moved to checkpoints/damaged/
(orbax lists only step-numbered folders) and the next older step is used: see `restore_latest`.
"""
from __future__ import annotations

import logging
import signal
import threading

import jax
import orbax.checkpoint as ocp
from etils import epath

from flexolmo_jax.storage.paths import as_path


def make_manager(workdir, every: int, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=max(int(every), 1),
      enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(as_path(workdir) / "checkpoints", options=options,
                               item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict, force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
  """Restore `step` into the shardings/dtypes of `abstract_state` (ShapeDtypeStructs)."""
  out = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return out["state"], out["meta"]


DAMAGED_DIR = "damaged"  # under checkpoints/: not a step number, so orbax never lists it


class NoRestorableCheckpoint(RuntimeError):
  """Every checkpoint step failed to restore (the message names each step and its error)."""


def _short_error(e: Exception, n: int = 400) -> str:
  # orbax wraps tensorstore's error (which names the file and byte range) in an exception
  # whose text is a page of spec JSON: report the innermost cause.
  seen = []
  while e is not None and e not in seen and len(seen) < 10:
    seen.append(e)
    e = e.__cause__ or e.__context__
  root = seen[-1]
  text = " ".join(str(root).split()) or type(root).__name__
  return f"{type(root).__name__}: {text[:n]}"


def set_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path | None:
  """Move checkpoints/<step> to checkpoints/damaged/<step>-<n> (kept for inspection, never
  deleted) and make `manager` forget it. Only the primary process renames (shared storage)."""
  root = as_path(manager.directory)
  src = root / str(step)
  dest = None
  if jax.process_index() == 0 and src.exists():
    (root / DAMAGED_DIR).mkdir(parents=True, exist_ok=True)
    n = 1
    while (root / DAMAGED_DIR / f"{step}-{n}").exists():
      n += 1
    dest = root / DAMAGED_DIR / f"{step}-{n}"
    src.rename(dest)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"flexolmo_set_aside_{step}")
  manager.reload()
  return dest


def restore_latest(manager: ocp.CheckpointManager, abstract_state, check_meta=None):
  """Restore the newest step that restores; returns (step, state, meta) or None (no steps).

  A step whose restore raises is set aside (see `set_aside`) with a warning naming it and the
  error (which names the file), and the next older one is tried. When none restores nothing is
  moved (the failure may be ours, not the files') and NoRestorableCheckpoint names every step.
  `check_meta(step, meta)` runs on the restored metadata and may raise: a checkpoint of a
  different run is an error, not damage, so that is never caught here.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  failed = []
  for step in steps:
    try:
      state, meta = restore(manager, step, abstract_state)
    except Exception as e:  # tensorstore/orbax raise many types for truncated or corrupt files
      failed.append((step, _short_error(e)))
      logging.warning("checkpoint step %d in %s cannot be restored (%s); trying an older step",
                      step, manager.directory, failed[-1][1])
      continue
    if check_meta is not None:
      check_meta(step, meta)
    for bad, why in failed:
      dest = set_aside(manager, bad)
      logging.warning("checkpoint step %d set aside as %s (%s); resuming from step %d", bad,
                      dest or f"{manager.directory}/{DAMAGED_DIR}", why, step)
    return step, state, meta
  raise NoRestorableCheckpoint(
      f"no checkpoint in {manager.directory} can be restored: "
      + "; ".join(f"step {s}: {why}" for s, why in failed)
      + ". Move the damaged steps away (or use a new --workdir) to start again.")


def abstract_like(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class PreemptionFlag:
  """Set by SIGTERM (how TPU VMs announce maintenance/preemption); polled between steps."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def install(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self._event.set()
    # A handler installed before ours (e.g. experiments.batch, which must not start its next
    # job after a SIGTERM) hears it too; the default action (exit) is what we replace.
    if callable(self._previous):
      self._previous(signum, frame)

  def uninstall(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def __bool__(self):
    return self._event.is_set()


def preemption_agreed(flag: PreemptionFlag, manager: ocp.CheckpointManager, step: int,
                      every: int = 1) -> bool:
  """Whether every process stops (and saves) after `step`: the same answer on all of them.

  SIGTERM reaches one host of a multi-host job (or each at a different step), and a save is a
  collective: a host that saved and exited alone left the others hung in their next step. So
  in multi-process runs the local flags are all-gathered every `every` steps (a host sync, so
  not necessarily every step) and any one set stops all. orbax's `reached_preemption` (JAX's
  synchronised preemption point: maintenance notices through the coordination service) is
  agreed by construction and is honoured at every step.
  """
  reached = manager.reached_preemption(step)
  if jax.process_count() == 1:
    return reached or bool(flag)
  if reached:
    return True
  if step % max(int(every), 1):
    return False
  import numpy as np
  from jax.experimental import multihost_utils
  flags = multihost_utils.process_allgather(np.int32(bool(flag)))
  return bool(np.any(flags))


def restore_as_saved(manager: ocp.CheckpointManager, step: int):
  """Restore without a target (inspection, tools): arrays on the default device."""
  out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      meta=ocp.args.JsonRestore()))
  return out["state"], out["meta"]
