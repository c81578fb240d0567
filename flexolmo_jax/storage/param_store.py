"""Tensor-at-a-time access to a model directory's params, for tools that must not hold a model.

The stitcher and the converters move 37B-parameter models on hosts that cannot hold one, so they
never restore a whole tree: `ParamReader` opens one array of DIR/params with tensorstore and
reads index slices of it; `ParamWriter` has orbax save a tree of lazy `StreamedArray` leaves and,
from inside that save, fills each array piece by piece. So every model directory is a genuine
orbax checkpoint however it was made (training export, stitch, prune, import): plain
`ocp.PyTreeCheckpointer().restore(DIR/params)` (numpy leaves) and
`ocp.StandardCheckpointer().restore(DIR/params, abstract_tree)` both work.

  * reading: orbax OCDBT (the default save) or plain per-array zarr directories;
  * writing: orbax's own per-array zarr v2 layout (no OCDBT), *uncompressed*, one file per
    chunk, so a truncated chunk file is caught on read (zarr checks the byte count).

Chunks are one layer (and one expert) of a tensor, split further to at most CHUNK_BYTES by
orbax's rule for `SaveArgs(chunk_byte_size, shard_axes)` (asked through the public spec
builder, see `chunk_shape`); `layer_chunking` gives `save_model_dir` the same SaveArgs, so
training exports stream too, and their stored chunks line up with the stitcher's output chunks.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import threading
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from flexolmo_jax.storage.paths import as_path, files_under, kvstore_url

PARAMS_DIR = "params"  # same as model_io.PARAMS_DIR (kept here to avoid importing model_io)
CHUNK_BYTES = 64 << 20  # upper bound of one stored chunk / one streamed piece
_METADATA = "_METADATA"  # orbax's tree metadata file (read here, written by orbax only)

Path = tuple  # a param path, e.g. ("decoder", "layers", "mlp", "gate_proj")
EXPERT_LEAVES = ("gate_proj", "up_proj", "down_proj", "router", "router_bias")


class StoreError(ValueError):
  """A params directory is missing, unreadable or corrupt (names the file and tensor)."""


def leaf_name(path: Path) -> str:
  return ".".join(path)


def lead_axes(path: Path, moe: bool) -> int:
  """How many leading axes index a layer / an expert: those are chunked one index at a time."""
  n = 0
  if len(path) > 1 and path[0] == "decoder" and path[1] == "layers":
    n += 1  # scanned layers are stacked on axis 0
  if moe and len(path) > 1 and path[-2] == "mlp" and path[-1] in EXPERT_LEAVES:
    n += 1  # experts stacked on the next axis
  return n


def chunk_shape(path: Path, shape, itemsize: int, moe: bool,
                chunk_bytes: int = CHUNK_BYTES) -> tuple[int, ...]:
  """One layer (and expert) per chunk, then split to at most chunk_bytes.

  This is the chunk shape orbax writes for `save_args(path, ...)`: asked from orbax's public
  spec builder rather than re-derived, so a model directory written by training and one
  written here have the same chunk grid whatever orbax version is installed, and the
  stitcher can compare stored chunks without decoding them. orbax splits the largest axis
  first (into divisors): the vocabulary axis of embed_tokens [V, d] and lm_head [d, V], i.e.
  blocks of rows of the HF tensors, which the converters stream.
  """
  shape = tuple(int(s) for s in shape)
  if not shape:
    return ()
  n = min(lead_axes(path, moe), len(shape))
  return _orbax_chunks(leaf_name(path), shape, itemsize, n, chunk_bytes)


_SPEC_CONTEXT = ts.Context()


@functools.lru_cache(maxsize=4096)
def _orbax_chunks(name: str, shape: tuple[int, ...], itemsize: int, n_lead: int,
                  chunk_bytes: int) -> tuple[int, ...]:
  arg = ocp.SaveArgs(chunk_byte_size=chunk_bytes, shard_axes=tuple(range(n_lead)))
  info = ocp.type_handlers.ParamInfo(name=name, parent_dir=epath.Path("/nonexistent"),
                                     is_ocdbt_checkpoint=False, use_compression=False,
                                     ts_context=_SPEC_CONTEXT)  # never opened: only a spec
  spec = _write_spec(info, shape, np.dtype(f"u{itemsize}") if itemsize in (1, 2, 4, 8)
                     else np.dtype(("V", itemsize)), arg)  # only the itemsize matters
  return tuple(int(c) for c in spec["metadata"]["chunks"])


def _write_spec(info, shape, dtype, arg) -> dict[str, Any]:
  """The tensorstore spec orbax's NumpyHandler would create this array with (no OCDBT)."""
  return ocp.type_handlers.get_json_tspec_write(
      info, use_ocdbt=False, global_shape=tuple(shape), local_shape=tuple(shape),
      dtype=np.dtype(dtype), arg=arg)


def save_args(path: Path, ndim: int, moe: bool, chunk_bytes: int = CHUNK_BYTES):
  """orbax SaveArgs of one leaf: its layer (and expert) axes are storage-sharded one by one."""
  n = min(lead_axes(path, moe), ndim)
  return ocp.SaveArgs(chunk_byte_size=chunk_bytes, shard_axes=tuple(range(n)))


def chunk_grid(shape, chunks) -> Iterator[tuple[slice, ...]]:
  """Index tuples (slices) of every chunk, in C order of the chunk grid."""
  ranges = [range(0, max(int(s), 1), int(c)) for s, c in zip(shape, chunks)]
  if not ranges:
    yield ()
    return
  for starts in np.ndindex(*[len(r) for r in ranges]):
    yield tuple(slice(r[i], min(r[i] + c, s)) for r, i, c, s in zip(ranges, starts, chunks, shape))


def layer_chunking(cfg, tree):
  """orbax SaveArgs giving `save_model_dir` the per-layer/per-expert chunks described above."""
  import jax

  def args(path, leaf):
    keys = tuple(getattr(k, "key", str(k)) for k in path)
    return save_args(keys, len(getattr(leaf, "shape", ())), cfg.is_moe)

  return jax.tree_util.tree_map_with_path(args, tree)


# --- reading ---------------------------------------------------------------------------------

def _params_root(model_dir) -> epath.Path:
  return as_path(model_dir) / PARAMS_DIR


class ParamReader:
  """Reads slices of the arrays of MODEL_DIR/params without restoring the tree.

  A chunk is decoded whole; when a stored chunk spans more than one streamed piece (one layer
  [x one expert], at most CHUNK_BYTES) -- checkpoints written with orbax's defaults store each
  array as a single chunk -- the array gets a cache of one chunk so it is decoded once, not
  once per piece (host memory is then one such chunk). Call `release` when done with an array.
  """

  def __init__(self, model_dir, label: str | None = None, moe: bool = False):
    self.moe = moe  # experts stacked on axis 1 of the mlp tensors (sets the streamed piece)
    self.model_dir = as_path(model_dir)
    self.label = label or str(self.model_dir)
    self.root = _params_root(model_dir)
    meta_file = self.root / _METADATA
    if not meta_file.is_file():
      raise StoreError(f"{self.label}: {meta_file} is missing (not a params checkpoint written "
                       f"by orbax or this project, or an incomplete copy)")
    try:
      meta = json.loads(meta_file.read_text())
    except ValueError as e:
      raise StoreError(f"{self.label}: {meta_file} is not valid JSON ({e})") from e
    self.use_ocdbt = bool(meta.get("use_ocdbt", (self.root / "manifest.ocdbt").exists()))
    self.use_zarr3 = bool(meta.get("use_zarr3", False))
    self.paths = [tuple(k["key"] for k in v["key_metadata"])
                  for v in meta.get("tree_metadata", {}).values()]
    self._arrays: dict[Path, ts.TensorStore] = {}
    self._lock = threading.Lock()  # worker threads open arrays lazily
    self._zmeta: dict[Path, dict] = {}
    self._kvstore = None

  def _spec(self, path: Path) -> dict[str, Any]:
    name = leaf_name(path)
    if self.use_ocdbt:
      # kvstores as URLs (file:///... or gs://...): tensorstore picks the driver
      kv = {"driver": "ocdbt", "base": kvstore_url(self.root), "path": name}
    else:
      kv = kvstore_url(self.root / name)
    return {"driver": "zarr3" if self.use_zarr3 else "zarr", "kvstore": kv,
            "recheck_cached_data": False, "recheck_cached_metadata": False}

  def has(self, path: Path) -> bool:
    return tuple(path) in self.paths

  def array(self, path: Path) -> ts.TensorStore:
    path = tuple(path)
    with self._lock:
      return self._open(path)

  def _open(self, path: Path) -> ts.TensorStore:
    if path not in self._arrays:
      if path not in self.paths:
        raise StoreError(f"{self.label}: no tensor {leaf_name(path)} in {self.root}")
      try:
        arr = ts.open(self._spec(path), read=True).result()
        chunk = tuple(arr.chunk_layout.read_chunk.shape)
        piece = chunk_shape(path, arr.shape, arr.dtype.numpy_dtype.itemsize, self.moe)
        if any(c > p for c, p in zip(chunk, piece)):
          nbytes = math.prod(chunk) * arr.dtype.numpy_dtype.itemsize
          ctx = ts.Context({"cache_pool": {"total_bytes_limit": nbytes + (1 << 20)}})
          arr = ts.open(self._spec(path), read=True, context=ctx).result()
      except Exception as e:  # tensorstore raises ValueError for missing/corrupt metadata
        raise StoreError(f"{self.label}: cannot open tensor {leaf_name(path)} in {self.root}: "
                         f"{_short(e)}") from e
      self._arrays[path] = arr
    return self._arrays[path]

  def shape_dtype(self, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    arr = self.array(path)
    return tuple(arr.shape), arr.dtype.numpy_dtype

  def read(self, path: Path, index=()) -> np.ndarray:
    try:
      return np.asarray(self.array(path)[index].read().result())
    except StoreError:
      raise
    except Exception as e:  # truncated / corrupt chunk files surface here
      raise StoreError(f"{self.label}: cannot read tensor {leaf_name(path)}"
                       f"{describe_index(index)} from {self.root} (truncated or corrupt file?): "
                       f"{_short(e)}") from e

  def release(self, path: Path) -> None:
    with self._lock:
      self._arrays.pop(tuple(path), None)
      self._zmeta.pop(tuple(path), None)

  # Stored chunks: identical stored bytes under an identical codec mean identical values, so
  # the stitcher verifies shared tensors without decoding (and only decodes on a mismatch).

  def _kv(self) -> ts.KvStore:
    if self._kvstore is None:
      base = kvstore_url(self.root)
      self._kvstore = ts.KvStore.open(
          {"driver": "ocdbt", "base": base} if self.use_ocdbt else base).result()
    return self._kvstore

  def raw_chunk(self, path: Path, index) -> tuple[str, bytes] | None:
    """(codec description, stored bytes) of the one whole chunk that `index` selects exactly,
    or None (zarr3, a region that is not one whole chunk, unreadable)."""
    if self.use_zarr3:
      return None
    path = tuple(path)
    try:
      with self._lock:
        if path not in self._zmeta:
          self._zmeta[path] = self._open(path).spec().to_json()["metadata"]
      meta = self._zmeta[path]
      shape, chunks = meta["shape"], meta["chunks"]
      index = tuple(index) + (slice(None),) * (len(shape) - len(index))
      cell = []
      for i, n, c in zip(index, shape, chunks):
        start, stop = (i, i + 1) if isinstance(i, int) else (i.start or 0, n if i.stop is None else i.stop)
        if start % c or stop - start != c or stop > n:
          return None
        cell.append(str(start // c))
      key = f"{leaf_name(path)}/{meta.get('dimension_separator', '.').join(cell) or '0'}"
      codec = json.dumps([meta.get(k) for k in ("compressor", "filters", "dtype", "order")]
                         + [math.prod(chunks)])
      value = self._kv().read(key).result()
      if value.state != "value":
        return None
      return codec, bytes(value.value)
    except Exception:  # any doubt: the caller decodes and compares values instead
      return None


def content_digest(model_dir, moe: bool = False) -> dict[str, str]:
  """sha256 of every tensor's values (raw little-endian bytes), streamed one piece at a time.

  A stitched model's manifest.json already holds them (per shared tensor, and per expert slot
  as 'name[:, slot]'): those are used as they are, so a 37B model is not read again. Otherwise
  each tensor is read in its streamed pieces (`chunk_shape`: a function of the shape alone, so
  re-saving the same values with other chunks gives the same digest), pieces in C order.
  """
  root = as_path(model_dir)
  manifest = root / "manifest.json"
  if manifest.is_file():
    man = json.loads(manifest.read_text())
    out = dict(man.get("shared_sha256", {}))
    for rec in man.get("experts", []):
      for name, h in rec.get("sha256", {}).items():
        out[f"{name}[:, {rec['slot']}]"] = h
    if out:
      return dict(sorted(out.items()))
  reader = ParamReader(root, moe=moe)
  out = {}
  for path in sorted(reader.paths):
    shape, dtype = reader.shape_dtype(path)
    h = hashlib.sha256()
    for index in chunk_grid(shape, chunk_shape(path, shape, dtype.itemsize, moe)):
      h.update(np.ascontiguousarray(reader.read(path, index)).view(np.uint8).reshape(-1).data)
    reader.release(path)
    out[leaf_name(path)] = h.hexdigest()
  return out


def first_digest_difference(saved: dict[str, str], now: dict[str, str]) -> str | None:
  """The first tensor (sorted by name) whose digest differs, is missing or is new; or None."""
  for name in sorted(set(saved) | set(now)):
    if saved.get(name) != now.get(name):
      return name
  return None


def describe_index(index) -> str:
  if not index:
    return ""
  parts = []
  for i in index:
    if isinstance(i, slice):
      parts.append(f"{i.start}:{i.stop}")
    else:
      parts.append(str(i))
  return "[" + ", ".join(parts) + "]"


def _short(e: Exception, n: int = 300) -> str:
  s = str(e).splitlines()[0] if str(e) else type(e).__name__
  return s[:n]


# --- writing ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StreamedArray:
  """A leaf orbax saves without holding it: its bytes come from the producer of the save."""
  shape: tuple[int, ...]
  dtype: np.dtype


class _StreamingHandler(ocp.type_handlers.NumpyHandler):
  """orbax's NumpyHandler, except that `serialize` streams: it creates every array with the
  spec NumpyHandler would use and then runs the producer, which fills them piece by piece.

  `typestr()` stays 'np.ndarray', so what it writes is restored by orbax's own NumpyHandler
  (or ArrayHandler, given shardings) with no project code. Registered per save, not globally.
  """

  def __init__(self, writer: "ParamWriter", fill: Callable[[], Any]):
    super().__init__()
    self._writer, self._fill = writer, fill
    self.done, self.result = False, None

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.SaveArgs()] * len(values)
    for value, info, arg in zip(values, infos, args):
      await info.await_path_creation()  # orbax's temporary checkpoint directory
      self._writer._create(info, value, arg)
    if len(self._writer._arrays) == len(self._writer.leaves) and not self.done:
      # The producer blocks (reads, compares, hashes, on its own threads): keep orbax's
      # event loop free while it runs. Its exceptions propagate to `save` unchanged.
      self.result = await asyncio.to_thread(self._fill)
      self.done = True
    return []


class ParamWriter:
  """Writes a new params directory as an orbax checkpoint, filling it piece by piece.

  leaves: {path: (shape, dtype)}. `save(fill)` has orbax save the tree; once orbax has made
  its (temporary) checkpoint directory, every array is created with orbax's own spec and
  `fill()` runs: it calls `write(path, index, value)` for every piece (iterate `pieces(path)`;
  whole chunks, so nothing is read back). orbax then writes _METADATA and renames its
  temporary directory into place: an exception from `fill` propagates unchanged and leaves
  no `params` directory.
  """

  def __init__(self, params_dir, leaves: dict[Path, tuple[tuple[int, ...], Any]], moe: bool,
               chunk_bytes: int = CHUNK_BYTES):
    self.root = as_path(params_dir)
    self.leaves = {tuple(p): (tuple(int(s) for s in shape), np.dtype(dt))
                   for p, (shape, dt) in leaves.items()}
    self.moe = moe
    self.chunk_bytes = chunk_bytes
    self.chunks = {p: chunk_shape(p, s, d.itemsize, moe, chunk_bytes)
                   for p, (s, d) in self.leaves.items()}
    # No fsync per chunk file (tensorstore's default): the output is published by renaming
    # its directory, so a crash leaves a partial directory either way, and per-file syncs
    # made writing 3x slower than `cp`.
    self._context = ts.Context({"file_io_sync": False})
    self._arrays: dict[Path, ts.TensorStore] = {}
    self._by_name = {leaf_name(p): p for p in self.leaves}

  def save(self, fill: Callable[[], Any]) -> Any:
    """Save the tree with orbax, `fill()` producing its bytes; returns what `fill` returned."""
    tree: dict = {}
    args: dict = {}
    for p, (shape, dtype) in self.leaves.items():
      node, anode = tree, args
      for k in p[:-1]:
        node, anode = node.setdefault(k, {}), anode.setdefault(k, {})
      node[p[-1]] = StreamedArray(shape, dtype)
      anode[p[-1]] = save_args(p, len(shape), self.moe, self.chunk_bytes)
    handler = _StreamingHandler(self, fill)
    registry = ocp.type_handlers.create_type_handler_registry((StreamedArray, handler))
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(
        use_ocdbt=False, use_compression=False, type_handler_registry=registry))
    try:
      ckptr.save(self.root, args=ocp.args.PyTreeSave(tree, save_args=args))
    finally:
      ckptr.close()
      self._arrays.clear()
    if not handler.done:
      raise StoreError(f"orbax saved {self.root} without asking for its arrays")
    return handler.result

  def _create(self, info, value: StreamedArray, arg) -> None:
    path = self._by_name[info.name]
    spec = _write_spec(info, value.shape, value.dtype, arg)
    if tuple(spec["metadata"]["chunks"]) != self.chunks[path]:  # pieces() relies on it
      raise StoreError(f"{info.name}: orbax chose chunks {spec['metadata']['chunks']}, "
                       f"expected {self.chunks[path]}")
    try:
      self._arrays[path] = ts.open(ts.Spec(spec), create=True, open=True,
                                   context=self._context).result()
    except Exception as e:
      raise StoreError(f"cannot create {info.name} in {self.root}: {_short(e)}") from e

  def pieces(self, path: Path) -> Iterator[tuple[slice, ...]]:
    shape, _ = self.leaves[tuple(path)]
    return chunk_grid(shape, self.chunks[tuple(path)])

  def write(self, path: Path, index, value: np.ndarray) -> None:
    """Write `value` at `index` (a piece from `pieces`, or any region: partial chunks are
    read-modify-written by tensorstore)."""
    path = tuple(path)
    _, dtype = self.leaves[path]
    value = np.asarray(value)
    if value.dtype != dtype:
      raise StoreError(f"{leaf_name(path)}{describe_index(index)}: dtype {value.dtype}, "
                       f"expected {dtype}")
    arr = self._arrays.get(path)
    if arr is None:
      raise StoreError(f"{leaf_name(path)}: written outside ParamWriter.save")
    # The caller does not modify `value` (the stitcher only hashes it): let tensorstore use
    # its buffer instead of copying it (one copy less per piece in flight).
    arr[tuple(index)].write(value, can_reference_source_data_indefinitely=True).result()

  def release(self, path: Path) -> None:
    pass  # no caches on the write side; kept for symmetry with ParamReader


def tree_leaves(abstract_tree) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
  """{path: (shape, dtype)} of a tree of ShapeDtypeStructs (e.g. abstract_params(cfg))."""
  import jax
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_tree):
    out[tuple(getattr(k, "key", str(k)) for k in path)] = (tuple(leaf.shape), np.dtype(leaf.dtype))
  return out


def params_nbytes(model_dir) -> int:
  root = _params_root(model_dir)
  return sum(f.stat().length for f in files_under(root))


def tune_malloc() -> None:
  """Let glibc keep freed chunk-sized buffers for reuse (the tool CLIs call this at start-up).

  By default every multi-MB buffer is a fresh mmap that is unmapped on free, so each chunk read
  pays page faults to zero new memory: measured here, that halves the system time of streaming
  a checkpoint. Memory stays bounded by the in-flight window; it is just not returned early.
  """
  import ctypes
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return
  M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
  libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
  libc.mallopt(M_TRIM_THRESHOLD, 1 << 31)


# --- bounded, ordered parallelism ------------------------------------------------------------

def ordered_map(fn: Callable, items: Iterable, workers: int = 2,
                window: int | None = None) -> Iterator:
  """map(fn, items) on `workers` threads, in order, with at most `window` items in flight.

  Executor.map submits every item at once; here the window bounds host memory to `window`
  pieces no matter how many tensors, layers or experts there are. The first exception (in item
  order) propagates, and nothing after it is started.
  """
  window = window or workers + 1
  if workers <= 1:
    for item in items:
      yield fn(item)
    return
  pending: collections.deque = collections.deque()
  pool = concurrent.futures.ThreadPoolExecutor(workers)
  try:
    for item in items:
      pending.append(pool.submit(fn, item))
      while len(pending) >= window:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    for f in pending:
      f.cancel()
    pool.shutdown(wait=True, cancel_futures=True)
