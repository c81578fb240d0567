"""Checkpoint stitcher: merge independently trained experts, drop experts, verify provenance.

  python -m flexolmo_jax.stitch --public=DIR --expert=NAME=DIR [...] --out=DIR [--top-k=K]
      [--keep-bias] [--drop=NAME,...] [--shared-tolerance=ATOL]
  python -m flexolmo_jax.stitch --model=STITCHED --drop=NAME[,NAME] --out=DIR   # prune
  python -m flexolmo_jax.stitch --verify=DIR                                      # sha256s
"""
from flexolmo_jax.storage.sources import Source, SourceError, resolve
from flexolmo_jax.stitch.verify import StitchError
from flexolmo_jax.stitch.writer import prune, stitch, verify

__all__ = ["stitch", "prune", "verify", "resolve", "Source", "SourceError", "StitchError"]
