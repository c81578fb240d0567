"""Local files -> a TFDS (array_record) dataset with deterministic train/validation splits.

The inputs are cut into work units (runs of consecutive files, about ``shard_input_bytes``
each); unit u becomes shard u of each split, so records keep input order. Two passes over the
inputs, each a map over the units (in this process, or on a Beam runner: beam_map.py), so memory
stays flat whatever the corpus size and the two executors write identical datasets:
  1. scan: read and validate everything, count documents, bytes and skips per unit. Every fatal
     input problem (truncated archive, missing column, ...) surfaces here, before any shard
     exists; the driver combines the counts and applies the skip rules.
  2. write: each unit re-reads its files and writes its train and validation shards. Its record
     counts must match the scan, which catches files that changed underneath us.
The dataset is built in a hidden staging directory and moved into place and sealed only when
complete (storage.atomic); a killed run leaves only that ``.VERSION.partial`` directory, which
the next run removes. Inputs and output may be any epath location (gs://...); the shards are
written locally and copied there (tfds_builder.ShardWriter: array_record writes local files).

Split rule: a document goes to validation iff sha256(text) maps below ``validation_fraction``.
It depends only on the text, not on file names or order, so identical copies of a document can
never straddle the split, and re-running on the same files gives the same split.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from etils import epath

from flexolmo_jax.data import beam_map, readers, tfds_builder
from flexolmo_jax.storage import atomic
from flexolmo_jax.storage import paths
from flexolmo_jax.storage.paths import as_path
from flexolmo_jax.data.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "flexolmo_jax.documents/2"  # 2: one shard per work unit; split digest over shards
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
TRAIN, VALIDATION = "train", "validation"
# Input bytes per work unit, hence per output shard: large enough that per-unit overheads vanish,
# small enough that units spread over workers and a shard stays well under TFDS's 1 GiB advice.
SHARD_INPUT_BYTES = 256 << 20


def split_value(text: str) -> float:
  """Uniform in [0, 1), a pure function of the text."""
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def plan_units(files: Sequence[readers.InputFile],
               shard_input_bytes: int = SHARD_INPUT_BYTES) -> list[tuple[readers.InputFile, ...]]:
  """Consecutive files grouped into units of about ``shard_input_bytes`` (a bigger file is a
  unit of its own). A pure function of the file list and sizes, so both executors agree."""
  units, current, size = [], [], 0
  for f in files:
    n = paths.size(f.path)
    if current and size + n > shard_input_bytes:
      units.append(tuple(current))
      current, size = [], 0
    current.append(f)
    size += n
  if current:
    units.append(tuple(current))
  return units


def scan_unit(files: Sequence[readers.InputFile], *, text_field: str, fraction: float,
              strict: bool) -> dict[str, Any]:
  """Pass 1 over one unit: per-file counts, split counts, skips (JSON-sized)."""
  skips = readers.SkipLog(strict)
  per_file = []
  docs = {TRAIN: 0, VALIDATION: 0}
  nbytes = {TRAIN: 0, VALIDATION: 0}
  ordinal = 0
  best = None  # [smallest split value, its ordinal within the unit]
  for f in files:
    skipped_before = skips.total
    n_file = 0
    for doc in readers.iter_documents([f], text_field, skips):
      u = split_value(doc.text)
      split = VALIDATION if u < fraction else TRAIN
      docs[split] += 1
      nbytes[split] += len(doc.text.encode("utf-8"))
      if best is None or u < best[0]:
        best = [u, ordinal]
      ordinal += 1
      n_file += 1
    per_file.append({"path": f.path, "bytes_on_disk": paths.size(f.path),
                     "documents": n_file, "skipped": skips.total - skipped_before})
    log.info("scanned %s: %d documents, %d skipped", f.path, n_file,
             skips.total - skipped_before)
  return {"files": per_file, "docs": docs, "bytes": nbytes, "documents": ordinal, "best": best,
          "skip_counts": dict(skips.counts), "skip_examples": skips.examples}


def write_unit(job: dict[str, Any], *, text_field: str, fraction: float,
               strict: bool, relative_to: str | None) -> dict[str, Any]:
  """Pass 2 over one unit: its documents into its shard of each split, checked against pass 1.

  Returns per split: documents, text bytes, serialised bytes and an order-sensitive digest
  (sha256 over the documents' sha256), combined on the driver into metadata.json.
  """
  show = functools.partial(_show, relative_to)
  files, forced = job["files"], job["forced"]
  writers = {split: tfds_builder.ShardWriter(path) for split, path in job["shards"].items()}
  digests = {split: hashlib.sha256() for split in writers}
  nbytes = dict.fromkeys(writers, 0)
  again = readers.SkipLog(strict)
  ordinal = 0
  try:
    for doc in readers.iter_documents(files, text_field, again):
      split = VALIDATION if ordinal == forced or split_value(doc.text) < fraction else TRAIN
      ordinal += 1
      if split not in writers:  # the scan saw no document of this split here
        break
      data = doc.text.encode("utf-8")
      writers[split].add({"text": doc.text, "source": show(doc.location)})
      digests[split].update(hashlib.sha256(data).digest())
      nbytes[split] += len(data)
  finally:
    for w in writers.values():
      w.close()
  counts = {split: w.num_examples for split, w in writers.items()}
  if (ordinal != job["documents"] or dict(again.counts) != job["skip_counts"]
      or counts != job["split_documents"]):
    where = files[0].path if len(files) == 1 else f"{files[0].path} .. {files[-1].path}"
    raise DataError(f"input files changed while preparing ({job['documents']} documents at "
                    f"scan, {ordinal} now); nothing was written", location=where)
  return {split: {"documents": counts[split], "bytes": nbytes[split],
                  "num_bytes": writers[split].num_bytes, "sha256": digests[split].hexdigest()}
          for split in writers}


def prepare_dataset(name: str, inputs: Sequence[str], out_dir: str, *, text_field: str = "text",
                    validation_fraction: float = 0.05, strict: bool = False,
                    max_skipped_fraction: float = 0.5, overwrite: bool = False,
                    description: str | None = None, relative_to: str | None = None,
                    runner: str = beam_map.AUTO, num_workers: int | None = None,
                    beam_options: str | Sequence[str] = (),
                    shard_input_bytes: int = SHARD_INPUT_BYTES) -> str:
  """Builds OUT_DIR/NAME/1.0.0 (a sharded array_record TFDS dataset) and returns its path.

  Raises DataError (naming file and line) on unusable input; in that case nothing is written.
  ``relative_to``: record input paths relative to this directory (portable provenance).
  ``runner``/``num_workers``/``beam_options``: where the units run (beam_map.make_runner);
  every runner writes the same dataset.
  """
  base = os.fspath(as_path(relative_to)) if relative_to else None
  show = functools.partial(_show, base)
  if not _NAME_RE.match(name):
    raise DataError(f"dataset name {name!r} must match {_NAME_RE.pattern} (tfds naming)")
  if not 0.0 <= validation_fraction < 1.0:
    raise DataError(f"validation fraction must be in [0, 1), got {validation_fraction}")
  files = readers.resolve_inputs(inputs)
  target = os.fspath(as_path(out_dir) / name / tfds_builder.VERSION)
  atomic.check_target(target, overwrite, DataError)  # fail now, not after hours of work
  units = plan_units(files, shard_input_bytes)
  executor = beam_map.make_runner(runner, num_workers, beam_options,
                                  input_bytes=sum(paths.size(f.path) for f in files))
  options = {"text_field": text_field, "fraction": validation_fraction, "strict": strict}

  with executor.scratch(out_dir) as work:
    scans = executor.map(functools.partial(scan_unit, **options), units,
                         work and work / "scan")
    skips, forced = _check_scan(scans, len(files), validation_fraction, max_skipped_fraction,
                                strict)
    n_docs = sum(s["documents"] for s in scans)
    with atomic.staged_directory(target, overwrite, error=DataError) as stage:
      dataset_dir = epath.Path(stage.root) / name / tfds_builder.VERSION
      dataset_dir.mkdir(parents=True)
      jobs = _plan_shards(dataset_dir, name, units, scans, forced)
      written = executor.map(functools.partial(write_unit, **options, relative_to=base),
                             jobs, work and work / "write")
      splits_meta, shards_info = _combine_splits(written)
      offsets = [0]
      for s in scans:
        offsets.append(offsets[-1] + s["documents"])
      forced_ordinal = None if forced is None else offsets[forced[0]] + forced[1]
      metadata = {
          "format": FORMAT,
          "name": name,
          "text_field": text_field,
          "validation_fraction": validation_fraction,
          "split_rule": "validation iff sha256(utf8 text)[:8] / 2**64 < validation_fraction"
                        + (f"; document #{forced_ordinal} forced to validation"
                           if forced is not None else ""),
          "content_digest": "per split: sha256 over its shards' hex digests, each the sha256 "
                            "over that shard's documents' sha256, in order",
          "inputs": [{**f, "path": show(f["path"])} for s in scans for f in s["files"]],
          "records_seen": n_docs + skips.total,
          "skipped": {"total": skips.total, "by_reason": dict(sorted(skips.counts.items())),
                      "examples": [{**e, "location": show(e["location"])}
                                   for e in skips.examples]},
          "splits": splits_meta,
      }
      built = tfds_builder.write_dataset_info(
          dataset_dir, name, shards_info,
          description=description or f"{name}: documents prepared by flexolmo_jax",
          metadata=metadata)
      _verify(built, n_docs)
      stage.payload = built
  log.info("wrote %s (%s, %d units)", target, executor.name, len(units))
  return target


def _show(base: str | None, location: str) -> str:
  if base and location.startswith(base + os.sep):
    return location[len(base) + 1:]
  return location


def _check_scan(scans: list[dict], n_files: int, fraction: float, max_skipped_fraction: float,
                strict: bool) -> tuple[readers.SkipLog, tuple[int, int] | None]:
  """The skip rules on the combined scan; returns the skips and the forced document."""
  skips = readers.SkipLog(strict)
  for s in scans:  # in unit order: the first examples overall, as one sequential reader
    skips.counts.update(s["skip_counts"])
    skips.examples += s["skip_examples"]
  del skips.examples[readers.MAX_SKIP_EXAMPLES:]
  n_docs = sum(s["documents"] for s in scans)
  seen = n_docs + skips.total
  if n_docs == 0:
    raise DataError(f"no usable documents in {n_files} input file(s); skipped: "
                    f"{dict(skips.counts)}; first: {skips.examples[:3]}")
  if skips.total / seen > max_skipped_fraction:
    raise DataError(
        f"{skips.total} of {seen} records skipped ({dict(skips.counts)}), more than the "
        f"allowed fraction {max_skipped_fraction}; first: {skips.examples[:3]}. "
        f"Wrong --text-field? Raise --max-skipped-fraction to accept this.")
  # With few documents the hash rule can select none; then the document with the smallest
  # hash value (still a pure function of the content) is moved to validation.
  forced = None  # (unit, ordinal within the unit)
  n_val = sum(s["docs"][VALIDATION] for s in scans)
  if fraction > 0 and n_val == 0 and n_docs >= 2:
    _, forced = min((s["best"][0], (u, s["best"][1]))
                    for u, s in enumerate(scans) if s["best"] is not None)
    n_val = 1
    log.warning("hash split selected no validation document; moved document %d of unit %d",
                forced[1], forced[0])
  if n_val == n_docs:
    raise DataError(f"all {n_docs} documents fell into the validation split; "
                    f"lower the validation fraction ({fraction})")
  return skips, forced


def _plan_shards(dataset_dir: epath.Path, name: str, units: list, scans: list[dict],
                 forced: tuple[int, int] | None) -> list[dict[str, Any]]:
  """Pass-2 jobs: unit u's documents of a split become that split's next shard.

  tfds refuses empty shards and splits, so a unit without documents of a split has no shard
  there, and a split without documents is simply absent.
  """
  per_unit = []
  for u, s in enumerate(scans):
    counts = dict(s["docs"])
    if forced is not None and forced[0] == u:
      counts[TRAIN] -= 1
      counts[VALIDATION] += 1
    per_unit.append({k: n for k, n in counts.items() if n})
  num_shards = {split: sum(split in c for c in per_unit) for split in (TRAIN, VALIDATION)}
  jobs, next_shard = [], dict.fromkeys(num_shards, 0)
  for u, (unit, s, counts) in enumerate(zip(units, scans, per_unit)):
    shards = {}
    for split in counts:
      shards[split] = tfds_builder.shard_path(dataset_dir, name, split, next_shard[split],
                                              num_shards[split])
      next_shard[split] += 1
    jobs.append({"files": unit, "shards": shards, "split_documents": counts,
                 "documents": s["documents"], "skip_counts": s["skip_counts"],
                 "forced": forced[1] if forced is not None and forced[0] == u else None})
  return jobs


def _combine_splits(written: list[dict]) -> tuple[dict, dict]:
  """metadata.json's per-split statistics and tfds's shard lengths, from the units' results."""
  splits_meta, shards_info = {}, {}
  for split in (TRAIN, VALIDATION):
    parts = [w[split] for w in written if split in w]
    if not parts:
      continue
    splits_meta[split] = {
        "documents": sum(p["documents"] for p in parts),
        "bytes": sum(p["bytes"] for p in parts),
        "sha256": hashlib.sha256("".join(p["sha256"] for p in parts).encode()).hexdigest()}
    shards_info[split] = {"shard_lengths": [p["documents"] for p in parts],
                          "num_bytes": sum(p["num_bytes"] for p in parts)}
  return splits_meta, shards_info


def _verify(dataset_dir: str, n_docs: int) -> None:
  """Re-open what tfds wrote, exactly as a reader will, before publishing it."""
  import tensorflow_datasets as tfds

  builder = tfds.builder_from_directory(dataset_dir)
  lengths = {s: builder.info.splits[s].num_examples for s in builder.info.splits}
  if sum(lengths.values()) != n_docs:
    raise DataError(f"written dataset has {lengths} documents, expected {n_docs} in total",
            location=dataset_dir)
  recorded = builder.info.metadata.get("splits", {})
  for split, n in lengths.items():
    if recorded.get(split, {}).get("documents") != n:
      raise DataError(f"split {split}: metadata disagrees with the shards",
              location=dataset_dir)
