"""Finding and reading prepared datasets: paths, splits, statistics, raw document samples."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any

import numpy as np
from etils import epath

from flexolmo_jax.data.errors import DataError
from flexolmo_jax.storage import atomic
from flexolmo_jax.storage.paths import as_path

_INFO = "dataset_info.json"


def resolve_dataset_dir(path: str) -> str:
  """Accepts DATA_DIR/NAME/VERSION, DATA_DIR/NAME or a DATA_DIR holding exactly one dataset."""
  root = as_path(path)  # any epath location: local, gs://...
  path = os.fspath(root)
  if (root / _INFO).is_file():
    _require_complete(root)
    return path
  if not root.is_dir():
    raise DataError("no such dataset directory", location=path)
  found = []
  for depth in (1, 2):  # NAME/VERSION below a data dir, or VERSION below a name dir
    pattern = "/".join(["*"] * depth + [_INFO])
    found = sorted(os.fspath(p.parent) for p in root.glob(pattern)
                   if "/." not in os.fspath(p)[len(path):])  # ignore .partial staging dirs
    if found:
      break
  if len(found) != 1:
    what = "no prepared dataset" if not found else f"several datasets ({', '.join(found)})"
    raise DataError(f"{what} found; pass DATA_DIR/NAME/VERSION", location=path)
  _require_complete(epath.Path(found[0]))
  return found[0]


def _require_complete(root: epath.Path) -> None:
  """A dataset prepare_data wrote (its metadata says so) must carry the stager's seal: without
  it the copy onto the bucket was cut short. TFDS datasets from other tools have no seal."""
  meta = root / "metadata.json"
  if not atomic.is_sealed(root) and meta.is_file():
    try:
      ours = str(json.loads(meta.read_text()).get("format", "")).startswith("flexolmo_jax.")
    except ValueError:
      ours = False
    if ours:
      atomic.require_sealed(root, DataError, "dataset")


@functools.lru_cache(maxsize=64)
def _open(path: str, mtime: float):
  del mtime  # cache key only: a re-prepared dataset is re-opened
  import tensorflow_datasets as tfds

  return tfds.builder_from_directory(path)


def open_builder(dataset: str):
  """``tfds.builder_from_directory`` for a resolved dataset directory (cached)."""
  path = resolve_dataset_dir(dataset)
  return _open(path, (epath.Path(path) / _INFO).stat().mtime)


def split_fingerprint(builder, split: str) -> str:
  """Content digest of a split recorded at prepare time (falls back to the dataset info)."""
  recorded = (builder.info.metadata or {}).get("splits", {}).get(split, {}).get("sha256")
  if recorded:
    return recorded
  # A TFDS dataset prepared by other tools: key on its info (names, shard lengths, sizes).
  info = (epath.Path(os.fspath(builder.data_dir)) / _INFO).read_bytes()
  return hashlib.sha256(info + split.encode()).hexdigest()


def dataset_stats(dataset: str) -> dict[str, Any]:
  """The statistics prepare_data recorded (metadata.json), plus split sizes from tfds."""
  builder = open_builder(dataset)
  stats = dict(builder.info.metadata or {})
  stats["num_examples"] = {s: builder.info.splits[s].num_examples for s in builder.info.splits}
  return stats


def sample_documents(data_dir: str, n: int, seed: int, split: str = "train") -> list[str]:
  """``min(n, len(split))`` distinct documents drawn uniformly with ``seed`` (deterministic)."""
  builder = open_builder(data_dir)
  if split not in builder.info.splits:
    raise DataError(f"no split {split!r}", location=str(builder.data_dir))
  source = builder.as_data_source(split=split)
  rng = np.random.default_rng(seed)
  idx = rng.choice(len(source), size=min(n, len(source)), replace=False)
  return [item["text"].decode("utf-8") for item in source.__getitems__([int(i) for i in idx])]
