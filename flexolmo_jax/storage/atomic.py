"""Publish outputs all at once, so an interrupted job never leaves something that looks done.

One directory stager and one file writer, used by every tool that writes a model directory, a
dataset, an HF folder or a report, on any `etils.epath` path (local or `gs://...`):

  * `staged_directory`: build in `.NAME.partial` next to the target, move it onto the target
    when the body succeeded, then write the seal file `SEAL` into it, last. The seal is what
    makes a directory complete: an object store has no atomic directory rename (epath's
    `rename` on gcsfs copies object by object, then deletes), so a reader may see a target that
    is still being copied, or one a killed copy left half-done. Readers call `require_sealed`
    (model_io, the dataset catalog, packed rows, stitch and export inputs) and refuse a
    directory without its seal, naming it. On a local filesystem the move is one atomic rename
    and the seal follows it at once. One code path for both.
    The partial name is fixed, so a killed run leaves one clearly named leftover that the next
    run removes. A lock keeps two runs on one target apart -- on this host only: it is an
    fcntl lock on a local file named after the target (object stores have no locks), so two
    hosts writing the same target are not kept apart (the last seal wins, both are complete).
  * `shared_cache_directory`: the variant for caches that several processes (hosts) may build
    at once: each builds in its own uniquely named partial directory and the first complete
    one wins (equal by construction, so a copy racing onto the same target is harmless).
  * `write_text_atomic`: one file, written to a temporary sibling and moved onto the path (an
    object appears whole on an object store; a local rename is atomic).

Storage sits below data: the error class is passed in (data tools raise `DataError`), never
imported from here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator

from etils import epath

from flexolmo_jax.storage.paths import as_path

SEAL = ".flexolmo-complete"  # written last into every published directory


class StagingError(ValueError):
  """Default error of the stager (callers pass their own class: StitchError, DataError...)."""


@dataclasses.dataclass
class Stage:
  """The directory being built. Behaves as its path (`stage / "params"`, `os.fspath(stage)`).

  payload: what gets moved onto the target; by default the stage itself, or a directory
  inside it (a tool that nests its output, e.g. tfds's NAME/VERSION, publishes that one).
  """
  root: epath.Path
  payload: os.PathLike | str | None = None

  def __fspath__(self) -> str:
    return os.fspath(self.root)

  def __truediv__(self, other) -> epath.Path:
    return self.root / other


def is_sealed(path) -> bool:
  return (as_path(path) / SEAL).exists()


def require_sealed(path, error=StagingError, what: str = "directory") -> None:
  """Refuse a directory that a writer has not finished publishing (no seal file)."""
  p = as_path(path)
  if not (p / SEAL).exists():
    raise error(f"{p} is an incomplete {what}: it has no {SEAL} seal (its writer was "
                f"interrupted or is still copying it); write it again with --overwrite (a directory "
                f"written before seals existed: create an empty {p / SEAL} once it is known "
                f"complete)")


def check_target(target, overwrite: bool, error=StagingError) -> None:
  """Fail before any work if the result could not be published."""
  target = as_path(target)
  if target.exists() and not overwrite:
    state = "" if is_sealed(target) else " (incomplete: no seal)"
    raise error(f"{target} already exists{state} (pass --overwrite to replace it)")


@contextlib.contextmanager
def _host_lock(target: epath.Path, error) -> Iterator[None]:
  """Best effort: an fcntl lock on a local file named after the target (see module doc)."""
  locks = epath.Path(tempfile.gettempdir()) / "flexolmo-locks"
  locks.mkdir(parents=True, exist_ok=True)
  lock_path = locks / (hashlib.sha256(os.fspath(target).encode()).hexdigest()[:24] + ".lock")
  with open(lock_path, "w") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      raise error(f"another process is writing {target} (lock {lock_path})") from e
    yield


def _seal(target: epath.Path) -> None:
  (target / SEAL).write_text(json.dumps({"published": time.time()}) + "\n")


@contextlib.contextmanager
def staged_directory(target, overwrite: bool = False, error=StagingError,
                     primary: bool = True) -> Iterator[Stage]:
  """Yield a Stage at `.NAME.partial` next to `target`; publish and seal it when the body
  succeeded.

  error: exception class raised for refusals (exists, locked, appeared meanwhile).
  primary: False on the non-primary processes of a multi-host save: they write into the same
  stage (orbax coordinates them) but leave locking, cleanup and publishing to the primary.
  """
  target = as_path(target)
  tmp = target.parent / f".{target.name}.partial"
  if not primary:
    yield Stage(tmp)
    return
  check_target(target, overwrite, error)
  with _host_lock(target, error):
    if tmp.exists():
      tmp.rmtree()  # left behind by an interrupted run
    tmp.mkdir(parents=True)
    stage = Stage(tmp)
    try:
      yield stage
      _publish(as_path(stage.payload or tmp), target, overwrite, error)
    finally:
      if tmp.exists():
        tmp.rmtree()


def _publish(src: epath.Path, target: epath.Path, overwrite: bool, error) -> None:
  old = None
  if target.exists():
    if not overwrite:
      raise error(f"{target} appeared while writing; not replacing it")
    old = target.parent / f".{target.name}.old"
    if old.exists():
      old.rmtree()
    (target / SEAL).unlink(missing_ok=True)  # from here on readers refuse it, never misread it
    target.rename(old)
  src.rename(target)
  _seal(target)
  if old is not None:
    old.rmtree()


@contextlib.contextmanager
def shared_cache_directory(target) -> Iterator[epath.Path | None]:
  """Yield a private partial directory to build `target` in, then publish it unless another
  process published first (then its copy is kept and ours discarded: both are complete and
  equal by construction). Yields None if `target` is already published: nothing to build."""
  target = as_path(target)
  if is_sealed(target):
    yield None
    return
  tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
  tmp.mkdir(parents=True)
  try:
    yield tmp
    try:
      tmp.rename(target)
    except OSError:
      if not target.exists():
        raise  # not a lost race: a real failure
    _seal(target)  # by the winner; a loser's seal is as true (the winner's copy is complete)
  finally:
    if tmp.exists():
      tmp.rmtree()


def write_text_atomic(path, text: str | bytes) -> epath.Path:
  """Write to a temporary sibling, then move it onto `path`: readers never see a partial file."""
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  data = text.encode() if isinstance(text, str) else text
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
  try:
    tmp.write_bytes(data)
    tmp.replace(path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return path
