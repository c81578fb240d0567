r"""CLI: HuggingFace transformers <-> model directories, streaming and atomic.

  python -m flexolmo_jax.convert to_hf --ckpt=DIR --out=HF_DIR [--exclude=NAME,...]
      [--dtype=bfloat16|float32] [--drop-bias] [--max-shard-size=256MiB] [--tokenizer=PATH]
  python -m flexolmo_jax.convert from_hf --hf=HF_DIR --out=DIR [--param-dtype=float32]

torch is never needed: safetensors are read and written directly.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags

from flexolmo_jax import cli

FLAGS = flags.FlagValues()
COMMANDS = ("to_hf", "from_hf")
_CKPT = flags.DEFINE_string("ckpt", None, "to_hf: model dir / training workdir / stitched model.",
                            flag_values=FLAGS)
_HF = flags.DEFINE_string("hf", None, "from_hf: transformers FlexOlmo / OLMo-2 folder.",
                          flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output folder (written atomically).", flag_values=FLAGS)
_EXCLUDE = flags.DEFINE_string("exclude", "", "to_hf: comma-separated expert names to remove.",
                               flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", None, ["auto", "float32", "bfloat16", "float16"],
                           "to_hf: tensor dtype (default auto: as stored); from_hf: compute "
                           "dtype recorded in the config.", flag_values=FLAGS)
_DROP_BIAS = flags.DEFINE_bool("drop-bias", False, "to_hf: export a model with an active learned "
                               "expert bias without it (logits will differ).", flag_values=FLAGS)
_MAX_SHARD = flags.DEFINE_string("max-shard-size", "256MiB", "to_hf: safetensors shard size (host memory holds one).",
                                 flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "to_hf: tokenizer.json or a folder of "
                                 "tokenizer files (default: the model's own).", flag_values=FLAGS)
_PARAM_DTYPE = flags.DEFINE_enum("param-dtype", None, ["float32", "bfloat16", "float16"],
                                 "from_hf: storage dtype of the params (default: as in the "
                                 "files).", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.", flag_values=FLAGS)
_WORKERS = flags.DEFINE_integer("workers", 2, "Reader/writer threads.", flag_values=FLAGS)
_NO_PROGRESS = flags.DEFINE_bool("no-progress", False, "No progress bar.", flag_values=FLAGS)


def _main(argv) -> int:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"expected one command, {' or '.join(COMMANDS)} (got {argv[1:]})")
  command = argv[1]
  need = ("ckpt", "out") if command == "to_hf" else ("hf", "out")
  missing = [f"--{n}" for n in need if not FLAGS[n].value]
  if missing:
    raise app.UsageError(f"{command} needs {' and '.join(missing)}")
  if command == "from_hf" and _DTYPE.value == "auto":
    raise app.UsageError("from_hf --dtype: float32, bfloat16 or float16")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
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
  progress = not _NO_PROGRESS.value
  try:
    if command == "to_hf":
      from flexolmo_jax.convert.to_hf import to_hf
      out = to_hf(_CKPT.value, _OUT.value, exclude=cli.parse_names(_EXCLUDE.value),
                  dtype=_DTYPE.value or "auto", drop_bias=_DROP_BIAS.value,
                  max_shard_size=_MAX_SHARD.value, tokenizer=_TOKENIZER.value,
                  overwrite=_OVERWRITE.value, workers=_WORKERS.value, progress=progress)
    else:
      from flexolmo_jax.convert.from_hf import from_hf
      out = from_hf(_HF.value, _OUT.value, param_dtype=_PARAM_DTYPE.value, dtype=_DTYPE.value,
                    overwrite=_OVERWRITE.value, workers=_WORKERS.value, progress=progress)
  except refusals as e:
    print(f"convert {command}: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


def main(argv=None) -> int:
  return cli.run(_main, FLAGS, argv, __doc__)

if __name__ == "__main__":
  main()
