"""Evaluate a model directory: perplexity per domain, multiple-choice tasks, expert opt-out.

  python -m flexolmo_jax.evaluate --ckpt=DIR --data=DATA [--tasks=a.jsonl,b.jsonl]
      [--exclude=NAME,... | --opt-out-matrix] --out=OUT [--seq_len=N --batch_size=N]

--ckpt   a model directory (stitched, exported, converted) or a training workdir (its export/)
--data   'name=DATASET,...', one prepared dataset, or a directory of them (one domain per
         subdirectory; DATA/tokenizer.json is used when present, else pass --tokenizer)
--tasks  multiple-choice JSONL files (format: flexolmo_jax/evaluate/multiple_choice.py)
Writes OUT/results.json, OUT/results.md and OUT/routing.png (share of tokens per expert,
per domain and layer). Multi-host: run the same command on every host (TPU pods initialise
jax.distributed themselves; elsewhere --coordinator_address/--num_processes/--process_id).
Exit status: 0 done, 1 bad input (unknown expert, missing files), 2 usage.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
  ap = argparse.ArgumentParser(prog="python -m flexolmo_jax.evaluate",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--ckpt", required=True)
  ap.add_argument("--data", default=None)
  ap.add_argument("--tasks", default="", help="comma-separated JSONL files")
  ap.add_argument("--tokenizer", default=None)
  group = ap.add_mutually_exclusive_group()
  group.add_argument("--exclude", default="", help="experts opted out, comma-separated")
  group.add_argument("--opt-out-matrix", "--opt_out_matrix", dest="opt_out_matrix",
                     action="store_true",
                     help="rows: all experts, each expert opted out, public only")
  ap.add_argument("--out", required=True)
  ap.add_argument("--seq_len", type=int, default=None)
  ap.add_argument("--batch_size", type=int, default=8, help="global batch (sequences)")
  ap.add_argument("--split", default="validation")
  ap.add_argument("--max_batches", type=int, default=None, help="per domain")
  ap.add_argument("--mesh", default="fsdp=-1", help="e.g. data=2,fsdp=-1,tensor=1")
  ap.add_argument("--dispatch", choices=("dense", "capacity", "dropless"), default=None,
                  help="override the model's MoE dispatch")
  ap.add_argument("--param_dtype", choices=("float32", "bfloat16"), default=None,
                  help="cast weights when loading (bfloat16 halves their memory)")
  ap.add_argument("--no_routing", action="store_true", help="skip routing statistics")
  ap.add_argument("--coordinator_address", default=None)
  ap.add_argument("--num_processes", type=int, default=None)
  ap.add_argument("--process_id", type=int, default=None)
  ap.add_argument("--distributed", choices=("auto", "on", "off"), default="auto")
  ap.add_argument("--cpu_devices", type=int, default=None, help="CPU devices (testing)")
  return ap.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from flexolmo_jax import cli
  from flexolmo_jax.parallel.distributed import init_distributed
  init_distributed(args.coordinator_address, args.num_processes, args.process_id,
                           args.distributed, args.cpu_devices)
  import jax
  from flexolmo_jax.data import DataError
  from flexolmo_jax.evaluate.report import markdown, write_all
  from flexolmo_jax.evaluate.run import EvalOptions, evaluate
  from flexolmo_jax.storage.model_io import ModelDirError
  try:
    opts = EvalOptions(
        ckpt=args.ckpt, data=args.data, tasks=cli.parse_names(args.tasks),
        tokenizer=args.tokenizer, exclude=cli.parse_names(args.exclude),
        opt_out_matrix=args.opt_out_matrix, seq_len=args.seq_len, batch_size=args.batch_size,
        split=args.split, max_batches=args.max_batches, mesh=cli.parse_mesh(args.mesh),
        dispatch=args.dispatch, param_dtype=args.param_dtype, routing=not args.no_routing)
    results = evaluate(opts)
  except (DataError, ModelDirError, ValueError) as e:  # UnknownExpertError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 1
  if jax.process_index() == 0:
    files = write_all(results, args.out)
    print(markdown(results))
    print("wrote " + ", ".join(files.values()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
