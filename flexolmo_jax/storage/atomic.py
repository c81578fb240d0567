"""Publish outputs all at once, so an interrupted job never leaves something that looks done.

One directory stager and one file writer, used by every tool that writes a model directory, a
dataset, an HF folder or a report:

  * `staged_directory`: build in `.NAME.partial` next to the target (same filesystem, so the
    final rename is atomic), rename onto the target only when the body succeeded. The partial
    name is fixed, so a run killed with SIGKILL leaves one clearly named leftover that the next
    run removes; a lock file keeps two runs on one target apart.
  * `shared_cache_directory`: the variant for caches that several processes (hosts) may build
    at once on a shared filesystem, where a lock cannot be trusted: each builds in its own
    uniquely named partial directory and the first complete one wins.
  * `write_text_atomic`: one file, written to a temporary sibling and renamed.

Storage sits below data: the error class is passed in (data tools raise `DataError`), never
imported from here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator


class StagingError(ValueError):
  """Default error of the stager (callers pass their own class: StitchError, DataError...)."""


@dataclasses.dataclass
class Stage:
  """The directory being built. Behaves as its path (`stage / "params"`, `os.fspath(stage)`).

  payload: what gets renamed onto the target; by default the stage itself, or a directory
  inside it (a tool that nests its output, e.g. tfds's NAME/VERSION, publishes that one).
  """
  root: pathlib.Path
  payload: os.PathLike | str | None = None

  def __fspath__(self) -> str:
    return str(self.root)

  def __truediv__(self, other) -> pathlib.Path:
    return self.root / other


def check_target(target, overwrite: bool, error=StagingError) -> None:
  """Fail before any work if the result could not be published."""
  if os.path.exists(target) and not overwrite:
    raise error(f"{target} already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def staged_directory(target, overwrite: bool = False, error=StagingError,
                     primary: bool = True) -> Iterator[Stage]:
  """Yield a Stage at `.NAME.partial` next to `target`; publish it when the body succeeded.

  error: exception class raised for refusals (exists, locked, appeared meanwhile).
  primary: False on the non-primary processes of a multi-host save: they write into the same
  stage (orbax coordinates them) but leave locking, cleanup and the rename to the primary.
  """
  target = pathlib.Path(target).absolute()
  tmp = target.parent / f".{target.name}.partial"
  if not primary:
    yield Stage(tmp)
    return
  check_target(target, overwrite, error)
  target.parent.mkdir(parents=True, exist_ok=True)
  lock_path = target.parent / f".{target.name}.lock"
  with open(lock_path, "w") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      raise error(f"another process is writing {target} (lock {lock_path})") from e
    if tmp.exists():
      shutil.rmtree(tmp)  # left behind by an interrupted run
    tmp.mkdir()
    stage = Stage(tmp)
    try:
      yield stage
      _publish(pathlib.Path(stage.payload or tmp), target, overwrite, error)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
      with contextlib.suppress(OSError):
        lock_path.unlink()


def _publish(src: pathlib.Path, target: pathlib.Path, overwrite: bool, error) -> None:
  if not target.exists():
    os.replace(src, target)
    return
  if not overwrite:
    raise error(f"{target} appeared while writing; not replacing it")
  old = target.parent / f".{target.name}.old"
  shutil.rmtree(old, ignore_errors=True)
  os.replace(target, old)  # two renames: the target is missing for an instant, never partial
  os.replace(src, target)
  shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def shared_cache_directory(target) -> Iterator[pathlib.Path | None]:
  """Yield a private partial directory to build `target` in, then publish it unless another
  process published first (then its copy is kept and ours discarded: both are complete and
  equal by construction). Yields None if `target` already exists: nothing to build."""
  target = pathlib.Path(target)
  if target.exists():
    yield None
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
  try:
    yield tmp
    try:
      os.rename(tmp, target)
    except OSError:
      if not target.exists():
        raise  # not a lost race: a real failure
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path, text: str | bytes) -> pathlib.Path:
  """Write to a temporary sibling, then rename: readers never see a partial file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  data = text.encode() if isinstance(text, str) else text
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path
