"""CLI: HuggingFace transformers <-> model directories, streaming and atomic.

  python -m flexolmo_jax.convert to_hf --ckpt=DIR --out=HF_DIR [--exclude=NAME,...]
      [--dtype=bfloat16|float32] [--drop-bias] [--max-shard-size=2GiB] [--tokenizer=PATH]
  python -m flexolmo_jax.convert from_hf --hf=HF_DIR --out=DIR [--param-dtype=float32]

torch is never needed: safetensors are read and written directly.
"""
from __future__ import annotations

import argparse
import logging
import sys


def parse(argv):
  p = argparse.ArgumentParser(prog="python -m flexolmo_jax.convert",
                              description="Convert between transformers folders and model dirs.")
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("to_hf", help="model dir / training workdir / stitched model -> transformers")
  t.add_argument("--ckpt", required=True)
  t.add_argument("--out", required=True)
  t.add_argument("--exclude", default="", help="comma-separated expert names to remove")
  t.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                 help="tensor dtype in the safetensors (auto: as stored)")
  t.add_argument("--drop-bias", action="store_true",
                 help="export a model trained with an active learned expert bias without it "
                      "(transformers cannot represent it; logits will differ)")
  t.add_argument("--max-shard-size", default="2GiB")
  t.add_argument("--tokenizer", default=None,
                 help="tokenizer.json or a folder of tokenizer files (default: the model's own)")
  f = sub.add_parser("from_hf", help="transformers FlexOlmo / OLMo-2 folder -> model dir")
  f.add_argument("--hf", required=True)
  f.add_argument("--out", required=True)
  f.add_argument("--param-dtype", default=None, choices=[None, "float32", "bfloat16", "float16"],
                 help="storage dtype of the imported params (default: as in the HF files)")
  f.add_argument("--dtype", default=None, help="compute dtype recorded in the config")
  for s in (t, f):
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  args = parse(sys.argv[1:] if argv is None else argv)
  from flexolmo_jax.storage.param_store import tune_malloc
  tune_malloc()
  from flexolmo_jax.convert.hf_mapping import MappingError
  from flexolmo_jax.convert.safetensors_io import SafetensorsError
  from flexolmo_jax.convert.to_hf import ConvertError
  from flexolmo_jax.model.expert_mask import UnknownExpertError
  from flexolmo_jax.storage.model_io import ModelDirError
  from flexolmo_jax.storage.param_store import StoreError
  from flexolmo_jax.storage.sources import SourceError
  refusals = (ConvertError, MappingError, SafetensorsError, UnknownExpertError, ModelDirError,
              StoreError, SourceError)
  try:
    if args.command == "to_hf":
      from flexolmo_jax.convert.to_hf import to_hf
      out = to_hf(args.ckpt, args.out, exclude=[n for n in args.exclude.split(",") if n],
                  dtype=args.dtype, drop_bias=args.drop_bias, max_shard_size=args.max_shard_size,
                  tokenizer=args.tokenizer, overwrite=args.overwrite, workers=args.workers,
                  progress=not args.no_progress)
    else:
      from flexolmo_jax.convert.from_hf import from_hf
      out = from_hf(args.hf, args.out, param_dtype=args.param_dtype, dtype=args.dtype,
                    overwrite=args.overwrite, workers=args.workers,
                    progress=not args.no_progress)
  except refusals as e:
    print(f"convert {args.command}: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
