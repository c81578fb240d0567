"""Training checkpoints with orbax CheckpointManager: async saves, keep-last-N, resume.

A checkpoint holds the *trainable* state (params, optimizer state, step) plus JSON metadata
(what the frozen part was built from, the data fingerprint). Frozen weights are rebuilt
from their source at start-up, bit for bit, so they are never written again: frozen is free.
Orbax only lists finalised steps, so a save killed half-way is never resumed from.
"""
from __future__ import annotations

import pathlib
import signal
import threading

import jax
import orbax.checkpoint as ocp


def make_manager(workdir, every: int, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=max(int(every), 1),
      enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints", options=options,
                               item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict, force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
  """Restore `step` into the shardings/dtypes of `abstract_state` (ShapeDtypeStructs)."""
  out = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return out["state"], out["meta"]


def abstract_like(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class PreemptionFlag:
  """Set by SIGTERM (how TPU VMs announce maintenance/preemption); polled between steps."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def install(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
    return self

  def uninstall(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def __bool__(self):
    return self._event.is_set()


def restore_as_saved(manager: ocp.CheckpointManager, step: int):
  """Restore without a target (inspection, tools): arrays on the default device."""
  out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                      meta=ocp.args.JsonRestore()))
  return out["state"], out["meta"]
