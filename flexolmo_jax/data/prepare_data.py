r"""Prepare one data owner's local files as a TFDS array_record dataset.

    python -m flexolmo_jax.prepare_data --name=NAME --input=PATH_OR_GLOB [--input=...] \
        --out=DATA_DIR [--text-field=text] [--validation-fraction=0.05] \
        [--tokenizer=tokenizer.json --seq-len=4096] \
        [--runner=auto|in_process|direct|DataflowRunner|... --num_workers=N \
         --beam_pipeline_options="--project=... --region=..."]

Writes DATA_DIR/NAME/1.0.0 (open with tfds.builder_from_directory), one array_record shard per
~256 MiB of input and split; with --tokenizer also the packed rows the loaders read
(DATA_DIR/NAME/1.0.0/packed/, sharded the same way), so training never tokenises. The work
runs in this process for small inputs and on an Apache Beam pipeline otherwise (DirectRunner
with N worker processes by default; pip install -e '.[beam]'); every runner writes the same
dataset. Exit status 0 on success, 1 on bad input (the message names the file and line), 2 on
bad arguments.
"""
from __future__ import annotations

import json
import logging

from absl import flags

from flexolmo_jax import cli

FLAGS = flags.FlagValues()
_NAME = flags.DEFINE_string("name", None, "Dataset name (lower_snake_case).", flag_values=FLAGS)
_INPUT = flags.DEFINE_multi_string(
    "input", None, "File, directory or glob; repeatable (.jsonl/.ndjson/.txt[.gz|.zst], "
    ".parquet).", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Data directory receiving NAME/1.0.0.", flag_values=FLAGS)
_TEXT_FIELD = flags.DEFINE_string("text-field", "text", "JSON field / parquet column.",
                                  flag_values=FLAGS)
_VAL = flags.DEFINE_float("validation-fraction", 0.05, "Share of documents held out.",
                          flag_values=FLAGS)
_STRICT = flags.DEFINE_bool("strict", False, "Every skippable record (bad JSON, missing field, "
                            "empty file...) is an error.", flag_values=FLAGS)
_MAX_SKIPPED = flags.DEFINE_float("max-skipped-fraction", 0.5,
                                  "Fail if more than this fraction of records is skipped.",
                                  flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing dataset.",
                               flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Also tokenize and pack now "
                                 "(tokenizer.json path).", flag_values=FLAGS)
_SEQ_LEN = flags.DEFINE_integer("seq-len", None, "Sequence length for --tokenizer.",
                                flag_values=FLAGS)
_RUNNER = flags.DEFINE_string(
    "runner", "auto", "in_process, direct (Beam DirectRunner, --num_workers processes) or any "
    "Beam runner name; auto: in_process below 64 MiB of input, else direct.",
    flag_values=FLAGS)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", None, "Beam workers (default: every CPU).",
                                    flag_values=FLAGS)
_BEAM_OPTIONS = flags.DEFINE_string(
    "beam_pipeline_options", "", "Extra Beam pipeline flags, e.g. \"--project=p --region=r\" "
    "(they override the runner's defaults).", flag_values=FLAGS)
_SHARD_BYTES = flags.DEFINE_integer(
    "shard-input-bytes", None, "Input bytes per work unit / output shard (default 256 MiB).",
    flag_values=FLAGS)
flags.mark_flags_as_required(["name", "input", "out"], flag_values=FLAGS)
flags.register_multi_flags_validator(
    ["tokenizer", "seq-len"], lambda d: (d["tokenizer"] is None) == (d["seq-len"] is None),
    "--tokenizer and --seq-len go together", flag_values=FLAGS)


def _main(argv) -> int:
  del argv
  from flexolmo_jax.data import catalog, packing, prepare
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # tfds's "Downloading..." is noise here
  logging.getLogger("apache_beam").setLevel(logging.ERROR)  # worker start-up chatter
  where = {"runner": _RUNNER.value, "num_workers": _NUM_WORKERS.value,
           "beam_options": _BEAM_OPTIONS.value}
  path = prepare.prepare_dataset(
      _NAME.value, _INPUT.value, _OUT.value, text_field=_TEXT_FIELD.value,
      validation_fraction=_VAL.value, strict=_STRICT.value,
      max_skipped_fraction=_MAX_SKIPPED.value, overwrite=_OVERWRITE.value,
      **({"shard_input_bytes": _SHARD_BYTES.value} if _SHARD_BYTES.value else {}), **where)
  stats = catalog.dataset_stats(path)
  if _TOKENIZER.value:
    for split in stats["num_examples"]:
      packed = packing.packed_split(path, split, _TOKENIZER.value, _SEQ_LEN.value, **where)
      stats.setdefault("packed", {})[split] = {
          "rows": packed.num_rows, "tokens": packed.num_tokens, "shards": len(packed.shards)}
  summary = {"dataset": path, "documents": stats["num_examples"],
             "bytes": {s: v["bytes"] for s, v in stats["splits"].items()},
             "skipped": stats["skipped"]["by_reason"],
             **({"packed": stats["packed"]} if "packed" in stats else {})}
  print(json.dumps(summary))
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, FLAGS, argv, __doc__)

if __name__ == "__main__":
  main()
