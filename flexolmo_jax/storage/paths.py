"""Every path the tools accept is an `etils.epath.Path`: a local path or a URL (`gs://...`).

epath gives local files and object stores one API (open, exists, iterdir, glob, rename...), so
project code never looks at the scheme. The few helpers here cover what epath lacks:

  * `as_path`: `~` expanded and a relative local path made absolute. Not epath's `absolute()`,
    which joins the working directory in front of `gs://...`; a URL is already absolute
    (`is_absolute()` is true), so it is returned unchanged.
  * `kvstore_url`: the same location as a tensorstore kvstore URL (`file:///...`, `gs://...`).
  * `local_file` / `local_copy`: for the C++ writers and readers that only take a local file
    name (array_record's writer, safetensors' mmap): write a local temporary file and copy it to
    the destination with epath, or copy a source to a local temporary file. One code path for
    every destination; on a local filesystem it costs one extra copy of that file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from etils import epath


def as_path(path) -> epath.Path:
  p = epath.Path(path).expanduser()
  return p if p.is_absolute() else epath.Path.cwd() / p


def kvstore_url(path) -> str:
  """`path` (a directory) as a tensorstore kvstore URL, with the trailing slash of a prefix."""
  return as_path(path).as_uri().rstrip("/") + "/"


def size(path) -> int:
  return as_path(path).stat().length


def mtime(path) -> float:
  return as_path(path).stat().mtime


@contextlib.contextmanager
def local_file(dest, suffix: str = "") -> Iterator[str]:
  """A local temporary file name to write; copied onto `dest` when the body succeeds."""
  dest = as_path(dest)
  fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or ".tmp")
  os.close(fd)
  try:
    yield tmp
    epath.Path(tmp).copy(dest, overwrite=True)
  finally:
    with contextlib.suppress(OSError):
      os.unlink(tmp)


@contextlib.contextmanager
def local_copy(src) -> Iterator[str]:
  """A local temporary copy of the file `src` (for readers that need a local file name)."""
  src = as_path(src)
  with tempfile.TemporaryDirectory(prefix="flexolmo-copy-") as tmp:
    local = epath.Path(tmp) / src.name
    src.copy(local)
    yield os.fspath(local)


def copy_tree(src, dest) -> None:
  """Copy the files under directory `src` to `dest` (any epath locations; epath has no
  copytree). Empty directories are not copied: object stores have none."""
  src, dest = as_path(src), as_path(dest)
  for f in files_under(src):
    out = dest / os.fspath(f)[len(os.fspath(src)) + 1:]
    out.parent.mkdir(parents=True, exist_ok=True)
    f.copy(out, overwrite=True)


def files_under(directory) -> list[epath.Path]:
  """Every file below `directory`, sorted (epath refuses recursive `**` globs on gs://)."""
  out = []
  for p in sorted(as_path(directory).iterdir()):
    out.extend(files_under(p) if p.is_dir() else [p])
  return out
