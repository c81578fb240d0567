"""Turn an owner's local files into a stream of documents, counting what had to be skipped.

Supported inputs: ``.jsonl``/``.ndjson`` (one JSON object per line, optionally ``.gz``/``.zst``),
``.txt`` (the whole file is one document, optionally ``.gz``/``.zst``) and ``.parquet`` (one
document per row). Problems that concern one record (a bad line) are counted skips, because
one bad line in a million should not stop a site's job; problems that make a whole file
untrustworthy (a truncated archive, a wrong parquet column, a missing path) are errors, because
silently training on part of a file is worse than stopping.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence

from etils import epath

from flexolmo_jax.data.errors import DataError
from flexolmo_jax.storage.paths import as_path, size

_LINE_FORMATS = (".jsonl", ".ndjson", ".txt")
_COMPRESSIONS = {".gz": "gz", ".zst": "zst"}
SUPPORTED_SUFFIXES = tuple(
    [*_LINE_FORMATS, ".parquet"]
    + [fmt + comp for fmt in _LINE_FORMATS for comp in _COMPRESSIONS]
)
MAX_SKIP_EXAMPLES = 20  # skip locations kept verbatim in the statistics
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class InputFile:
  path: str
  kind: str  # "jsonl" | "txt" | "parquet"
  compression: str | None  # None | "gz" | "zst"


@dataclasses.dataclass(frozen=True)
class Document:
  text: str
  location: str  # "path:line" or "path:row N": provenance, and where errors point


def classify(path: str) -> InputFile | None:
  """The reader for ``path`` from its name, or None if the name is not supported."""
  name = path.lower()
  compression = None
  for suffix, comp in _COMPRESSIONS.items():
    if name.endswith(suffix):
      compression, name = comp, name[: -len(suffix)]
  if name.endswith((".jsonl", ".ndjson")):
    return InputFile(path, "jsonl", compression)
  if name.endswith(".txt"):
    return InputFile(path, "txt", compression)
  if name.endswith(".parquet") and compression is None:
    return InputFile(path, "parquet", None)
  return None


def resolve_inputs(specs: Sequence[str]) -> list[InputFile]:
  """Expand paths, globs and directories; fail before any work if one of them is unusable."""
  if not specs:
    raise DataError("no --input given")
  seen: set[str] = set()
  files: list[InputFile] = []
  for spec in specs:
    spec = os.fspath(as_path(spec))  # any epath location: local, gs://...
    if glob.has_magic(spec):
      paths = sorted(os.fspath(p) for p in _glob(spec) if p.is_file())
      if not paths:
        raise DataError("pattern matched no files", location=spec)
      found = [classify(p) for p in paths]
      found = [f for f in found if f is not None]
      if not found:
        raise DataError(
            f"pattern matched no supported files ({', '.join(SUPPORTED_SUFFIXES)})",
            location=spec)
    elif not epath.Path(spec).exists():
      raise DataError("no such file or directory", location=spec)
    elif epath.Path(spec).is_dir():
      found = []
      for path in _walk_files(epath.Path(spec)):
        f = classify(os.fspath(path))
        if f is not None:
          found.append(f)
      if not found:
        raise DataError(
            f"directory contains no supported files ({', '.join(SUPPORTED_SUFFIXES)})",
            location=spec)
    else:
      f = classify(spec)
      if f is None:
        raise DataError(
            f"unsupported file type (expected one of {', '.join(SUPPORTED_SUFFIXES)})",
            location=spec)
      found = [f]
    for f in found:
      key = f.path  # absolute (as_path): the same file named twice must not be read twice
      if key not in seen:
        seen.add(key)
        try:
          epath.Path(f.path).open("rb").close()
        except OSError as e:
          raise DataError(f"file is not readable ({e})", location=f.path) from e
        files.append(f)
  return files


def _walk_files(directory: epath.Path) -> Iterator[epath.Path]:
  """Files below `directory`, in os.walk's top-down order with sorted names (deterministic).
  Not epath's walk(): on gs:// it yields bucket-relative directory names."""
  entries = sorted(directory.iterdir(), key=lambda p: p.name)
  subdirs = [e for e in entries if e.is_dir()]
  yield from (e for e in entries if e not in subdirs)
  for sub in subdirs:
    yield from _walk_files(sub)


def _glob(spec: str) -> list[epath.Path]:
  """epath globs relative to a directory: split the spec at its first wildcard component."""
  parts = spec.split("/")
  first = next(i for i, p in enumerate(parts) if glob.has_magic(p))
  base = epath.Path("/".join(parts[:first]) or "/")
  return list(base.glob("/".join(parts[first:])))


class SkipLog:
  """Counts skipped records by reason and keeps the first few locations for the report."""

  def __init__(self, strict: bool = False):
    self.strict = strict
    self.counts: collections.Counter[str] = collections.Counter()
    self.examples: list[dict[str, str]] = []

  def skip(self, reason: str, location: str, detail: str = "") -> None:
    if self.strict:
      raise DataError(f"{reason}{': ' + detail if detail else ''} (strict mode)",
                      location=location)
    self.counts[reason] += 1
    if len(self.examples) < MAX_SKIP_EXAMPLES:
      self.examples.append({"reason": reason, "location": location, "detail": detail})

  @property
  def total(self) -> int:
    return sum(self.counts.values())


# ---------------------------------------------------------------------------------------------
# Byte streams


class _StreamError(Exception):
  """A decompression failure, re-raised by the caller with the line number it reached."""


def _iter_zst_chunks(path: str) -> Iterator[bytes]:
  try:
    import zstandard
  except ImportError as e:  # optional dependency: say how to get it
    raise DataError("reading .zst needs the 'zstandard' package (pip install zstandard)",
                    location=path) from e
  dobj = zstandard.ZstdDecompressor().decompressobj()
  in_frame = False
  with epath.Path(path).open("rb") as fh:
    while raw := fh.read(_CHUNK):
      while raw:
        in_frame = True
        try:
          out = dobj.decompress(raw)
        except zstandard.ZstdError as e:
          raise _StreamError(e) from e
        if out:
          yield out
        raw = b""
        if dobj.eof:  # a file may hold several frames; each needs a fresh decoder
          raw = dobj.unused_data
          dobj = zstandard.ZstdDecompressor().decompressobj()
          in_frame = False
  # zstandard's streaming readers stop silently at a cut-off frame; refuse that here.
  if in_frame:
    raise _StreamError(EOFError("zstd stream ends inside a frame"))


def _iter_chunks(f: InputFile) -> Iterator[bytes]:
  if f.compression == "zst":
    yield from _iter_zst_chunks(f.path)
    return
  if f.compression is None:
    with epath.Path(f.path).open("rb") as fh:
      while chunk := fh.read(_CHUNK):
        yield chunk
    return
  with epath.Path(f.path).open("rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as fh:
    while True:
      try:
        chunk = fh.read(_CHUNK)
      except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise _StreamError(e) from e
      if not chunk:
        return
      yield chunk


def _iter_lines(f: InputFile) -> Iterator[bytes]:
  tail = b""
  for chunk in _iter_chunks(f):
    lines = (tail + chunk).split(b"\n")
    tail = lines.pop()
    yield from lines
  if tail:
    yield tail


def _stream_failed(f: InputFile, line: int, e: BaseException) -> DataError:
  cause = e.__cause__ or e
  return DataError(
      f"compressed stream is truncated or corrupt after line {line} "
      f"({type(cause).__name__}: {cause}); the file must be re-copied",
      location=f.path)


# ---------------------------------------------------------------------------------------------
# Formats


def _read_jsonl(f: InputFile, text_field: str, log: SkipLog) -> Iterator[Document]:
  lineno = 0
  nonblank = 0
  try:
    for raw in _iter_lines(f):
      lineno += 1
      loc = f"{f.path}:{lineno}"
      if not raw.strip():
        continue  # blank lines (e.g. a trailing newline) carry no record
      nonblank += 1
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        log.skip("invalid_utf8", loc, f"byte offset {e.start}")
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        log.skip("invalid_json", loc, e.msg)
        continue
      if not isinstance(obj, dict):
        log.skip("not_an_object", loc, type(obj).__name__)
        continue
      if text_field not in obj:
        log.skip("missing_text_field", loc, f"no field {text_field!r}")
        continue
      text = obj[text_field]
      if not isinstance(text, str):
        log.skip("text_not_a_string", loc, type(text).__name__)
        continue
      if not text.strip():
        log.skip("empty_text", loc)
        continue
      try:
        text.encode("utf-8")
      except UnicodeEncodeError as e:  # JSON may escape lone surrogates: "\ud800"
        log.skip("invalid_unicode", loc, f"character offset {e.start}")
        continue
      yield Document(text, loc)
  except _StreamError as e:
    raise _stream_failed(f, lineno, e) from e
  if nonblank == 0:
    log.skip("empty_file", f.path)


def _read_txt(f: InputFile, log: SkipLog) -> Iterator[Document]:
  chunks: list[bytes] = []
  try:
    for chunk in _iter_chunks(f):
      chunks.append(chunk)
  except _StreamError as e:
    raise _stream_failed(f, sum(c.count(b"\n") for c in chunks), e) from e
  data = b"".join(chunks)
  if not data.strip():
    log.skip("empty_file", f.path)
    return
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    log.skip("invalid_utf8", f"{f.path}:{line}", f"byte offset {e.start}; file skipped")
    return
  yield Document(text, f"{f.path}:1")


def _read_parquet(f: InputFile, text_field: str, log: SkipLog) -> Iterator[Document]:
  import pyarrow as pa
  import pyarrow.parquet as pq

  try:
    pf = pq.ParquetFile(epath.Path(f.path).open("rb"))  # a file object: any epath location
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"not a readable parquet file ({e})", location=f.path) from e
  schema = pf.schema_arrow
  if text_field not in schema.names:
    # A missing column is the same mistake on every row: stop instead of skipping them all.
    raise DataError(f"no column {text_field!r} (columns: {', '.join(schema.names)})",
                    location=f.path)
  col_type = schema.field(text_field).type
  if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)):
    raise DataError(f"column {text_field!r} has type {col_type}, expected string",
                    location=f.path)
  if pf.metadata.num_rows == 0:
    log.skip("empty_file", f.path)
    return
  row = 0
  try:
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
      for text in batch.column(0).to_pylist():
        row += 1
        loc = f"{f.path}:row {row}"
        if text is None:
          log.skip("missing_text_field", loc, "null")
        elif not text.strip():
          log.skip("empty_text", loc)
        else:
          yield Document(text, loc)
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"parquet read failed after row {row} ({e})", location=f.path) from e


def iter_documents(files: Iterable[InputFile], text_field: str,
                   log: SkipLog) -> Iterator[Document]:
  """All documents of ``files`` in order; skips go to ``log``; fatal problems raise."""
  for f in files:
    if size(f.path) == 0:
      log.skip("empty_file", f.path)
      continue
    if f.kind == "jsonl":
      yield from _read_jsonl(f, text_field, log)
    elif f.kind == "txt":
      yield from _read_txt(f, log)
    else:
      yield from _read_parquet(f, text_field, log)
