"""A TFDS builder for plain-text documents, written as ``array_record`` without TensorFlow.

The output is an ordinary TFDS dataset directory (``dataset_info.json``, ``features.json``,
``metadata.json``, ``NAME-SPLIT.array_record-XXXXX-of-YYYYY``), so it opens with
``tfds.builder_from_directory(path)`` and ``builder.as_data_source(split)``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

VERSION = "1.0.0"
FEATURES = {"text": "document text (UTF-8)", "source": "file:line the document came from"}


class _DocumentsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents from caller-supplied generators, one per split, in generator order."""

  VERSION = tfds.core.Version(VERSION)
  # tfds derives code_path from the package through `importlib_resources`, which it does not
  # declare as a dependency on Python >= 3.9; nothing here needs a code path (no checksums,
  # no downloads), so opting out avoids that import.
  code_path = None

  def __init__(self, *, split_examples: Mapping[str, Callable[[], Iterator[dict[str, str]]]],
               description: str, metadata: dict[str, Any], **kwargs):
    self._split_examples = split_examples
    self._description = description
    self._metadata = metadata
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self._description,
        features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "source": tfds.features.Text()}),
        # Keep input order: the split is already decided by a content hash, and the
        # packed token stream is shuffled later at row level.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(self._metadata),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._enumerate(split, make)
            for split, make in self._split_examples.items()}

  def _generate_examples(self):  # required abstract method; splits come from _enumerate
    raise NotImplementedError

  def _enumerate(self, split: str, make):
    # Per-split counts and an order-sensitive content digest, written into metadata.json
    # (tfds writes metadata after generation) so the caller can check them and caches of
    # derived data (packed tokens) can be keyed on exactly this content.
    digest = hashlib.sha256()
    n_docs = n_bytes = 0
    for i, example in enumerate(make()):
      data = example["text"].encode("utf-8")
      digest.update(hashlib.sha256(data).digest())
      n_docs += 1
      n_bytes += len(data)
      yield i, example
    self.info.metadata.setdefault("splits", {})[split] = {
        "documents": n_docs, "bytes": n_bytes, "sha256": digest.hexdigest()}


def write_documents_dataset(name: str, data_dir: str,
                            split_examples: Mapping[str, Callable[[], Iterator[dict[str, str]]]],
                            description: str, metadata: dict[str, Any]) -> str:
  """Writes DATA_DIR/NAME/VERSION in array_record format and returns that directory.

  ``metadata`` (JSON-serialisable) is stored as ``metadata.json`` and read back as
  ``builder.info.metadata``.
  """
  # The builder's dataset name is a class attribute; a throw-away subclass per name keeps
  # tfds's global registry untouched.
  cls = types.new_class(f"Documents_{name}", (_DocumentsBuilder,), {"skip_registration": True},
                        lambda ns: ns.update(name=name, __module__=__name__))
  builder = cls(split_examples=split_examples, description=description, metadata=metadata,
                data_dir=data_dir, file_format="array_record")
  tfds.disable_progress_bar()
  # tfds prints "Downloading and preparing dataset..." on stdout; nothing is downloaded, and
  # stdout belongs to the CLI's JSON summary.
  chatter = io.StringIO()
  with contextlib.redirect_stdout(chatter):
    builder.download_and_prepare()
  log.debug("tfds: %s", chatter.getvalue().strip())
  return str(builder.data_dir)
