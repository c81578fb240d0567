"""Training and evaluation batches from packed rows, built from grain ``MapDataset`` pieces.

Training stream (per process), every stage random-access so step k costs O(1), not O(k):

    source_i = MapDataset.source(PackedRows_i)
                 .shuffle(seed_i)          # global permutation, re-drawn each epoch (seed_i + e)
                 .repeat()                 # epoch after epoch, never drops a row
    mixed    = MapDataset.mix(sources, weights)   # deterministic weighted interleave
    local    = mixed.batch(global_batch / P)      # consecutive slices of the global row stream
    mine     = local[process_index::P]            # global batch k = local[k*P : (k+1)*P]

So the batch at step k is a pure function of (sources, weights, seq_len, tokenizer, seed, k,
process_index, process_count): resuming at step k means building the loader with
``start_step=k`` (nothing else to checkpoint), processes read disjoint rows, and the union of the
processes' rows over consecutive steps is the global stream, which visits every row of a source
once per epoch of that source.

Mixing tolerance: grain turns weights into integers (smallest -> 100, so each is off by < 1%) and
interleaves them with a deterministic low-discrepancy rule (no sampling noise), so over any n
consecutive rows of the global stream the share of source s is within
2 * (number of sources) / n + 0.02 * w_s of its normalised weight w_s.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Union

import grain
import numpy as np

from flexolmo_jax.data.errors import DataError
from flexolmo_jax.data.packing import PackedRows, PackedSplit, packed_split

SourceSpec = Union[str, tuple[str, float]]
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  dataset: str
  weight: float  # normalised
  packed: PackedSplit


def _process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only when the caller did not say: keeps the data package usable without it

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise DataError(f"global batch size {global_batch_size} must be a positive multiple of "
                    f"the process count {process_count}")
  return global_batch_size // process_count


def _parse_sources(sources: SourceSpec | Sequence[SourceSpec]) -> list[tuple[str, float]]:
  if isinstance(sources, str) or (isinstance(sources, tuple) and len(sources) == 2
                                  and isinstance(sources[1], (int, float))):
    sources = [sources]
  parsed = []
  for spec in sources:
    path, weight = (spec, 1.0) if isinstance(spec, str) else (str(spec[0]), float(spec[1]))
    if not (weight > 0 and math.isfinite(weight)):
      raise DataError(f"mixture weight must be a positive number, got {weight}",
                      location=path)
    parsed.append((path, weight))
  if not parsed:
    raise DataError("no data sources given")
  return parsed


def _shuffle_seed(seed: int, source_index: int) -> int:
  # Independent, well-spread 32-bit seeds per source (grain adds the epoch to it).
  digest = hashlib.sha256(f"flexolmo/{seed}/{source_index}".encode()).digest()
  return int.from_bytes(digest[:4], "little")


class TrainLoader:
  """Infinite, deterministic, resumable stream of this process's training batches.

  ``iter(loader)`` yields the batches of steps start_step, start_step + 1, ... as dicts of
  numpy arrays: input_ids int32 [B, L], targets int32 [B, L], loss_mask float32 [B, L], with
  B = global_batch_size // process_count. ``batch_at(k)`` returns step k's batch directly.
  """

  def __init__(self, sources: list[SourceInfo], dataset: grain.MapDataset, *,
               global_batch_size: int, local_batch_size: int, seq_len: int, seed: int,
               process_index: int, process_count: int, start_step: int,
               read_options: grain.ReadOptions):
    self.sources = sources
    self.dataset = dataset  # grain MapDataset: element k = this process's batch at step k
    self.global_batch_size = global_batch_size
    self.local_batch_size = local_batch_size
    self.seq_len = seq_len
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.start_step = start_step
    self._read_options = read_options

  def batch_at(self, step: int) -> Batch:
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    return self.dataset[step]

  def __iter__(self) -> Iterator[Batch]:
    # Prefetch threads read ahead; the order is still exactly dataset[start_step:].
    it = self.dataset[self.start_step:].to_iter_dataset(self._read_options)
    return iter(it)

  def describe(self) -> dict[str, Any]:
    """Sizes for logs: rows, tokens and steps per epoch of each source under its weight."""
    out = []
    for s in self.sources:
      rows_per_step = s.weight * self.global_batch_size
      out.append({"dataset": s.dataset, "weight": s.weight, "rows": s.packed.num_rows,
                  "tokens": s.packed.num_tokens,
                  "steps_per_epoch": s.packed.num_rows / rows_per_step})
    return {"global_batch_size": self.global_batch_size, "seq_len": self.seq_len,
            "tokens_per_step": self.global_batch_size * self.seq_len, "sources": out}


def make_train_loader(sources: SourceSpec | Sequence[SourceSpec], tokenizer_path: str,
                      seq_len: int, global_batch_size: int, seed: int,
                      process_index: int | None = None, process_count: int | None = None,
                      split: str = "train", start_step: int = 0, *, num_threads: int = 2,
                      prefetch: int = 8, cache_dir: str | None = None) -> TrainLoader:
  """Training batches mixed from ``sources`` = [(dataset_dir, weight), ...] (see module doc).

  Rows packed offline (``prepare_data --tokenizer``) are read as they are; otherwise a dataset
  is tokenized and packed on first use, in process (cached next to it). Weights are
  normalised. ``process_index``/``process_count`` default to ``jax.process_index()`` /
  ``jax.process_count()``.
  """
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  process_index, process_count = _process_defaults(process_index, process_count)
  local = _local_batch(global_batch_size, process_count)
  parsed = _parse_sources(sources)
  total = sum(w for _, w in parsed)
  infos, streams = [], []
  for i, (path, weight) in enumerate(parsed):
    packed = packed_split(path, split, tokenizer_path, seq_len, cache_dir=cache_dir)
    if packed.num_rows == 0:
      raise DataError(f"split {split!r} has no tokens", location=path)
    infos.append(SourceInfo(path, weight / total, packed))
    rows = grain.MapDataset.source(PackedRows(packed))
    streams.append(rows.shuffle(seed=_shuffle_seed(seed, i)).repeat())
  mixed = streams[0] if len(streams) == 1 else grain.MapDataset.mix(
      streams, [w for _, w in parsed])
  mine = mixed.batch(local, drop_remainder=True)[process_index::process_count]
  return TrainLoader(
      infos, mine, global_batch_size=global_batch_size, local_batch_size=local,
      seq_len=seq_len, seed=seed, process_index=process_index, process_count=process_count,
      start_step=start_step,
      read_options=grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))


class _PaddedRows:
  """Rows 0..R-1 of a split, then fully masked pad rows up to a whole number of batches."""

  def __init__(self, rows: PackedRows, length: int):
    self._rows = rows
    self._length = length
    pad = np.full(rows.packed.seq_len, rows.packed.pad_id, np.int32)
    self._pad = {"input_ids": pad, "targets": pad,
                 "loss_mask": np.zeros(rows.packed.seq_len, np.float32)}

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> Batch:
    return self._rows[index] if index < len(self._rows) else self._pad


class EvalLoader:
  """One deterministic pass over a split: every row once, in order, across all processes.

  All processes get the same number of batches (the last global batch is completed with rows
  whose loss_mask is 0), so collectives inside an eval step never deadlock.
  """

  def __init__(self, packed: PackedSplit, dataset: grain.MapDataset, num_batches: int,
               read_options: grain.ReadOptions):
    self.packed = packed
    self.dataset = dataset
    self.num_batches = num_batches
    self._read_options = read_options

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[Batch]:
    if self.num_batches == 0:
      return iter(())
    return iter(self.dataset.to_iter_dataset(self._read_options))


def make_eval_loader(dataset: str, tokenizer_path: str, seq_len: int, global_batch_size: int,
                     process_index: int | None = None, process_count: int | None = None,
                     split: str = "validation", *, num_threads: int = 2, prefetch: int = 8,
                     cache_dir: str | None = None) -> EvalLoader:
  """Finite evaluation batches of one dataset's ``split`` (same dict layout as training)."""
  process_index, process_count = _process_defaults(process_index, process_count)
  local = _local_batch(global_batch_size, process_count)
  packed = packed_split(dataset, split, tokenizer_path, seq_len, cache_dir=cache_dir)
  num_batches = -(-packed.num_rows // global_batch_size)
  padded = _PaddedRows(PackedRows(packed), num_batches * global_batch_size)
  ds = grain.MapDataset.source(padded).batch(local)[process_index::process_count]
  return EvalLoader(packed, ds, num_batches,
                    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
