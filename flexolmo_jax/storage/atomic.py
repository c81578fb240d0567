"""Publish directories all at once, so an interrupted job never leaves something that looks done.

Everything is built in a hidden sibling directory (``.NAME.partial-XXXX``, same filesystem, so
the final ``rename`` is atomic) and renamed onto the target only after the build succeeded. A
crash removes the partial directory; a SIGKILL may leave it behind, but it is clearly named and
nothing ever reads from it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import pathlib
import tempfile
from collections.abc import Iterator

from flexolmo_jax.data.errors import DataError


@dataclasses.dataclass
class Stage:
  root: str  # scratch directory; removed at the end
  payload: str  # what gets renamed onto the target (default: root itself)


def check_target(target: str, overwrite: bool) -> None:
  """Fail before any work if the result could not be published."""
  if os.path.exists(target) and not overwrite:
    raise DataError("already exists; pass --overwrite to replace it", location=target)


@contextlib.contextmanager
def staged_directory(target: str, overwrite: bool = False) -> Iterator[Stage]:
  target = os.path.abspath(target)
  check_target(target, overwrite)
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  root = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=parent)
  stage = Stage(root=root, payload=root)
  try:
    yield stage
    _publish(stage.payload, target, overwrite)
  finally:
    shutil.rmtree(root, ignore_errors=True)


def _publish(src: str, target: str, overwrite: bool) -> None:
  check_target(target, overwrite)  # someone may have published meanwhile
  old = None
  if os.path.exists(target):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-",
                dir=os.path.dirname(target))
    os.rename(target, os.path.join(old, "x"))
  os.rename(src, target)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


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
