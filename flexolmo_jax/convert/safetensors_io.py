"""safetensors files through the `safetensors` library (numpy side: never imports torch).

Reading streams: `safe_open(..., framework="numpy")` maps the file and `get_slice` copies out one
tensor, or one block of its rows, at a time. Writing is one HF shard at a time with
`safetensors.numpy.save_file`: memory is bounded by one shard (`--max-shard-size`).
Both take any epath path (gs://...): the library maps and writes local files only, so a shard
is written to a local temporary file and copied to its destination, and a shard is read from a
local temporary copy (storage.paths; on a local disk that is one extra copy per shard).
"""
from __future__ import annotations

import contextlib

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from flexolmo_jax.storage.paths import as_path, local_copy, local_file

DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
          "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
          "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
          "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}


class SafetensorsError(ValueError):
  pass


class Reader:
  """One .safetensors file, opened (and its header checked) up front, tensors read on demand."""

  def __init__(self, path):
    self.path = as_path(path)
    self._local = contextlib.ExitStack()  # the local copy lives as long as the reader
    try:
      self._f = safe_open(self._local.enter_context(local_copy(self.path)), framework="numpy")
    except Exception as e:  # the library checks the header covers the file exactly
      raise SafetensorsError(f"{self.path}: truncated or not a safetensors file ({e})") from e
    self._keys = list(self._f.keys())
    self._info = {}
    for k in self._keys:
      s = self._f.get_slice(k)
      code = s.get_dtype()
      if code not in DTYPES:
        raise SafetensorsError(f"{self.path}: tensor {k} has unsupported dtype {code}")
      self._info[k] = (tuple(int(n) for n in s.get_shape()), DTYPES[code])
    self.metadata = self._f.metadata() or {}

  def keys(self) -> list[str]:
    return list(self._keys)

  def shape(self, key) -> tuple[int, ...]:
    return self._info[key][0]

  def dtype(self, key) -> np.dtype:
    return self._info[key][1]

  def read(self, key, rows: slice | None = None) -> np.ndarray:
    """The tensor, or rows [start:stop] of its first axis (only those bytes are copied)."""
    try:
      s = self._f.get_slice(key)
      arr = s[:] if rows is None else s[rows]
    except Exception as e:
      raise SafetensorsError(f"{self.path}: cannot read {key} ({e})") from e
    return np.asarray(arr).view(self._info[key][1])


def save_shard(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
  """Write one shard file (tensors in insertion order of `tensors`; transformers' metadata)."""
  # save_file writes from each array's own memory (safetensors >= 0.8): nothing is copied.
  with local_file(path, suffix=".safetensors") as tmp:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
              metadata=dict(metadata or {"format": "pt"}))
