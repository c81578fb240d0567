"""Streaming safetensors files without torch (and without holding a shard in memory).

The format is 8 bytes (little-endian u64 header length N), N bytes of JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded with
spaces to a multiple of 8, then the raw little-endian tensor bytes. Knowing every shape up front,
the writer emits the header first and then each tensor's bytes as they are produced (in blocks
of rows if need be), so memory is one block, not one shard. The reader seeks to one tensor (or
a block of its rows) at a time and refuses truncated files before anything is read.
"""
from __future__ import annotations

import json
import math
import pathlib
import struct
from typing import Sequence

import ml_dtypes
import numpy as np

from flexolmo_jax.storage.param_store import write_all

DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
          "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
          "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
          "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}
CODES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
  pass


def dtype_code(dtype) -> str:
  dt = np.dtype(dtype)
  if dt not in CODES:
    raise SafetensorsError(f"dtype {dt} has no safetensors code")
  return CODES[dt]


class Reader:
  """One .safetensors file: header parsed at open, tensors read on demand."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    size = self.path.stat().st_size
    with open(self.path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise SafetensorsError(f"{self.path}: truncated (no header)")
      (n,) = struct.unpack("<Q", head)
      if n > size - 8:
        raise SafetensorsError(f"{self.path}: truncated or not safetensors (header length {n}, "
                               f"file size {size})")
      try:
        header = json.loads(f.read(n))
      except ValueError as e:
        raise SafetensorsError(f"{self.path}: unreadable header ({e})") from e
    self.data_start = 8 + n
    self.metadata = header.pop("__metadata__", {}) or {}
    self.entries = header
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if self.data_start + end > size:
      raise SafetensorsError(f"{self.path}: truncated: tensors need {self.data_start + end} "
                             f"bytes, the file has {size}")
    for k, e in header.items():
      if e["dtype"] not in DTYPES:
        raise SafetensorsError(f"{self.path}: tensor {k} has unsupported dtype {e['dtype']}")
      b, en = e["data_offsets"]
      if en - b != math.prod(e["shape"]) * DTYPES[e["dtype"]].itemsize:
        raise SafetensorsError(f"{self.path}: tensor {k}: byte range {b}..{en} does not match "
                               f"shape {e['shape']} {e['dtype']}")

  def keys(self) -> list[str]:
    return sorted(self.entries, key=lambda k: self.entries[k]["data_offsets"][0])

  def shape(self, key) -> tuple[int, ...]:
    return tuple(self.entries[key]["shape"])

  def dtype(self, key) -> np.dtype:
    return DTYPES[self.entries[key]["dtype"]]

  def read(self, key, rows: slice | None = None) -> np.ndarray:
    """The tensor, or rows [start:stop] of its first axis (a contiguous byte range)."""
    e = self.entries[key]
    shape, dt = list(e["shape"]), DTYPES[e["dtype"]]
    begin = self.data_start + e["data_offsets"][0]
    if rows is not None:
      row_bytes = dt.itemsize * math.prod(shape[1:])
      start, stop = rows.start or 0, shape[0] if rows.stop is None else min(rows.stop, shape[0])
      begin += start * row_bytes
      shape[0] = stop - start
    n = math.prod(shape) * dt.itemsize
    buf = np.empty(n, np.uint8)
    with open(self.path, "rb") as f:
      f.seek(begin)
      got = f.readinto(memoryview(buf))
    if got != n:
      raise SafetensorsError(f"{self.path}: truncated while reading {key}")
    return buf.view(dt).reshape(shape)


class Writer:
  """Writes one .safetensors file whose tensors (name, shape, dtype) are known up front.

  Call `write(name, block)` with each tensor's data in header order; a tensor may arrive in
  several blocks of rows. `close()` checks that every byte was written.
  """

  def __init__(self, path, entries: Sequence[tuple[str, Sequence[int], object]],
               metadata: dict[str, str] | None = None):
    self.path = pathlib.Path(path)
    header, offset = {}, 0
    self.order = []
    for name, shape, dtype in entries:
      n = math.prod(shape) * np.dtype(dtype).itemsize
      header[name] = {"dtype": dtype_code(dtype), "shape": [int(s) for s in shape],
                      "data_offsets": [offset, offset + n]}
      self.order.append((name, n, np.dtype(dtype)))
      offset += n
    self.total = offset
    meta = {"__metadata__": dict(metadata or {"format": "pt"})}
    blob = json.dumps({**meta, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    self._f = open(self.path, "wb", buffering=0)
    write_all(self._f, struct.pack("<Q", len(blob)) + blob)
    self._i, self._left = 0, self.order[0][1] if self.order else 0

  def write(self, name: str, block: np.ndarray) -> None:
    if self._i >= len(self.order):
      raise SafetensorsError(f"{self.path}: unexpected tensor {name} (all written)")
    want, left, dt = self.order[self._i][0], self._left, self.order[self._i][2]
    if name != want:
      raise SafetensorsError(f"{self.path}: got {name}, expected {want} next")
    block = np.ascontiguousarray(block)
    if block.dtype != dt:
      raise SafetensorsError(f"{self.path}: {name} has dtype {block.dtype}, header says {dt}")
    if block.nbytes > left:
      raise SafetensorsError(f"{self.path}: {name}: {block.nbytes} bytes, only {left} left")
    write_all(self._f, block.view(np.uint8).reshape(-1).data)  # small write() calls
    self._left -= block.nbytes
    if self._left == 0:
      self._i += 1
      if self._i < len(self.order):
        self._left = self.order[self._i][1]

  def close(self) -> None:
    done = self._i >= len(self.order)
    self._f.close()  # no fsync: atomicity comes from the directory rename, as for `cp`
    if not done:
      raise SafetensorsError(f"{self.path}: closed before {self.order[self._i][0]} was written")
