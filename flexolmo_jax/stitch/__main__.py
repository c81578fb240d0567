"""CLI: python -m flexolmo_jax.stitch (see flexolmo_jax/stitch/__init__.py)."""
from __future__ import annotations

import argparse
import logging
import sys

from flexolmo_jax.model.expert_mask import UnknownExpertError
from flexolmo_jax.storage.model_io import ModelDirError
from flexolmo_jax.storage.param_store import StoreError
from flexolmo_jax.storage.sources import SourceError
from flexolmo_jax.stitch.verify import StitchError

REFUSALS = (StitchError, SourceError, StoreError, UnknownExpertError, ModelDirError)


def _names(values) -> list[str]:
  return [n.strip() for v in values or [] for n in v.split(",") if n.strip()]


def parse(argv):
  p = argparse.ArgumentParser(
      prog="python -m flexolmo_jax.stitch",
      description="Stitch a public model and expert checkpoints into one FlexOlmo MoE, or "
                  "(with --model) drop experts from a stitched model.")
  p.add_argument("--public", help="public model: model directory or training workdir")
  p.add_argument("--expert", action="append", default=[], metavar="NAME=DIR",
                 help="an expert checkpoint (training workdir or model directory); repeat")
  p.add_argument("--model", help="prune mode: the stitched model to drop experts from")
  p.add_argument("--verify", metavar="DIR", help="recompute the sha256s of DIR/manifest.json")
  p.add_argument("--out", help="output model directory (written atomically)")
  p.add_argument("--top-k", type=int, default=None,
                 help="experts per token in the stitched model (default: min(4, #experts))")
  p.add_argument("--keep-bias", action="store_true",
                 help="keep each expert's learned router bias (default: drop it, as the "
                      "reference merge does)")
  p.add_argument("--drop", action="append", default=[], metavar="NAME[,NAME]",
                 help="experts to leave out (stitch) or remove physically (--model)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  p.add_argument("--workers", type=int, default=None, help="reader/writer threads (default 2)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = p.parse_args(argv)
  if args.verify:
    return args
  if not args.out:
    p.error("--out is required")
  if args.model and (args.public or args.expert):
    p.error("--model (prune) cannot be combined with --public/--expert")
  if not args.model and not args.public:
    p.error("--public and at least one --expert are required (or --model to prune)")
  return args


def main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  args = parse(sys.argv[1:] if argv is None else argv)
  from flexolmo_jax.storage.param_store import tune_malloc
  tune_malloc()
  from flexolmo_jax.stitch.writer import prune, stitch, verify
  try:
    if args.verify:
      man = verify(args.verify, progress=not args.no_progress)
      print(f"{args.verify}: all {len(man.get('shared_sha256', {}))} shared tensors and "
            f"{len(man.get('experts', []))} expert slots match manifest.json")
      return 0
    if args.model:
      out = prune(args.model, _names(args.drop), args.out, overwrite=args.overwrite,
                  workers=args.workers, progress=not args.no_progress)
    else:
      experts = []
      for spec in args.expert:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
          raise StitchError(f"--expert={spec!r}: expected NAME=DIR")
        experts.append((name, path))
      out = stitch(args.public, experts, args.out, top_k=args.top_k, keep_bias=args.keep_bias,
                   drop=_names(args.drop), overwrite=args.overwrite, workers=args.workers,
                   progress=not args.no_progress)
  except REFUSALS as e:
    print(f"stitch: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
