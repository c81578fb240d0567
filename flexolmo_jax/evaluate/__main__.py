"""Evaluate a model directory: perplexity per domain, multiple-choice tasks, expert opt-out.

  python -m flexolmo_jax.evaluate --ckpt=DIR --data=DATA [--tasks=a.jsonl,b.jsonl]
      [--exclude=NAME,... | --opt-out-matrix] --out=OUT [--seq_len=N --batch_size=N] [--top_k=K]
      [--extraction=train --extraction_docs=32 --extraction_prefix=32 --extraction_tokens=256]

--ckpt   a model directory (stitched, exported, converted) or a training workdir (its export/)
--data   'name=DATASET,...', one prepared dataset, or a directory of them (one domain per
         subdirectory; DATA/tokenizer.json is used when present, else pass --tokenizer)
--tasks  multiple-choice JSONL files (format: flexolmo_jax/evaluate/multiple_choice.py)
--extraction SPLIT: verbatim extraction of that split's documents of every --data domain,
         for every row (evaluate/extraction.py; the reference's protocol is the default:
         32-token prefix, 256 greedy tokens, normalised Levenshtein similarity >= 0.9).
         --noperplexity skips perplexity (extraction and tasks only).
Writes OUT/results.json, OUT/results.md and OUT/routing.png (share of tokens per expert,
per domain and layer). Multi-host: run the same command on every host (TPU pods initialise
jax.distributed themselves; elsewhere --coordinator_address/--num_processes/--process_id).
Exit status: 0 done, 1 bad input (unknown expert, missing files), 2 usage.
"""
from __future__ import annotations

from absl import flags

from flexolmo_jax import cli

FLAGS = flags.FlagValues()
_CONFIG = cli.define_runtime_config(FLAGS)
_CKPT = flags.DEFINE_string("ckpt", None, "Model directory or training workdir.", flag_values=FLAGS)
_DATA = flags.DEFINE_string("data", None, "'name=DATASET,...', one dataset, or a directory of them.",
                            flag_values=FLAGS)
_TASKS = flags.DEFINE_string("tasks", "", "Comma-separated multiple-choice JSONL files.",
                             flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json (default DATA/tokenizer.json).",
                                 flag_values=FLAGS)
_EXCLUDE = flags.DEFINE_string("exclude", "", "Experts opted out, comma-separated.",
                               flag_values=FLAGS)
_MATRIX = flags.DEFINE_bool("opt-out-matrix", False, "Rows: all experts, each expert opted out, "
                            "public only.", flag_values=FLAGS)
flags.DEFINE_alias("opt_out_matrix", "opt-out-matrix", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output directory (results.json/.md, routing.png).",
                           flag_values=FLAGS)
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Sequence length (default: the model's).",
                                flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch (sequences).", flag_values=FLAGS)
_SPLIT = flags.DEFINE_string("split", "validation", "Dataset split.", flag_values=FLAGS)
_MAX_BATCHES = flags.DEFINE_integer("max_batches", None, "Batches per domain (quick looks).",
                                    flag_values=FLAGS)
_EXTRACTION = flags.DEFINE_string(
    "extraction", "", "Split whose documents are tested for verbatim extraction (e.g. train).",
    flag_values=FLAGS)
_EX_DOCS = flags.DEFINE_integer("extraction_docs", 32, "Documents per domain.", flag_values=FLAGS)
_EX_PREFIX = flags.DEFINE_integer("extraction_prefix", 32, "Prompt tokens.", flag_values=FLAGS)
_EX_TOKENS = flags.DEFINE_integer("extraction_tokens", 256, "Generated (greedy) tokens.",
                                  flag_values=FLAGS)
_EX_THRESHOLD = flags.DEFINE_float("extraction_threshold", 0.9, "Similarity that counts as "
                                   "extracted.", flag_values=FLAGS)
_PERPLEXITY = flags.DEFINE_bool("perplexity", True, "Perplexity on --data (--noperplexity: off).",
                                flag_values=FLAGS)
_TASKS_OPT_OUT = flags.DEFINE_bool(
    "tasks_opt_out", True, "Score --tasks on every row (each opt-out subset); "
    "--notasks_opt_out: on the first row only (all experts, or the --exclude subset).",
    flag_values=FLAGS)
_LOAD = cli.ModelLoadFlags(FLAGS)
_TOP_K = flags.DEFINE_integer("top_k", None, "Experts per token, overriding the model's "
                              "(inference-only; the weights are unchanged).", lower_bound=1,
                              flag_values=FLAGS)
_NO_ROUTING = flags.DEFINE_bool("no_routing", False, "Skip routing statistics.", flag_values=FLAGS)
_DIST = cli.DistributedFlags(FLAGS)
flags.mark_flags_as_required(["ckpt", "out"], flag_values=FLAGS)
flags.register_multi_flags_validator(
    ["exclude", "opt-out-matrix"], lambda d: not (d["exclude"] and d["opt-out-matrix"]),
    "--exclude and --opt-out-matrix are exclusive", flag_values=FLAGS)


def _main(argv) -> int:
  del argv
  _DIST.init()
  import jax
  from flexolmo_jax.evaluate.extraction import ExtractionOptions
  from flexolmo_jax.evaluate.report import markdown, write_all
  from flexolmo_jax.evaluate.run import EvalOptions, evaluate
  config = _CONFIG.value
  opts = EvalOptions(
      ckpt=_CKPT.value, data=_DATA.value, tasks=cli.parse_names(_TASKS.value),
      tokenizer=_TOKENIZER.value, exclude=cli.parse_names(_EXCLUDE.value),
      opt_out_matrix=_MATRIX.value, seq_len=_SEQ_LEN.value, batch_size=_BATCH.value,
      split=_SPLIT.value, max_batches=_MAX_BATCHES.value, mesh=config.mesh.to_dict(),
      axis_rules=config.get("axis_rules"), dispatch=_LOAD.dispatch.value,
      param_dtype=_LOAD.param_dtype.value, top_k=_TOP_K.value, routing=not _NO_ROUTING.value,
      perplexity=_PERPLEXITY.value, tasks_opt_out=_TASKS_OPT_OUT.value,
      extraction=ExtractionOptions(
          split=_EXTRACTION.value, num_docs=_EX_DOCS.value, prefix_len=_EX_PREFIX.value,
          gen_len=_EX_TOKENS.value, threshold=_EX_THRESHOLD.value,
          batch_size=_BATCH.value) if _EXTRACTION.value else None)
  results = evaluate(opts)  # DataError, ModelDirError, ValueError: cli.run, exit 1
  if jax.process_index() == 0:
    files = write_all(results, _OUT.value)
    print(markdown(results))
    print("wrote " + ", ".join(files.values()))
  return 0


def main(argv=None) -> int:
  return cli.run(_main, FLAGS, argv, __doc__)

if __name__ == "__main__":
  main()
