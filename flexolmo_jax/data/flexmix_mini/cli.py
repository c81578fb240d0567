"""Build the embedded default corpus, FlexMix-mini (no download needed).

    python -m flexolmo_jax.build_flexmix_mini [--out=DIR] [--scale=1.0] [--overwrite]

DIR defaults to $FLEXOLMO_DATA_DIR/flexmix_mini (else ~/.cache/flexolmo_jax/flexmix_mini) and
receives DIR/{public,code,math,legal}/1.0.0, DIR/tokenizer.json, DIR/flexmix_mini.json and
DIR/README.md. See flexolmo_jax/data/flexmix_mini/build.py.
"""
from __future__ import annotations

import json
import logging

from absl import flags

from flexolmo_jax import cli

FLAGS = flags.FlagValues()
_OUT = flags.DEFINE_string("out", None, "Output directory (default $FLEXOLMO_DATA_DIR/flexmix_mini "
                           "or ~/.cache/flexolmo_jax/flexmix_mini).", flag_values=FLAGS)
_SCALE = flags.DEFINE_float("scale", 1.0, "Multiplies every domain's byte budget (tests use "
                            "~0.03).", flag_values=FLAGS)
_VOCAB = flags.DEFINE_integer("vocab-size", 8192, "Tokenizer vocabulary size.", flag_values=FLAGS)
_SEQ_LEN = flags.DEFINE_integer("seq-len", 512, "Pre-pack rows for this length.",
                                flag_values=FLAGS)
_VAL = flags.DEFINE_float("validation-fraction", 0.1, "Share of documents held out.",
                          flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the math generator.", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild an existing corpus.",
                               flag_values=FLAGS)


def _main(argv) -> int:
  del argv
  from flexolmo_jax.data.flexmix_mini import build
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  stats = build.build_flexmix_mini(
      _OUT.value, scale=_SCALE.value, vocab_size=_VOCAB.value, seq_len=_SEQ_LEN.value,
      validation_fraction=_VAL.value, seed=_SEED.value, overwrite=_OVERWRITE.value)
  print(build.render_readme(stats))
  print(json.dumps({name: d["tokens"] for name, d in stats["domains"].items()}))
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, FLAGS, argv, __doc__)

if __name__ == "__main__":
  main()
