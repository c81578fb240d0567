r"""Plan a training or evaluation step, or decoding, on a TPU topology, from a CPU machine.

  python -m flexolmo_jax.aot --config=configs/flexolmo_2x7b.py:math --topology=v5p:4x4x4 \
      --mode=train --per_device_batch=2
  python -m flexolmo_jax.aot --config=configs/flexolmo_8x7b.py --topology=v5p:2x2x2 \
      --mode=eval --seq_len=4096 --global_batch_size=8 [--config.mesh.fsdp=-1 ...]
  python -m flexolmo_jax.aot --config=configs/flexolmo_8x7b.py --topology=v5p:2x2x2 \
      --mode=decode --seq_len=4096 --global_batch_size=32 [--prompt_len=2048]

Needs libtpu (`pip install -e '.[tpu]'`). Prints per-chip memory against the chip's HBM,
executed and model FLOPs, collective bytes by kind, a roofline step time (a lower bound) and
an MFU estimate calibrated on one measured anchor (aot/calibration.py), then a one-line JSON
summary. --mode=decode: one decode step and the whole generate program with a KV cache of
seq_len slots per row (default batch 32), per-chip memory and a per-token roofline.
Exit status: 0 fits, 1 does not fit, 2 usage or setup error.
"""
from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from flexolmo_jax import cli

FLAGS = flags.FlagValues()

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:arg]).",
                                          lock_config=False, flag_values=FLAGS)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4, v6e:4x4.", flag_values=FLAGS)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "decode"], "Which step to compile.",
                          flag_values=FLAGS)
_SEQ = flags.DEFINE_integer("seq_len", None, "Sequence length (default: config.train.seq_len); "
                            "decode: the KV cache slots per row.", flag_values=FLAGS)
_PROMPT = flags.DEFINE_integer("prompt_len", None, "decode: prefill length of the generate "
                               "program (default seq_len / 2).", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("global_batch_size", None, "Global batch (sequences).", flag_values=FLAGS)
_PER_DEVICE = flags.DEFINE_integer("per_device_batch", None,
                                   "Sequences per chip (global batch = this x chips).", flag_values=FLAGS)
_HBM = flags.DEFINE_float("hbm_gb", None, "Plan against this much HBM per chip (GB) instead "
                          "of the chip's capacity (e.g. to keep headroom).", flag_values=FLAGS)
_EXTRAPOLATE = flags.DEFINE_bool("extrapolate", True, "Count FLOPs of every layer (compiles "
                                 "two small unrolled variants); off: the loop body once.", flag_values=FLAGS)
_SLICES = flags.DEFINE_integer("num_slices", 1, "Multislice: this many copies of the topology "
                               "(the mesh's data axis must be a multiple; collectives are "
                               "costed at ICI speed, so DCN time is underestimated).", flag_values=FLAGS)
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the summary JSON here.", flag_values=FLAGS)


def _main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  if _CONFIG.value is None or not _TOPOLOGY.value:
    print("error: --config and --topology are required", file=sys.stderr)
    sys.exit(2)
  from flexolmo_jax.aot.planner import AotUnavailable, plan, report
  try:
    result = plan(_CONFIG.value, _TOPOLOGY.value, _MODE.value, seq_len=_SEQ.value,
                  global_batch_size=_BATCH.value, per_device_batch=_PER_DEVICE.value,
                  hbm_gb=_HBM.value, extrapolate=_EXTRAPOLATE.value, num_slices=_SLICES.value,
                  prompt_len=_PROMPT.value)
  except (AotUnavailable, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(report(result))
  line = json.dumps(result)
  if _JSON_OUT.value:
    from flexolmo_jax.storage.atomic import write_text_atomic
    write_text_atomic(_JSON_OUT.value, line + "\n")
  print(line)
  sys.exit(0 if result["fits"] else 1)


def main(argv=None) -> int:
  return cli.run(_main, FLAGS, argv, __doc__)


if __name__ == "__main__":
  main()
