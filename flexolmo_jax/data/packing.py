"""Tokenize a split once, pack it into fixed-length rows, and cache the rows as array_record.

Token stream of a split:  EOS d1 EOS d2 EOS ... dn EOS   (documents in dataset order).
Row r holds stream[r*L : r*L + L + 1]; inputs = row[:-1], targets = row[1:]. Consecutive rows
overlap by one token, so every token after the leading EOS is a target exactly once per epoch:
each document's tokens and its closing EOS are all predicted, none twice, none lost. Only the
last row can be short; it is right-padded with pad_id and its loss mask covers the real targets.
Rows span document boundaries (OLMo-style packing, no cross-document attention mask).

The cache lives next to the dataset (DATASET_DIR/packed/SPLIT-L{seq_len}-{key}/) and the key
hashes the tokenizer JSON, seq_len and the split's content digest, so a different tokenizer or a
re-prepared dataset never reuses stale rows. It is written to a temporary directory and renamed,
so concurrent builders (one per JAX process) are safe: the first rename wins, the rest discard.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from flexolmo_jax.data import catalog
from flexolmo_jax.data.errors import DataError
from flexolmo_jax.data.tokenizer import load_tokenizer, tokenizer_info
from flexolmo_jax.storage import atomic

log = logging.getLogger(__name__)

PACK_FORMAT = "flexolmo_jax.packed/1"
ROWS_FILE = "rows.array_record"
META_FILE = "meta.json"
_ENCODE_BATCH = 256


def pack_token_documents(docs: Iterable[Sequence[int]], seq_len: int, eos_id: int,
                         pad_id: int) -> Iterator[tuple[np.ndarray, int]]:
  """Yields (row int32[seq_len + 1], number of valid targets in the row)."""
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  width = seq_len + 1
  eos = np.array([eos_id], np.int32)
  pending: list[np.ndarray] = [eos]
  n_pending = 1
  for doc in docs:
    pending += [np.asarray(doc, np.int32), eos]
    n_pending += len(doc) + 1
    if n_pending < width:
      continue
    stream = np.concatenate(pending)
    n_rows = (len(stream) - 1) // seq_len
    for r in range(n_rows):
      yield stream[r * seq_len: r * seq_len + width].copy(), seq_len
    rest = stream[n_rows * seq_len:]  # starts with the last target already emitted
    pending, n_pending = [rest], len(rest)
  if n_pending > 1:
    stream = np.concatenate(pending)
    row = np.full(width, pad_id, np.int32)
    row[: len(stream)] = stream
    yield row, len(stream) - 1


def row_to_example(row: np.ndarray, n_valid: int) -> dict[str, np.ndarray]:
  """The model-facing view of one packed row."""
  seq_len = len(row) - 1
  return {
      "input_ids": row[:-1],
      "targets": row[1:],
      "loss_mask": (np.arange(seq_len) < n_valid).astype(np.float32),
  }


@dataclasses.dataclass(frozen=True)
class PackedSplit:
  directory: str
  seq_len: int
  num_rows: int
  num_tokens: int  # targets with loss_mask 1 == sum over documents of (tokens + 1 EOS)
  num_documents: int
  last_row_valid: int
  eos_id: int
  pad_id: int

  @property
  def rows_path(self) -> str:
    return os.path.join(self.directory, ROWS_FILE)


def _cache_key(content: str, tok_sha: str, seq_len: int, split: str) -> str:
  blob = json.dumps({"format": PACK_FORMAT, "content": content, "tokenizer": tok_sha,
                     "seq_len": seq_len, "split": split}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_meta(directory: str) -> PackedSplit:
  with open(os.path.join(directory, META_FILE)) as fh:
    meta = json.load(fh)
  fields = {f.name for f in dataclasses.fields(PackedSplit)} - {"directory"}
  return PackedSplit(directory=directory, **{k: meta[k] for k in fields})


def packed_split(dataset: str, split: str, tokenizer_path: str, seq_len: int,
                 cache_dir: str | None = None) -> PackedSplit:
  """The packed rows of ``split``, tokenizing and writing them on first use."""
  ds_dir = catalog.resolve_dataset_dir(dataset)
  builder = catalog.open_builder(ds_dir)
  if split not in builder.info.splits:
    raise DataError(f"no split {split!r} (has: {', '.join(builder.info.splits)})",
                    location=ds_dir)
  tok = tokenizer_info(tokenizer_path)
  content = catalog.split_fingerprint(builder, split)
  key = _cache_key(content, tok.sha256, seq_len, split)
  root = cache_dir or os.path.join(ds_dir, "packed")
  final = os.path.join(root, f"{split}-L{seq_len}-{key}")
  if os.path.exists(os.path.join(final, META_FILE)):
    return _load_meta(final)

  from array_record.python.array_record_module import ArrayRecordWriter

  with atomic.shared_cache_directory(final) as tmp:  # several hosts may pack at once
    if tmp is None:
      return _load_meta(final)
    source = builder.as_data_source(split=split)
    tokenizer = load_tokenizer(tokenizer_path)

    def token_docs() -> Iterator[list[int]]:
      for start in range(0, len(source), _ENCODE_BATCH):
        stop = min(start + _ENCODE_BATCH, len(source))
        items = source.__getitems__(range(start, stop))
        texts = [it["text"].decode("utf-8") for it in items]
        for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
          yield enc.ids

    # group_size:1 makes every row independently readable: random access is what the
    # shuffled loader does.
    writer = ArrayRecordWriter(os.path.join(tmp, ROWS_FILE), "group_size:1")
    n_rows = n_tokens = last_valid = 0
    for row, n_valid in pack_token_documents(token_docs(), seq_len, tok.eos_id, tok.pad_id):
      writer.write(row.tobytes())
      n_rows += 1
      n_tokens += n_valid
      last_valid = n_valid
    writer.close()
    meta = {"format": PACK_FORMAT, "dataset": builder.info.name, "split": split,
            "seq_len": seq_len,
            "num_rows": n_rows, "num_tokens": n_tokens, "num_documents": len(source),
            "last_row_valid": last_valid, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
            "tokenizer_sha256": tok.sha256, "content_sha256": content}
    with open(os.path.join(tmp, META_FILE), "w") as fh:
      json.dump(meta, fh, indent=1)
  log.info("packed %s/%s: %d rows, %d tokens", ds_dir, split, n_rows, n_tokens)
  return _load_meta(final)


class PackedRows:
  """Random-access source of packed rows (grain ``RandomAccessDataSource`` protocol)."""

  def __init__(self, packed: PackedSplit):
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    self.packed = packed
    self._records = ArrayRecordDataSource([packed.rows_path]) if packed.num_rows else None

  def __len__(self) -> int:
    return self.packed.num_rows

  def _example(self, index: int, record: bytes) -> dict[str, np.ndarray]:
    row = np.frombuffer(record, np.int32)
    last = index == self.packed.num_rows - 1
    return row_to_example(row, self.packed.last_row_valid if last else self.packed.seq_len)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"row {index} out of range [0, {len(self)})")
    return self._example(index, self._records[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
    indices = [int(i) for i in indices]
    records = self._records.__getitems__(indices)
    return [self._example(i, r) for i, r in zip(indices, records)]

  def __repr__(self) -> str:  # grain puts this in its pipeline summaries
    return f"PackedRows({self.packed.directory}, rows={len(self)})"
