"""Tensor-at-a-time access to a model directory's params, for tools that must not hold a model.

The stitcher and the converters move 37B-parameter models on hosts that cannot hold one, so they
never restore a whole tree: `ParamReader` opens one array of DIR/params with tensorstore and
reads index slices of it; `ParamWriter` creates the arrays of a new DIR/params and fills them
chunk by chunk. Both speak the layout orbax uses, so `model_io.load_params` restores what
`ParamWriter` wrote (and `ParamReader` reads what `save_model_dir` / orbax wrote):

  * reading: orbax OCDBT (the default save) or plain per-array zarr directories;
  * writing: plain zarr v2, one directory per array and one *uncompressed* file per chunk, so
    a truncated chunk file is caught on read (zarr checks the byte count).

Chunks are one layer (and one expert) of a tensor, split further by orbax's own rule to at most
CHUNK_BYTES; `layer_chunking` gives `save_model_dir` the same chunks, so training exports
stream too, and their stored chunks line up with the stitcher's output chunks.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fcntl
import json
import math
import os
import pathlib
import shutil
import threading
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import tensorstore as ts

PARAMS_DIR = "params"  # same as model_io.PARAMS_DIR (kept here to avoid importing jax)
CHUNK_BYTES = 64 << 20  # upper bound of one stored chunk / one streamed piece
WRITE_BYTES = 128 << 10  # size of one write() call (see ParamWriter._write_chunks)
_METADATA = "_METADATA"

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

  The split is orbax's own choice (`choose_chunk_shape`, what `save_model_dir` writes through
  `layer_chunking`), so a model directory written by training and one written here have the
  same chunk grid: the stitcher can then compare stored chunks without decoding them. It
  splits the largest axis first: the vocabulary axis of embed_tokens [V, d] and lm_head [d, V],
  i.e. blocks of rows of the HF tensors, which the converters stream.
  """
  shape = tuple(int(s) for s in shape)
  if not shape:
    return ()
  n = min(lead_axes(path, moe), len(shape))
  try:
    from orbax.checkpoint._src.arrays.subchunking import choose_chunk_shape
    dtype = np.dtype(f"u{itemsize}") if itemsize in (1, 2, 4, 8) else np.dtype(("V", itemsize))
    return tuple(int(c) for c in choose_chunk_shape(shape, shape, dtype, chunk_bytes,
                                                    shard_axes=tuple(range(n))))
  except ImportError:  # orbax moved it: same idea, rows of the first free axis
    chunks = [1] * n + list(shape[n:])
    if n < len(shape):
      row = itemsize * math.prod(shape[n + 1:])
      chunks[n] = max(1, min(shape[n], chunk_bytes // max(row, 1)))
    return tuple(max(1, c) for c in chunks)


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
  import orbax.checkpoint as ocp

  def args(path, leaf):
    keys = tuple(getattr(k, "key", str(k)) for k in path)
    n = min(lead_axes(keys, cfg.is_moe), len(getattr(leaf, "shape", ())))
    return ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=tuple(range(n)))

  return jax.tree_util.tree_map_with_path(args, tree)


# --- reading ---------------------------------------------------------------------------------

def _params_root(model_dir) -> pathlib.Path:
  return pathlib.Path(model_dir).absolute() / PARAMS_DIR


class ParamReader:
  """Reads slices of the arrays of MODEL_DIR/params without restoring the tree.

  A chunk is decoded whole; when a stored chunk spans more than one streamed piece (one layer
  [x one expert], at most CHUNK_BYTES) -- checkpoints written with orbax's defaults store each
  array as a single chunk -- the array gets a cache of one chunk so it is decoded once, not
  once per piece (host memory is then one such chunk). Call `release` when done with an array.
  """

  def __init__(self, model_dir, label: str | None = None, moe: bool = False):
    self.moe = moe  # experts stacked on axis 1 of the mlp tensors (sets the streamed piece)
    self.model_dir = pathlib.Path(model_dir).absolute()
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
      kv = {"driver": "ocdbt", "base": {"driver": "file", "path": str(self.root) + "/"},
            "path": name}
    else:
      kv = {"driver": "file", "path": str(self.root / name) + "/"}
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
      base = {"driver": "file", "path": str(self.root) + "/"}
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

class ParamWriter:
  """Creates the arrays of a new params directory and fills them piece by piece.

  leaves: {path: (shape, dtype)}. Pieces must be whole chunks (iterate `pieces(path)`).
  `finish()` writes orbax's _METADATA; without it the directory does not restore.
  """

  def __init__(self, params_dir, leaves: dict[Path, tuple[tuple[int, ...], Any]], moe: bool,
               chunk_bytes: int = CHUNK_BYTES):
    self.root = pathlib.Path(params_dir).absolute()
    self.root.mkdir(parents=True, exist_ok=True)
    self.leaves = {tuple(p): (tuple(int(s) for s in shape), np.dtype(dt))
                   for p, (shape, dt) in leaves.items()}
    self.moe = moe
    self.chunks = {p: chunk_shape(p, s, d.itemsize, moe, chunk_bytes)
                   for p, (s, d) in self.leaves.items()}
    # No fsync per chunk file (tensorstore's default): the output is published by renaming
    # its directory, so a crash leaves a partial directory either way, and per-file syncs
    # made writing 3x slower than `cp`.
    self._context = ts.Context({"file_io_sync": False})
    # Create every array (metadata only) up front: workers then only write chunks.
    self._arrays: dict[Path, ts.TensorStore] = {p: self._create(p) for p in self.leaves}

  def _create(self, path: Path) -> ts.TensorStore:
    shape, dtype = self.leaves[path]
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "file", "path": str(self.root / leaf_name(path)) + "/"},
        "dtype": np.dtype(dtype).name,
        "metadata": {"shape": list(shape), "chunks": list(self.chunks[path]),
                     "compressor": None},
        # orbax restores with fill_missing_data_reads=False: every chunk must exist, even an
        # all-zero one (e.g. the unused bias of the public slot).
        "store_data_equal_to_fill_value": True,
        "create": True, "delete_existing": True,
    }
    try:
      return ts.open(spec, context=self._context).result()
    except Exception as e:
      raise StoreError(f"cannot create {leaf_name(path)} in {self.root}: {_short(e)}") from e

  def pieces(self, path: Path) -> Iterator[tuple[slice, ...]]:
    shape, _ = self.leaves[tuple(path)]
    return chunk_grid(shape, self.chunks[tuple(path)])

  def write(self, path: Path, index, value: np.ndarray) -> None:
    """Write `value` at `index`; whole chunks go straight to their files (see _write_chunks)."""
    path = tuple(path)
    shape, dtype = self.leaves[path]
    value = np.asarray(value)
    if value.dtype != dtype:
      raise StoreError(f"{leaf_name(path)}{describe_index(index)}: dtype {value.dtype}, "
                       f"expected {dtype}")
    if not self._write_chunks(path, index, value):
      self._arrays[path][index].write(value).result()  # partial chunks: read-modify-write

  def _write_chunks(self, path: Path, index, value: np.ndarray) -> bool:
    """Write the chunk files of a region made of whole chunks directly; False if it is not.

    An uncompressed zarr v2 chunk file is just the chunk's C-order bytes (edge chunks padded
    to the full chunk shape). Writing them ourselves in WRITE_BYTES slices is ~7x faster than
    tensorstore's single large write() per file on this VM (large writes make the kernel
    allocate page-cache memory the slow way; `cp` also writes 128 KiB at a time).
    """
    shape, dtype = self.leaves[path]
    chunks = self.chunks[path]
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    starts, stops = [], []
    for i, n in zip(index, shape):
      if isinstance(i, (int, np.integer)):
        starts.append(int(i)); stops.append(int(i) + 1)
      elif isinstance(i, slice) and i.step in (None, 1):
        starts.append(i.start or 0); stops.append(n if i.stop is None else min(i.stop, n))
      else:
        return False
    region = tuple(b - a for a, b in zip(starts, stops))
    if value.size != math.prod(region):
      return False
    for a, b, n, c in zip(starts, stops, shape, chunks):
      if a % c or (b % c and b != n):  # must start and end on chunk boundaries
        return False
    value = value.reshape(region)
    base = self.root / leaf_name(path)
    grid = [range(a // c, -(-b // c)) for a, b, c in zip(starts, stops, chunks)]
    for cell in (np.ndindex(*[len(g) for g in grid]) if grid else [()]):
      cidx = [g[k] for g, k in zip(grid, cell)]
      lo = [ci * c for ci, c in zip(cidx, chunks)]
      hi = [min(l + c, n) for l, c, n in zip(lo, chunks, shape)]
      block = value[tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, starts))]
      if tuple(block.shape) != tuple(chunks):  # edge chunk: zarr stores it padded
        full = np.zeros(chunks, dtype)
        full[tuple(slice(0, h - l) for l, h in zip(lo, hi))] = block
        block = full
      data = np.ascontiguousarray(block).view(np.uint8).reshape(-1).data
      key = ".".join(str(c) for c in cidx) or "0"
      with open(base / key, "wb", buffering=0) as f:
        write_all(f, data)
    return True

  def release(self, path: Path) -> None:
    pass  # no caches on the write side; kept for symmetry with ParamReader

  def finish(self) -> None:
    tree = {}
    for p, (shape, _) in sorted(self.leaves.items()):
      tree[str(tuple(p))] = {
          "key_metadata": [{"key": k, "key_type": 2} for k in p],  # 2 = dict key
          "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                             "write_shape": list(shape)},
      }
    meta = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
    (self.root / _METADATA).write_text(json.dumps(meta))
    self._arrays.clear()


def write_all(f, data) -> None:
  """Write a buffer to an unbuffered file in WRITE_BYTES slices (retrying short writes)."""
  view = memoryview(data).cast("B")
  off = 0
  while off < len(view):
    off += f.write(view[off:off + WRITE_BYTES])


def tree_leaves(abstract_tree) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
  """{path: (shape, dtype)} of a tree of ShapeDtypeStructs (e.g. abstract_params(cfg))."""
  import jax
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_tree):
    out[tuple(getattr(k, "key", str(k)) for k in path)] = (tuple(leaf.shape), np.dtype(leaf.dtype))
  return out


def params_nbytes(model_dir) -> int:
  root = _params_root(model_dir)
  return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


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


# --- atomic output directories ---------------------------------------------------------------

@contextlib.contextmanager
def staged_output(target, overwrite: bool = False, error=StoreError) -> Iterator[pathlib.Path]:
  """Build in `.NAME.partial` next to `target`, rename onto it only when the body succeeded.

  The partial name is fixed, so a run killed with SIGKILL leaves one clearly named leftover
  that the next run removes (a lock file keeps two runs on one target apart). Nothing that
  looks like a finished output is ever visible at `target` before the final rename.
  """
  target = pathlib.Path(target).absolute()
  if target.exists() and not overwrite:
    raise error(f"{target} already exists (pass --overwrite to replace it)")
  target.parent.mkdir(parents=True, exist_ok=True)
  lock_path = target.parent / f".{target.name}.lock"
  with open(lock_path, "w") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      raise error(f"another process is writing {target} (lock {lock_path})") from e
    tmp = target.parent / f".{target.name}.partial"
    if tmp.exists():
      shutil.rmtree(tmp)  # left behind by an interrupted run
    tmp.mkdir()
    try:
      yield tmp
      if target.exists():
        if not overwrite:
          raise error(f"{target} appeared while writing; not replacing it")
        old = target.parent / f".{target.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
      else:
        os.replace(tmp, target)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
      with contextlib.suppress(OSError):
        lock_path.unlink()
