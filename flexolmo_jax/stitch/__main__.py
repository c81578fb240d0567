"""CLI: python -m flexolmo_jax.stitch (see flexolmo_jax/stitch/__init__.py)."""
from __future__ import annotations

import logging
import sys

from absl import app, flags

from flexolmo_jax import cli, stitch as _package
from flexolmo_jax.model.expert_mask import UnknownExpertError
from flexolmo_jax.storage.model_io import ModelDirError
from flexolmo_jax.storage.param_store import StoreError
from flexolmo_jax.storage.sources import SourceError
from flexolmo_jax.stitch.verify import StitchError

REFUSALS = (StitchError, SourceError, StoreError, UnknownExpertError, ModelDirError)

FLAGS = flags.FlagValues()
_PUBLIC = flags.DEFINE_string("public", None, "Public model: model directory or training workdir.",
                              flag_values=FLAGS)
_EXPERT = flags.DEFINE_multi_string("expert", [], "NAME=DIR: an expert checkpoint (workdir or "
                                    "model directory); repeat.", flag_values=FLAGS)
_MODEL = flags.DEFINE_string("model", None, "Prune mode: the stitched model to drop experts from.",
                             flag_values=FLAGS)
_VERIFY = flags.DEFINE_string("verify", None, "Recompute the sha256s of DIR/manifest.json.",
                              flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output model directory (written atomically).",
                           flag_values=FLAGS)
_TOP_K = flags.DEFINE_integer("top-k", None, "Experts per token in the stitched model (default: "
                              "min(4, #experts)).", flag_values=FLAGS)
_KEEP_BIAS = flags.DEFINE_bool("keep-bias", False, "Keep each expert's learned router bias "
                               "(default: drop it, as the reference merge does).",
                               flag_values=FLAGS)
_SHARED_TOL = flags.DEFINE_float("shared-tolerance", 0.0, "ATOL: accept shared tensors and public "
                                 "halves within max |difference| ATOL of the public model's "
                                 "(e.g. 1e-3 for bf16 noise; its copy is used, manifest.json "
                                 "records each max difference); 0 = bitwise.", flag_values=FLAGS)
_DROP = flags.DEFINE_multi_string("drop", [], "NAME[,NAME]: experts to leave out (stitch) or "
                                  "remove physically (--model).", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.", flag_values=FLAGS)
_WORKERS = flags.DEFINE_integer("workers", None, "Reader/writer threads (default 2).",
                                flag_values=FLAGS)
_NO_PROGRESS = flags.DEFINE_bool("no-progress", False, "No progress bar.", flag_values=FLAGS)


def _main(argv) -> int:
  del argv
  if not _VERIFY.value:
    if not _OUT.value:
      raise app.UsageError("--out is required")
    if _MODEL.value and (_PUBLIC.value or _EXPERT.value):
      raise app.UsageError("--model (prune) cannot be combined with --public/--expert")
    if not _MODEL.value and not _PUBLIC.value:
      raise app.UsageError("--public and at least one --expert are required (or --model to "
                           "prune)")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  from flexolmo_jax.storage.param_store import tune_malloc
  tune_malloc()
  from flexolmo_jax.stitch.writer import prune, stitch, verify
  progress = not _NO_PROGRESS.value
  try:
    if _VERIFY.value:
      man = verify(_VERIFY.value, progress=progress)
      print(f"{_VERIFY.value}: all {len(man.get('shared_sha256', {}))} shared tensors and "
            f"{len(man.get('experts', []))} expert slots match manifest.json")
      return 0
    if _MODEL.value:
      out = prune(_MODEL.value, cli.parse_names_list(_DROP.value), _OUT.value,
                  overwrite=_OVERWRITE.value, workers=_WORKERS.value, progress=progress)
    else:
      experts = []
      for spec in _EXPERT.value:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
          raise StitchError(f"--expert={spec!r}: expected NAME=DIR")
        experts.append((name, path))
      out = stitch(_PUBLIC.value, experts, _OUT.value, top_k=_TOP_K.value,
                   keep_bias=_KEEP_BIAS.value, drop=cli.parse_names_list(_DROP.value),
                   overwrite=_OVERWRITE.value, workers=_WORKERS.value, progress=progress,
                   shared_tolerance=_SHARED_TOL.value)
  except REFUSALS as e:
    print(f"stitch: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


def main(argv=None) -> int:
  return cli.run(_main, FLAGS, argv, _package.__doc__)  # the usage is documented there

if __name__ == "__main__":
  main()
