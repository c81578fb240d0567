"""Local files -> a TFDS (array_record) dataset with deterministic train/validation splits.

Three passes over the inputs, so memory stays flat whatever the corpus size:
  1. scan: read and validate everything, count documents, bytes and skips. Every fatal input
     problem (truncated archive, missing column, ...) surfaces here, before anything is written.
  2./3. tfds writes the train split, then the validation split, re-reading the inputs. The
     record counts must match the scan, which catches files that changed underneath us.
The dataset is built in a hidden staging directory and renamed into place only when complete.

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
from collections.abc import Iterator, Sequence
from typing import Any

from flexolmo_jax.data import readers, tfds_builder
from flexolmo_jax.storage import atomic
from flexolmo_jax.data.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "flexolmo_jax.documents/1"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
TRAIN, VALIDATION = "train", "validation"


def split_value(text: str) -> float:
  """Uniform in [0, 1), a pure function of the text."""
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


class _SplitRule:
  def __init__(self, fraction: float, forced_validation: int | None):
    self.fraction = fraction
    # With few documents the hash rule can select none; then the document with the
    # smallest hash value (still a pure function of the content) is moved to validation.
    self.forced = forced_validation

  def __call__(self, ordinal: int, text: str) -> str:
    if ordinal == self.forced or split_value(text) < self.fraction:
      return VALIDATION
    return TRAIN


def _scan(files: list[readers.InputFile], text_field: str, fraction: float,
     strict: bool) -> dict[str, Any]:
  skips = readers.SkipLog(strict)
  per_file = []
  docs = {TRAIN: 0, VALIDATION: 0}
  nbytes = {TRAIN: 0, VALIDATION: 0}
  ordinal = 0
  best = (2.0, None)  # (smallest split value, its ordinal)
  for f in files:
    skipped_before = skips.total
    n_file = 0
    for doc in readers.iter_documents([f], text_field, skips):
      u = split_value(doc.text)
      split = VALIDATION if u < fraction else TRAIN
      docs[split] += 1
      nbytes[split] += len(doc.text.encode("utf-8"))
      best = min(best, (u, ordinal))
      ordinal += 1
      n_file += 1
    per_file.append({"path": f.path, "bytes_on_disk": os.path.getsize(f.path),
             "documents": n_file, "skipped": skips.total - skipped_before})
    log.info("scanned %s: %d documents, %d skipped", f.path, n_file,
         skips.total - skipped_before)
  forced = None
  if fraction > 0 and docs[VALIDATION] == 0 and ordinal >= 2:
    forced = best[1]
  return {"files": per_file, "docs": docs, "bytes": nbytes, "total_docs": ordinal,
      "forced": forced, "skips": skips}


def prepare_dataset(name: str, inputs: Sequence[str], out_dir: str, *, text_field: str = "text",
          validation_fraction: float = 0.05, strict: bool = False,
          max_skipped_fraction: float = 0.5, overwrite: bool = False,
          description: str | None = None, relative_to: str | None = None) -> str:
  """Builds OUT_DIR/NAME/1.0.0 (an array_record TFDS dataset) and returns its path.

  Raises DataError (naming file and line) on unusable input; in that case nothing is written.
  ``relative_to``: record input paths relative to this directory (portable provenance).
  """
  def show(location: str) -> str:
    if relative_to and location.startswith(os.path.abspath(relative_to) + os.sep):
      return location[len(os.path.abspath(relative_to)) + 1:]
    return location

  if not _NAME_RE.match(name):
    raise DataError(f"dataset name {name!r} must match {_NAME_RE.pattern} (tfds naming)")
  if not 0.0 <= validation_fraction < 1.0:
    raise DataError(f"validation fraction must be in [0, 1), got {validation_fraction}")
  files = readers.resolve_inputs(inputs)
  target = os.path.join(os.path.abspath(out_dir), name, tfds_builder.VERSION)
  atomic.check_target(target, overwrite, DataError)  # fail now, not after hours of work

  scan = _scan(files, text_field, validation_fraction, strict)
  skips: readers.SkipLog = scan["skips"]
  n_docs = scan["total_docs"]
  seen = n_docs + skips.total
  if n_docs == 0:
    raise DataError(f"no usable documents in {len(files)} input file(s); skipped: "
            f"{dict(skips.counts)}; first: {skips.examples[:3]}")
  if skips.total / seen > max_skipped_fraction:
    raise DataError(
      f"{skips.total} of {seen} records skipped ({dict(skips.counts)}), more than the "
      f"allowed fraction {max_skipped_fraction}; first: {skips.examples[:3]}. "
      f"Wrong --text-field? Raise --max-skipped-fraction to accept this.")
  if scan["forced"] is not None:
    log.warning("hash split selected no validation document; moved document #%d",
          scan["forced"])
  rule = _SplitRule(validation_fraction, scan["forced"])
  n_val = scan["docs"][VALIDATION] + (scan["forced"] is not None)
  if n_val == n_docs:
    raise DataError(f"all {n_docs} documents fell into the validation split; "
            f"lower the validation fraction ({validation_fraction})")
  # tfds refuses empty splits, so a split with no documents is simply absent.
  splits = [TRAIN] + ([VALIDATION] if n_val else [])

  def examples(split: str) -> Iterator[dict[str, str]]:
    again = readers.SkipLog(strict)
    ordinal = 0
    for doc in readers.iter_documents(files, text_field, again):
      if rule(ordinal, doc.text) == split:
        yield {"text": doc.text, "source": show(doc.location)}
      ordinal += 1
    if ordinal != n_docs or again.counts != skips.counts:
      raise DataError(f"input files changed while preparing ({n_docs} documents at scan, "
              f"{ordinal} now); nothing was written")

  metadata = {
    "format": FORMAT,
    "name": name,
    "text_field": text_field,
    "validation_fraction": validation_fraction,
    "split_rule": "validation iff sha256(utf8 text)[:8] / 2**64 < validation_fraction"
           + (f"; document #{scan['forced']} forced to validation"
             if scan["forced"] is not None else ""),
    "inputs": [{**f, "path": show(f["path"])} for f in scan["files"]],
    "records_seen": seen,
    "skipped": {"total": skips.total, "by_reason": dict(sorted(skips.counts.items())),
          "examples": [{**e, "location": show(e["location"])}
                 for e in skips.examples]},
  }
  with atomic.staged_directory(target, overwrite, error=DataError) as stage:
    built = tfds_builder.write_documents_dataset(
      name, str(stage.root), {split: functools.partial(examples, split) for split in splits},
      description=description or f"{name}: documents prepared by flexolmo_jax",
      metadata=metadata)
    _verify(built, n_docs)
    stage.payload = built
  log.info("wrote %s", target)
  return target


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
