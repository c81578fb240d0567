"""Build the embedded default corpus, FlexMix-mini (no download needed).

    python -m flexolmo_jax.build_flexmix_mini [--out=DIR] [--scale=1.0] [--overwrite]

DIR defaults to $FLEXOLMO_DATA_DIR/flexmix_mini (else ~/.cache/flexolmo_jax/flexmix_mini) and
receives DIR/{public,code,math,legal}/1.0.0, DIR/tokenizer.json, DIR/flexmix_mini.json and
DIR/README.md. See flexolmo_jax/data/flexmix_mini/build.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from flexolmo_jax.data.errors import DataError
from flexolmo_jax.data.flexmix_mini import build


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m flexolmo_jax.build_flexmix_mini",
                description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default=None, help=f"output directory (default {build.default_dir()})")
  p.add_argument("--scale", type=float, default=1.0,
          help="multiplies every domain's byte budget (tests use ~0.03)")
  p.add_argument("--vocab-size", type=int, default=8192)
  p.add_argument("--seq-len", type=int, default=512, help="pre-pack rows for this length")
  p.add_argument("--validation-fraction", type=float, default=0.1)
  p.add_argument("--seed", type=int, default=0, help="seed of the math generator")
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    stats = build.build_flexmix_mini(
      args.out, scale=args.scale, vocab_size=args.vocab_size, seq_len=args.seq_len,
      validation_fraction=args.validation_fraction, seed=args.seed,
      overwrite=args.overwrite)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(build.render_readme(stats))
  print(json.dumps({name: d["tokens"] for name, d in stats["domains"].items()}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
