"""Tokenize a split once, pack it into fixed-length rows, cache the rows as sharded array_record.

Token stream of a split:  EOS d1 EOS d2 EOS ... dn EOS   (documents in dataset order).
Row r holds stream[r*L : r*L + L + 1]; inputs = row[:-1], targets = row[1:]. Consecutive rows
overlap by one token, so every token after the leading EOS is a target exactly once per epoch:
each document's tokens and its closing EOS are all predicted, none twice, none lost. Only the
last row can be short; it is right-padded with pad_id and its loss mask covers the real targets.
Rows span document boundaries (OLMo-style packing, no cross-document attention mask).

The cache lives next to the dataset (DATASET_DIR/packed/SPLIT-L{seq_len}-{key}/) and the key
hashes the tokenizer JSON, seq_len and the split's content digest, so a different tokenizer or a
re-prepared dataset never reuses stale rows. It is written to a temporary directory, moved into
place and sealed (storage.atomic.shared_cache_directory), so concurrent builders (one per JAX
process) are safe: the first move wins, the rest discard; an unsealed cache is never read.
Any epath location works (gs://...): array_record's writer needs a local file, so each row
shard is written locally and copied (storage.paths.local_file); its reader opens gs:// itself.

Packing is a map over the dataset's shards (in process or on Beam, see beam_map.py), in two
passes: each shard tokenises its documents into a flat token file and reports its length; the
driver turns the lengths into stream offsets, so each shard then writes, independently, the
rows that start inside it (rows-XXXXX-of-YYYYY.array_record, in global row order). The rows are
exactly those of pack_token_documents over the whole split, whatever the runner or shard count.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from etils import epath

from flexolmo_jax.data import beam_map, catalog
from flexolmo_jax.data.errors import DataError
from flexolmo_jax.data.tokenizer import load_tokenizer, tokenizer_info
from flexolmo_jax.storage import atomic, paths

log = logging.getLogger(__name__)

PACK_FORMAT = "flexolmo_jax.packed/2"  # 2: rows in shards (rows-XXXXX-of-YYYYY.array_record)
META_FILE = "meta.json"
_ROWS_TEMPLATE = "rows-{:05d}-of-{:05d}.array_record"
_ENCODE_BATCH = 256
_ROWS_PER_READ = 256  # rows read from a token file at a time: bounds a worker's memory


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
  shards: tuple[tuple[str, int], ...] = ()  # (file name, rows), rows in global row order

  @property
  def row_files(self) -> list[str]:
    return [os.fspath(epath.Path(self.directory) / name) for name, _ in self.shards]


def _cache_key(content: str, tok_sha: str, seq_len: int, split: str) -> str:
  blob = json.dumps({"format": PACK_FORMAT, "content": content, "tokenizer": tok_sha,
                     "seq_len": seq_len, "split": split}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_meta(directory: str) -> PackedSplit:
  meta = json.loads((epath.Path(directory) / META_FILE).read_text())
  fields = {f.name for f in dataclasses.fields(PackedSplit)} - {"directory", "shards"}
  return PackedSplit(directory=directory, **{k: meta[k] for k in fields},
                     shards=tuple((s["file"], s["rows"]) for s in meta["shards"]))


def packed_split(dataset: str, split: str, tokenizer_path: str, seq_len: int,
                 cache_dir: str | None = None, *, runner: str = beam_map.IN_PROCESS,
                 num_workers: int | None = None,
                 beam_options: str | Sequence[str] = ()) -> PackedSplit:
  """The packed rows of ``split``, tokenizing and writing them if they are not there yet.

  ``prepare_data --tokenizer=... --seq-len=...`` calls this once, offline, on any runner
  (beam_map.make_runner); training then finds the rows and never tokenises. Every runner
  writes the same rows as ``pack_token_documents`` over the whole split.
  """
  if seq_len < 1:
    raise DataError(f"seq_len must be >= 1, got {seq_len}")
  ds_dir = catalog.resolve_dataset_dir(dataset)
  builder = catalog.open_builder(ds_dir)
  if split not in builder.info.splits:
    raise DataError(f"no split {split!r} (has: {', '.join(builder.info.splits)})",
                    location=ds_dir)
  tok = tokenizer_info(tokenizer_path)
  content = catalog.split_fingerprint(builder, split)
  key = _cache_key(content, tok.sha256, seq_len, split)
  root = paths.as_path(cache_dir or epath.Path(ds_dir) / "packed")
  final = os.fspath(root / f"{split}-L{seq_len}-{key}")
  if atomic.is_sealed(final):
    return _load_meta(final)
  info = builder.info.splits[split]
  # The loaders get here only when no one packed offline (prepare_data --tokenizer): say so,
  # since at scale that is hours of tokenising on the training hosts.
  log.info("packing %s/%s for seq_len %d (%s)", ds_dir, split, seq_len, runner)
  executor = beam_map.make_runner(runner, num_workers, beam_options, input_bytes=info.num_bytes)

  with atomic.shared_cache_directory(final) as tmp:  # several hosts may pack at once
    if tmp is None:
      return _load_meta(final)
    # Units: the dataset's shards (TFDS's shard lengths give each one's document range).
    units, start = [], 0
    for n in info.shard_lengths:
      units.append({"dataset": ds_dir, "split": split, "start": start, "count": n})
      start += n
    with executor.scratch(tmp) as work:
      tokens_dir = epath.Path(tmp) / "tokens"
      tokens_dir.mkdir()
      counted = executor.map(
          functools.partial(tokenize_unit, tokenizer_path=tokenizer_path, seq_len=seq_len,
                            eos_id=tok.eos_id, tokens_dir=os.fspath(tokens_dir)),
          [dict(u, index=i) for i, u in enumerate(units)], work and work / "tokenize")
      jobs, plan = _plan_rows(counted, seq_len, tok.pad_id, tmp)
      written = executor.map(write_rows_unit, jobs, work and work / "rows")
      tokens_dir.rmtree()
    shards = [{"file": epath.Path(j["out"]).name, "rows": w["rows"]}
              for j, w in zip(jobs, written)]
    meta = {"format": PACK_FORMAT, "dataset": builder.info.name, "split": split,
            "seq_len": seq_len,
            "num_rows": plan["rows"], "num_tokens": sum(w["tokens"] for w in written),
            "num_documents": sum(c["documents"] for c in counted),
            "last_row_valid": plan["last_row_valid"], "eos_id": tok.eos_id,
            "pad_id": tok.pad_id, "tokenizer_sha256": tok.sha256, "content_sha256": content,
            "shards": shards}
    if sum(s["rows"] for s in shards) != plan["rows"] or meta["num_tokens"] != plan["tokens"]:
      raise DataError(f"packed rows disagree with the token counts ({shards}, {plan})",
                      location=ds_dir)
    (epath.Path(tmp) / META_FILE).write_text(json.dumps(meta, indent=1))
  log.info("packed %s/%s: %d rows, %d tokens in %d shards (%s)", ds_dir, split, plan["rows"],
           plan["tokens"], len(shards), executor.name)
  return _load_meta(final)


def tokenize_unit(unit: dict[str, Any], *, tokenizer_path: str, seq_len: int, eos_id: int,
                  tokens_dir: str) -> dict[str, Any]:
  """Pass 1 over one dataset shard: its token stream (each document then EOS; the first shard
  also starts with the stream's leading EOS) into a flat int32 file, and its length."""
  source = catalog.open_builder(unit["dataset"]).as_data_source(split=unit["split"])
  tokenizer = load_tokenizer(tokenizer_path)
  eos = np.array([eos_id], np.int32)
  n_tokens = 0
  head: list[np.ndarray] = []  # the first seq_len tokens: the previous shard's last row ends here
  n_head = 0
  path = os.fspath(epath.Path(tokens_dir) / f"{unit['index']:06d}.int32")
  with epath.Path(path).open("wb") as fh:
    def put(ids: np.ndarray) -> None:
      nonlocal n_tokens, n_head
      fh.write(ids.tobytes())
      n_tokens += len(ids)
      if n_head < seq_len:
        head.append(ids[: seq_len - n_head])
        n_head += len(head[-1])

    if unit["index"] == 0:
      put(eos)
    stop = unit["start"] + unit["count"]
    for start in range(unit["start"], stop, _ENCODE_BATCH):
      items = source.__getitems__(range(start, min(start + _ENCODE_BATCH, stop)))
      texts = [it["text"].decode("utf-8") for it in items]
      for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        put(np.concatenate([np.asarray(enc.ids, np.int32), eos]))
  head_ids = np.concatenate(head) if head else np.zeros(0, np.int32)
  return {"path": path, "tokens": n_tokens, "documents": unit["count"],
          "head": head_ids.tolist()}


def _plan_rows(counted: list[dict], seq_len: int, pad_id: int,
               out_dir) -> tuple[list[dict], dict]:
  """Which rows each shard writes: row r (stream[r*L : r*L + L + 1]) belongs to the shard
  holding its first token; the up to L tokens it needs beyond that shard's end come from the
  heads of the following shards. Same rows as ``pack_token_documents`` on the whole stream."""
  total = sum(c["tokens"] for c in counted)  # stream length, leading EOS included
  n_full = (total - 1) // seq_len
  rest = total - n_full * seq_len
  n_rows = n_full + (rest > 1)
  plan = {"rows": n_rows, "tokens": total - 1,
          "last_row_valid": (rest - 1 if rest > 1 else seq_len) if n_rows else 0}
  spans, begin = [], 0
  for c in counted:
    first = -(-begin // seq_len)
    end = min(-(-(begin + c["tokens"]) // seq_len), n_rows)
    spans.append((begin, first, max(first, end)))
    begin += c["tokens"]
  owners = [u for u, (_, first, end) in enumerate(spans) if end > first]
  jobs = []
  for shard, u in enumerate(owners):
    tail: list[int] = []
    for c in counted[u + 1:]:
      if len(tail) >= seq_len:
        break
      tail += c["head"]
    jobs.append({"tokens": counted[u]["path"], "begin": spans[u][0], "first_row": spans[u][1],
                 "end_row": spans[u][2], "tail": tail[:seq_len], "seq_len": seq_len,
                 "full_rows": n_full, "pad_id": pad_id,
                 "out": os.fspath(epath.Path(out_dir) / _ROWS_TEMPLATE.format(shard, len(owners)))})
  return jobs, plan


def write_rows_unit(job: dict[str, Any]) -> dict[str, Any]:
  """Pass 2 over one shard: its rows from its token file (plus the tail), read in blocks."""
  from array_record.python.array_record_module import ArrayRecordWriter

  seq_len, begin = job["seq_len"], job["begin"]
  tail = np.asarray(job["tail"], np.int32)
  # group_size:1 makes every row independently readable: random access is what the
  # shuffled loader does.
  local = contextlib.ExitStack()  # array_record writes local files: copied to job["out"] at the end
  writer = ArrayRecordWriter(local.enter_context(paths.local_file(job["out"], ".array_record")),
                             "group_size:1")
  n_rows = n_tokens = 0
  with epath.Path(job["tokens"]).open("rb") as fh:
    for r0 in range(job["first_row"], job["end_row"], _ROWS_PER_READ):
      r1 = min(r0 + _ROWS_PER_READ, job["end_row"])
      lo = r0 * seq_len - begin  # block = local positions [lo, hi)
      hi = (r1 - 1) * seq_len + seq_len + 1 - begin
      fh.seek(lo * 4)
      block = np.frombuffer(fh.read((hi - lo) * 4), np.int32)
      if len(block) < hi - lo:  # the last rows run into the following shards
        block = np.concatenate([block, tail[: hi - lo - len(block)]])
      for r in range(r0, r1):
        row = block[(r - r0) * seq_len: (r - r0) * seq_len + seq_len + 1]
        n_valid = seq_len if r < job["full_rows"] else len(row) - 1
        if len(row) < seq_len + 1:  # the stream's last, short row
          row = np.concatenate([row, np.full(seq_len + 1 - len(row), job["pad_id"], np.int32)])
        writer.write(row.tobytes())
        n_rows += 1
        n_tokens += n_valid
  writer.close()
  local.close()
  return {"rows": n_rows, "tokens": n_tokens}


class PackedRows:
  """Random-access source of packed rows (grain ``RandomAccessDataSource`` protocol).

  Over the shard files in row order; a shard is opened on its first read, so a process only
  opens the shards holding the rows of its own slice of each batch.
  """

  def __init__(self, packed: PackedSplit):
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    self.packed = packed
    # "path[0:n]": the row count is known from meta.json, so nothing is opened here.
    self._records = ArrayRecordDataSource(
        [f"{path}[0:{rows}]" for path, (_, rows) in zip(packed.row_files, packed.shards)]
    ) if packed.num_rows else None

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
