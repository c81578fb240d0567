"""The documents dataset as TFDS writes it: sharded ``array_record`` files plus TFDS metadata.

Each work unit serialises its documents with the dataset's ``FeaturesDict`` and writes its own
shard through TFDS's array_record file adapter; the driver then records the splits with
``tfds.folder_dataset.write_metadata``, TFDS's API for shards written by an external pipeline.
The result is an ordinary TFDS dataset directory (``dataset_info.json``, ``features.json``,
``metadata.json``, ``NAME-SPLIT.array_record-XXXXX-of-YYYYY``): it opens with
``tfds.builder_from_directory(path)`` and ``builder.as_data_source(split)``, without TensorFlow.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from flexolmo_jax.storage import paths

log = logging.getLogger(__name__)

VERSION = "1.0.0"
FEATURES = {"text": "document text (UTF-8)", "source": "file:line the document came from"}
_SUFFIX = "array_record"


@functools.cache
def features():
  import tensorflow_datasets as tfds

  return tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                     "source": tfds.features.Text()})


def _template(dataset_dir, name: str, split: str | None = None):
  from tensorflow_datasets.core import naming

  return naming.ShardedFileTemplate(data_dir=epath.Path(dataset_dir), dataset_name=name,
                                    split=split, filetype_suffix=_SUFFIX)


def shard_path(dataset_dir, name: str, split: str, index: int, num_shards: int) -> str:
  """TFDS's file name for shard ``index`` of ``num_shards`` of ``split``."""
  return os.fspath(_template(dataset_dir, name, split).sharded_filepath(
      shard_index=index, num_shards=num_shards))


class ShardWriter:
  """Serialises documents with the dataset's features into one shard file, counting them.

  Written with the options TFDS's ArrayRecordFileAdapter uses (group_size:1: every record is
  randomly accessible), but record by record, so that one pass over a unit's inputs can fill
  its train and validation shards together without holding either in memory.
  array_record's writer takes local file names only (its reader opens gs:// itself), so the
  shard is written to a local temporary file and copied to `path` (any epath) on close.
  """

  def __init__(self, path: str):
    from array_record.python.array_record_module import ArrayRecordWriter

    self.path = path
    self.num_examples = 0
    self.num_bytes = 0  # serialised size: what tfds records as the split's num_bytes
    self._local = contextlib.ExitStack()
    local = self._local.enter_context(paths.local_file(path, suffix=".array_record"))
    self._records = ArrayRecordWriter(local, "group_size:1")

  def add(self, example: Mapping[str, str]) -> None:
    data = features().serialize_example(example)
    self._records.write(data)
    self.num_examples += 1
    self.num_bytes += len(data)

  def close(self) -> None:
    self._records.close()
    self._local.close()  # copies the shard to its destination


def write_dataset_info(dataset_dir, name: str, splits: Mapping[str, dict[str, Any]],
                       description: str, metadata: dict[str, Any]) -> str:
  """Writes the TFDS metadata for shards already in DATASET_DIR and returns that directory.

  ``splits``: {split: {"shard_lengths": [...], "num_bytes": int}}; ``metadata``
  (JSON-serialisable) is stored as ``metadata.json`` and read back as ``builder.info.metadata``.
  """
  import tensorflow_datasets as tfds

  split_infos = [tfds.core.SplitInfo(name=split, shard_lengths=list(s["shard_lengths"]),
                                     num_bytes=int(s["num_bytes"]),
                                     filename_template=_template(dataset_dir, name, split))
                 for split, s in splits.items()]
  chatter = io.StringIO()  # tfds prints progress on stdout, which belongs to the CLI's summary
  with contextlib.redirect_stdout(chatter):
    tfds.folder_dataset.write_metadata(
        data_dir=epath.Path(dataset_dir), features=features(), split_infos=split_infos,
        filename_template=_template(dataset_dir, name), version=VERSION, check_data=False,
        description=description,
        # Keep input order: the split is already decided by a content hash, and the packed
        # token stream is shuffled later at row level.
        disable_shuffling=True, metadata=tfds.core.MetadataDict(metadata))
  log.debug("tfds: %s", chatter.getvalue().strip())
  return os.fspath(dataset_dir)


def shard_lengths(dataset_dir: str, split: str) -> Sequence[int]:
  import tensorflow_datasets as tfds

  return tfds.builder_from_directory(dataset_dir).info.splits[split].shard_lengths
