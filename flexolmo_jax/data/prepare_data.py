"""Prepare one data owner's local files as a TFDS array_record dataset.

    python -m flexolmo_jax.prepare_data --name=NAME --input=PATH_OR_GLOB [--input=...] \
        --out=DATA_DIR [--text-field=text] [--validation-fraction=0.05] \
        [--tokenizer=tokenizer.json --seq-len=4096]

Writes DATA_DIR/NAME/1.0.0 (open with tfds.builder_from_directory). Exit status 0 on success,
1 on bad input (the message names the file and line), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from flexolmo_jax.data import catalog, packing, prepare
from flexolmo_jax.data.errors import DataError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m flexolmo_jax.prepare_data",
                description=__doc__.split("\n\n")[0])
  p.add_argument("--name", required=True, help="dataset name (lower_snake_case)")
  p.add_argument("--input", action="append", required=True, metavar="PATH_OR_GLOB",
          help="file, directory or glob; repeatable. .jsonl/.ndjson[.gz|.zst], "
            ".txt[.gz|.zst] (one document per file), .parquet")
  p.add_argument("--out", required=True, metavar="DATA_DIR")
  p.add_argument("--text-field", default="text", help="JSON field / parquet column")
  p.add_argument("--validation-fraction", type=float, default=0.05)
  p.add_argument("--strict", action="store_true",
          help="treat every skippable record (bad JSON, invalid UTF-8, missing field, "
            "empty file) as an error")
  p.add_argument("--max-skipped-fraction", type=float, default=0.5,
          help="fail if more than this fraction of records is skipped")
  p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
  p.add_argument("--tokenizer", help="also tokenize and pack now (tokenizer.json path)")
  p.add_argument("--seq-len", type=int, help="sequence length for --tokenizer")
  args = p.parse_args(argv)
  if (args.tokenizer is None) != (args.seq_len is None):
    p.error("--tokenizer and --seq-len go together")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # tfds's "Downloading..." is noise here
  try:
    path = prepare.prepare_dataset(
      args.name, args.input, args.out, text_field=args.text_field,
      validation_fraction=args.validation_fraction, strict=args.strict,
      max_skipped_fraction=args.max_skipped_fraction, overwrite=args.overwrite)
    stats = catalog.dataset_stats(path)
    if args.tokenizer:
      for split in stats["num_examples"]:
        packed = packing.packed_split(path, split, args.tokenizer, args.seq_len)
        stats.setdefault("packed", {})[split] = {
          "rows": packed.num_rows, "tokens": packed.num_tokens}
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  summary = {"dataset": path, "documents": stats["num_examples"],
        "bytes": {s: v["bytes"] for s, v in stats["splits"].items()},
        "skipped": stats["skipped"]["by_reason"], **({"packed": stats["packed"]}
                               if "packed" in stats else {})}
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
