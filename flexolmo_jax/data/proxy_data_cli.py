r"""Proxy data for router tuning, sampled from an owner's model instead of read from its data.

  python -m flexolmo_jax.proxy_data --model=EXPERT_DIR --name=proxy_math --out=DATA_DIR \
      --tokenizer=tokenizer.json [--samples=64 --max_new_tokens=128 --temperature=1.0 \
      --top_p=0.95 --seed=0]

Router tuning (FLEXOLMO.md section 1.4) needs text that looks like each closed domain, but the
coordinator never sees the owners' data. What it does hold is each owner's 2-expert model,
which already left the owner to be stitched; sampling from it gives text in that domain's
style without any document changing hands. Samples start from EOS (a document boundary in
training) and are written as an ordinary prepared dataset DATA_DIR/NAME/1.0.0, so the router
stage reads them like any other source. Samples are cut at EOS into documents.
"""
from __future__ import annotations

import json

from absl import flags

from flexolmo_jax import cli

FLAGS = flags.FlagValues()
_CONFIG = cli.define_runtime_config(FLAGS)  # mesh/axis_rules: sampling runs on one host today
_MODEL = flags.DEFINE_string("model", None, "The owner's exported 2-expert model dir.",
                             flag_values=FLAGS)
_NAME = flags.DEFINE_string("name", None, "Dataset name, e.g. proxy_math.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Data directory receiving NAME/1.0.0.", flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json.", flag_values=FLAGS)
_SAMPLES = flags.DEFINE_integer("samples", 64, "Samples to draw.", flag_values=FLAGS)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens per sample.", flag_values=FLAGS)
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.", flag_values=FLAGS)
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus mass.", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=FLAGS)
_EXCLUDE = flags.DEFINE_string("exclude", "public", "Experts opted out while sampling.",
                               flag_values=FLAGS)
flags.mark_flags_as_required(["model", "name", "out", "tokenizer"], flag_values=FLAGS)


def _main(argv) -> int:
  del argv
  from flexolmo_jax.data.proxy_data import sample_documents, write_dataset
  from flexolmo_jax.storage.sources import resolve_model_dir
  model = resolve_model_dir(_MODEL.value)  # errors: cli.run prints them, exit 1
  docs = sample_documents(model, _TOKENIZER.value, _SAMPLES.value, _MAX_NEW.value,
                          _TEMPERATURE.value, _TOP_P.value, _SEED.value,
                          tuple(cli.parse_names(_EXCLUDE.value)))
  path = write_dataset(docs, _NAME.value, _OUT.value)
  print(json.dumps({"dataset": path, "documents": len(docs)}))
  return 0


def main(argv=None) -> int:
  return cli.run(_main, FLAGS, argv, __doc__)


if __name__ == "__main__":
  main()
